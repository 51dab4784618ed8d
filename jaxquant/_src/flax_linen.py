"""Run Flax Linen models on quantized params without editing them.

``apply`` runs ``model.apply`` under ``nn.intercept_methods``: calls of ``nn.Dense``,
``nn.DenseGeneral``, ``nn.Einsum`` and ``nn.Embed`` whose params are QArrays are computed here
from the QArrays (Dense and simple DenseGeneral through ``qmatmul``), mirroring Flax's own dtype
promotion; everything else runs as usual. Flax checks param shapes against their initializers,
so a QArray cannot pass through the layer's own ``__call__``: these layers are re-implemented,
and any other module that owns a QArray raises an error naming its path.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant._src.dequantize import block_scale, dequantize
from jaxquant._src.matmul import qmatmul
from jaxquant._src.qarray import QArray


def _params(module: nn.Module) -> dict:
    return module.variables.get("params", {}) if module.scope is not None else {}


def _promoted_dtype(module, x, q: QArray, bias):
    parts = [x, jnp.zeros((), q.dtype)] + ([bias] if bias is not None else [])
    return module.dtype or jnp.result_type(*parts)


def _as_matrix(q: QArray) -> QArray:
    """View a kernel ``(K, *features)`` quantized along axis 0 as the matrix ``(K, prod(features))``:
    the stored rows are already ``(features..., K)``, so only shapes change."""
    if q.ndim == 2:
        return q
    n = math.prod(q.shape[1:])
    scale = q.scale
    if isinstance(scale, QArray):  # nested codes are flat (axis=None): only the shape changes
        scale = dataclasses.replace(scale, shape=(n, scale.shape[-1]))
    else:
        scale = scale.reshape(n, scale.shape[-1])
    zp = None if q.zero_point is None else q.zero_point.reshape(n, -1)
    return dataclasses.replace(q, codes=q.codes.reshape(n, q.codes.shape[-1]), scale=scale,
                               zero_point=zp, shape=(q.shape[0], n))


def _add_bias(y, bias, dtype):
    if bias is None:
        return y
    return y + jnp.asarray(bias, dtype).reshape((1,) * (y.ndim - bias.ndim) + tuple(bias.shape))


def _dense(module: nn.Dense, x):
    kernel, bias = _params(module)["kernel"], _params(module).get("bias")
    dtype = _promoted_dtype(module, x, kernel, bias)
    y = qmatmul(x.astype(dtype), kernel, compute_dtype=dtype) if kernel.axis == 0 else (
        jax.lax.dot_general(x.astype(dtype), dequantize(kernel, dtype), (((x.ndim - 1,), (0,)), ((), ()))))
    return _add_bias(y, bias, dtype)


def _dense_general(module: nn.DenseGeneral, x):
    kernel, bias = _params(module)["kernel"], _params(module).get("bias")
    if module.batch_dims:
        raise NotImplementedError(f"jaxquant.flax: DenseGeneral with batch_dims at {module.path}")
    axis = sorted(a % x.ndim for a in ((module.axis,) if isinstance(module.axis, int) else module.axis))
    features = (module.features,) if isinstance(module.features, int) else tuple(module.features)
    dtype = _promoted_dtype(module, x, kernel, bias)
    x = x.astype(dtype)
    if len(axis) == 1 and axis[0] == x.ndim - 1 and kernel.axis == 0:
        y = qmatmul(x, _as_matrix(kernel), compute_dtype=dtype).reshape(*x.shape[:-1], *features)
    else:
        w = dequantize(kernel, dtype)
        y = jax.lax.dot_general(x, w, ((tuple(axis), tuple(range(len(axis)))), ((), ())))
    return _add_bias(y, bias, dtype)


def _einsum(module: nn.Einsum, x, einsum_str=None):
    kernel, bias = _params(module)["kernel"], _params(module).get("bias")
    einsum_str = einsum_str or module.einsum_str
    dtype = _promoted_dtype(module, x, kernel, bias)
    y = jnp.einsum(einsum_str.replace(" ", ""), x.astype(dtype), dequantize(kernel, dtype))
    if bias is not None:
        out_spec = einsum_str.replace(" ", "").split("->")[1]
        kernel_spec = einsum_str.replace(" ", "").split("->")[0].split(",")[1]
        bias_spec = "".join(c for c in kernel_spec if c in out_spec)
        shape = [bias.shape[bias_spec.index(c)] if c in bias_spec else 1 for c in out_spec]
        y = y + jnp.asarray(bias, dtype).reshape(shape)
    return y


def _embed_rows(q: QArray, ids):
    """Dequantize only the looked-up rows of an embedding quantized along its feature axis."""
    if q.axis != 1 or q.ndim != 2:
        return jnp.take(dequantize(q), ids, axis=0)
    flat = ids.reshape(-1)
    rows = QArray(q.codes[flat], block_scale(q)[flat], None if q.zero_point is None else q.zero_point[flat],
                  None, shape=(flat.shape[0], q.shape[1]), dtype=q.dtype, qtype=q.qtype,
                  block_size=q.block_size, axis=1)
    return dequantize(rows).reshape(*ids.shape, q.shape[1])


def _embed(module: nn.Embed, method: str, *args):
    table = _params(module)["embedding"]
    if method == "attend":
        (query,) = args
        dtype = module.dtype or jnp.result_type(query, jnp.zeros((), table.dtype))
        # attend is query @ table^T: the table's rows are the output features
        w = dequantize(table, dtype)
        return jax.lax.dot_general(query.astype(dtype), w, (((query.ndim - 1,), (1,)), ((), ())))
    (ids,) = args
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError("Input type must be an integer or unsigned integer.")
    out = _embed_rows(table, ids)
    return out.astype(module.dtype or table.dtype)


def _interceptor(next_fun, args, kwargs, context):
    module = context.module
    own = _params(module)
    if not any(isinstance(v, QArray) for v in own.values()):
        return next_fun(*args, **kwargs)
    method = context.method_name
    if isinstance(module, nn.Dense) and method == "__call__":
        return _dense(module, *args, **kwargs)
    if isinstance(module, nn.DenseGeneral) and method == "__call__":
        return _dense_general(module, *args, **kwargs)
    if isinstance(module, nn.Einsum) and method == "__call__":
        return _einsum(module, *args, **kwargs)
    if isinstance(module, nn.Embed) and method in ("__call__", "attend"):
        return _embed(module, method, *args)
    if isinstance(module, nn.Embed) and method == "setup":
        return None  # its self.param() would check the table's shape; _embed reads it directly
    if method == "setup" or (method.startswith("_") and method != "__call__"):
        return next_fun(*args, **kwargs)
    names = sorted(k for k, v in own.items() if isinstance(v, QArray))
    raise NotImplementedError(
        f"jaxquant.flax.apply: module {type(module).__name__} at {'/'.join(map(str, module.path))} "
        f"owns quantized params {names}, and only Dense, DenseGeneral, Einsum and Embed run on "
        f"QArrays; leave it out of the policy (Rule(pattern, qtype=None))")


def _check_tree(model: nn.Module, variables, args, kwargs):
    """Compare the quantized tree's structure with the model's, naming the first mismatch."""
    from jaxquant._src.tree import path_str
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
    want = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    got = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(
        variables, is_leaf=lambda x: isinstance(x, QArray))[0]}
    for name in sorted(set(want) | set(got)):
        if name not in got:
            raise ValueError(f"jaxquant.flax.apply: the tree lacks {name!r} that the model needs")
        if name not in want:
            raise ValueError(f"jaxquant.flax.apply: the tree has {name!r} that the model does not use")
        if tuple(got[name].shape) != tuple(want[name].shape):
            raise ValueError(f"jaxquant.flax.apply: {name!r} has shape {tuple(got[name].shape)}, the "
                             f"model expects {tuple(want[name].shape)}")


def apply(model: nn.Module, variables, *args, check: bool = True, **kwargs):
    """``model.apply(variables, *args, **kwargs)`` with QArrays among the params.

    Gives what ``model.apply(jaxquant.dequantize_tree(variables), ...)`` gives (within the
    compute dtype's tolerance) without materializing full-precision copies of all weights:
    Dense/DenseGeneral matmuls go through ``qmatmul``. Jit-able. ``check=True`` first compares the
    tree with the model's own (abstractly, no allocation) and names the first mismatching path.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxquant as jq
      >>> model = nn.Dense(256)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 512)))
      >>> y = jq.flax.apply(model, jq.quantize_tree(params), jnp.ones((4, 512)))
    """
    if check:
        _check_tree(model, variables, args, kwargs)
    with nn.intercept_methods(_interceptor):
        return model.apply(variables, *args, **kwargs)
