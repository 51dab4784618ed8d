"""Run Flax Linen models on quantized params without editing them.

``apply`` runs ``model.apply`` under ``nn.intercept_methods``. A module whose own params hold a
QArray never runs its own code on them (Flax checks param shapes against their initializers):

- ``nn.Dense``, ``nn.DenseGeneral`` (the projections of ``nn.MultiHeadDotProductAttention``) and
  ``nn.Einsum`` are computed as ``qeinsum``: one 2-D ``qmatmul`` when the kernel's blocks run along
  its contraction axes (the Hopper kernel where the shape fits), else dequantize + einsum;
- ``nn.Embed`` dequantizes only the looked-up rows, and ``attend`` is a ``qeinsum``;
- any other module (``nn.Conv``, subclasses, your own) runs its own method on a float copy of its
  variables, dequantized next to the use under ``jax.jit``.

``layouts(model, *args)`` reads from the model which axes each kernel contracts and which leading
axes stack scanned layers, for ``quantize_tree(params, layouts=...)``.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant._src import layout, lora_flax
from jaxquant._src.dequantize import block_scale, dequantize
from jaxquant._src.qarray import QArray
from jaxquant._src.qeinsum import contracted_axes, matrix_form, parse, qeinsum
from jaxquant._src.tree import Layout, dequantize_tree, is_qarray, path_str

_LETTERS = "abcdefghijklmnopqrstuvw"
_FEATURES = "ABCDEFGHIJKLMNOPQRSTUVW"


def _params(module: nn.Module) -> dict:
    return module.variables.get("params", {}) if module.scope is not None else {}


def _owns_qarrays(module: nn.Module) -> bool:
    return any(isinstance(v, QArray) for v in _params(module).values())


def _promoted_dtype(module, x, q, bias):
    parts = [x, jnp.zeros((), q.dtype)] + ([bias] if bias is not None else [])
    return module.dtype or jnp.result_type(*parts)


def _dense_general_spec(module: nn.DenseGeneral, ndim: int) -> str | None:
    if module.batch_dims:
        return None
    axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    axis = sorted(a % ndim for a in axis)
    features = module.features if isinstance(module.features, (tuple, list)) else (module.features,)
    x_spec = _LETTERS[:ndim]
    kept = "".join(c for i, c in enumerate(x_spec) if i not in axis)
    contracted = "".join(x_spec[a] for a in axis)
    return f"{x_spec},{contracted}{_FEATURES[:len(features)]}->{kept}{_FEATURES[:len(features)]}"


def _spec(module: nn.Module, x, kwargs) -> str | None:
    """The einsum a Dense / DenseGeneral / Einsum call computes (None: not one we run)."""
    if type(module) is nn.Dense:
        lead = _LETTERS[:x.ndim - 1]
        return f"{lead}Z,ZY->{lead}Y"
    if type(module) is nn.DenseGeneral:
        return _dense_general_spec(module, x.ndim)
    if type(module) is nn.Einsum:
        return (kwargs.get("einsum_str") or module.einsum_str).replace(" ", "")
    return None


def _bias(y, bias, spec: str, dtype):
    if bias is None:
        return y
    _, w_spec, out = parse(spec)
    bias_spec = "".join(c for c in w_spec if c in out)  # Flax: the kernel's output axes
    shape = [bias.shape[bias_spec.index(c)] if c in bias_spec else 1 for c in out]
    return y + jnp.asarray(bias, dtype).reshape(shape)


def _matmul_layer(module, x, kwargs):
    """Dense / DenseGeneral / Einsum on a quantized kernel; None where the float copy must run."""
    kernel, bias = _params(module)["kernel"], _params(module).get("bias")
    spec = _spec(module, x, kwargs)
    if spec is None or not isinstance(kernel, QArray) or matrix_form(spec, kernel) is None:
        return None
    dtype = _promoted_dtype(module, x, kernel, bias)
    return _bias(qeinsum(spec, x, kernel, dtype), bias, spec, dtype)


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
        lead = _LETTERS[:query.ndim - 1]
        return qeinsum(f"{lead}Z,YZ->{lead}Y", query, table, dtype)  # query @ table^T
    (ids,) = args
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError("Input type must be an integer or unsigned integer.")
    return _embed_rows(table, ids).astype(module.dtype or table.dtype)


def _run_float(module: nn.Module, method: str, args, kwargs):
    """The module's own ``method`` on its variables with every QArray dequantized (under jit,
    next to this use), through an unbound copy: Flax's code, Flax's numbers."""
    rngs = {name: module.make_rng(name) for name in module.scope.rngs}
    copy = module.clone(parent=None)
    return copy.apply(dequantize_tree(module.variables), *args, method=method, rngs=rngs, **kwargs)


def _interceptor(next_fun, args, kwargs, context):
    module, method = context.module, context.method_name
    if not _owns_qarrays(module):
        return next_fun(*args, **kwargs)
    if method == "setup":
        return None  # its self.param() would check shapes; its methods run below, on QArrays
    if type(module) is nn.Embed and method in ("__call__", "attend"):
        return _embed(module, method, *args)
    if method == "__call__" and args:
        out = _matmul_layer(module, args[0], kwargs)
        if out is not None:
            return out
    return _run_float(module, method, args, kwargs)


def _layout(module: nn.Module, name: str, one_layer_shape) -> Layout | None:
    kind = type(module).__name__
    ndim = len(one_layer_shape)
    if type(module) is nn.Embed and name == "embedding":
        return Layout(1, module=kind)  # lookups read rows, attend contracts the features
    if name != "kernel":
        return None
    if type(module) is nn.Dense:
        return Layout(0, module=kind)
    if type(module) is nn.DenseGeneral:
        if module.batch_dims:
            return Layout(None, module=kind, why_not="DenseGeneral with batch_dims")
        n_in = len(module.axis) if isinstance(module.axis, (tuple, list)) else 1
        return Layout(layout.normalize_axis(tuple(range(n_in)), ndim), module=kind)
    if type(module) is nn.Einsum:
        axes = contracted_axes(module.einsum_str)
        try:
            return Layout(layout.normalize_axis(axes, ndim), module=kind)
        except ValueError:
            return Layout(None, module=kind,
                          why_not=f"Einsum {module.einsum_str!r} contracts kernel axes {axes}, not contiguous")
    if isinstance(module, (nn.Conv, nn.ConvTranspose)) and not isinstance(module, nn.ConvLocal):
        return Layout(layout.normalize_axis(tuple(range(ndim - 1)), ndim), module=kind)
    return None


def _init_rngs(rngs):
    streams = set(rngs) if isinstance(rngs, dict) else set()
    return {name: jax.random.key(0) for name in streams | {"params"}}


def _trace(model, args, kwargs, method, rngs):
    """An abstract ``model.init`` (no allocation): the variable tree and the kernels' layouts."""
    seen = {}

    def record(next_fun, call_args, call_kwargs, context):
        out = next_fun(*call_args, **call_kwargs)
        module = context.module
        if context.method_name != "setup":
            for name, value in _params(module).items():
                if hasattr(value, "shape"):
                    key = "/".join(("params", *map(str, module.path), name))
                    seen.setdefault(key, (module, name, tuple(value.shape)))
        return out

    with nn.intercept_methods(record):
        abstract = jax.eval_shape(lambda: model.init(_init_rngs(rngs), *args, method=method, **kwargs))
    full = {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    out = {}
    for key, (module, name, one) in seen.items():
        lay = _layout(module, name, one)
        if lay is None or key not in full:
            continue
        stack = len(full[key]) - len(one)
        if stack and full[key][stack:] != one:
            lay = Layout(None, module=lay.module, why_not="stacked along a non-leading axis")
        out[key] = Layout(lay.axis, stack, lay.module, lay.why_not)
    return abstract, out


def layouts(model: nn.Module, *args, method=None, rngs=None, **kwargs) -> dict[str, Layout]:
    """What each kernel's module contracts, by param path, read from an abstract ``model.init``
    (for ``jaxquant.quantize_tree(params, layouts=...)``).

    Scanned layers (``nn.scan``, ``nn.scan(nn.remat(...))``) show as leading stack dimensions:
    a layer sees its one-layer param, the tree holds them stacked.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxquant as jq
      >>> model = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=128)
      >>> x = jnp.ones((1, 8, 128))
      >>> jq.flax.layouts(model, x)["params/out/kernel"].axis
      (0, 1)
    """
    return _trace(model, args, kwargs, method, rngs)[1]


def _check_tree(model: nn.Module, variables, args, kwargs, method, rngs):
    """Compare the quantized tree's structure with the model's, naming the first mismatch."""
    abstract, lays = _trace(model, args, kwargs, method, rngs)
    want = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}
    got = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(variables, is_leaf=is_qarray)[0]}
    for name in sorted(set(want) | set(got)):
        if name not in got:
            raise ValueError(f"jaxquant.flax.apply: the tree lacks {name!r} that the model needs")
        if name not in want:
            if method is not None:
                continue  # a method may use part of the model
            raise ValueError(f"jaxquant.flax.apply: the tree has {name!r} that the model does not use")
        leaf = got[name]
        shape = tuple(leaf.shape) if not isinstance(leaf, QArray) else (
            layout.stack_shape(leaf) + tuple(leaf.shape))
        if shape != tuple(want[name].shape):
            raise ValueError(f"jaxquant.flax.apply: {name!r} has shape {shape}, the model expects "
                             f"{tuple(want[name].shape)}")
        stack = lays[name].stack if name in lays else 0
        if isinstance(leaf, QArray) and layout.stack_ndim(leaf) != stack:
            raise ValueError(f"jaxquant.flax.apply: {name!r} is {stack} scanned layer axis(es) deep "
                             f"in the model, the QArray has {layout.stack_ndim(leaf)}: quantize with "
                             f"jq.quantize_tree(params, layouts=jq.flax.layouts(model, *args))")


def apply(model: nn.Module, variables, *args, rngs=None, mutable=False, method=None,
          check: bool = True, lora: dict | None = None, lora_rate: float = 0.0,
          lora_rng: jax.Array | None = None, **kwargs):
    """``model.apply(variables, *args, rngs=, mutable=, method=, **kwargs)`` with QArrays among
    the params, and with ``lora`` adapters added to the layers they name.

    Gives what ``model.apply(jaxquant.dequantize_tree(variables), ...)`` gives (within the compute
    dtype's tolerance) without materializing full-precision copies of all weights; returns what
    ``model.apply`` returns (``(y, updates)`` with ``mutable``). Jit-able. ``check=True`` first
    compares the tree with the model's own (an abstract ``model.init`` with the same arguments,
    no allocation) and names the first mismatching path.

    ``lora``: adapters from ``jaxquant.lora.init`` (QLoRA, arXiv 2305.14314): every Dense,
    DenseGeneral or Einsum with one returns ``base(x) + (alpha / r) * (dropout(x) @ a) @ b``
    (``jaxquant.lora.intercept``); differentiate with respect to them only, the quantized base
    being a separate, frozen argument. ``lora_rate`` > 0 with a ``lora_rng`` drops adapter
    inputs. With ``check``, the adapters must fit the tree and every one must be used.

    Raises:
      ValueError: the tree does not match the model. ``jaxquant.lora.AdapterError``: adapters
        that do not fit the tree, or that no layer uses.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxquant as jq
      >>> model = nn.Dense(256)
      >>> qparams = jq.quantize_tree(model.init(jax.random.key(0), jnp.ones((1, 512))))
      >>> y = jq.flax.apply(model, qparams, jnp.ones((4, 512)))
      >>> adapters = jq.lora.init(jax.random.key(1), qparams, rank=8)
      >>> y2 = jq.flax.apply(model, qparams, jnp.ones((4, 512)), lora=adapters)
    """
    if check:
        _check_tree(model, variables, args, kwargs, method, rngs)
    with contextlib.ExitStack() as stack:
        if lora is not None:  # outside ours: the adapter adds to the quantized layer's output
            stack.enter_context(lora_flax.adapted(variables, lora, rate=lora_rate, rng=lora_rng,
                                                  check=check))
        with nn.intercept_methods(_interceptor):
            return model.apply(variables, *args, rngs=rngs, mutable=mutable, method=method, **kwargs)


def lora_apply(model: nn.Module, variables, *args, adapters: dict, rate: float = 0.0,
               rng: jax.Array | None = None, check: bool = True, **kwargs):
    """``jaxquant.lora.apply``: ``apply(model, variables, *args, lora=adapters, lora_rate=rate,
    lora_rng=rng, check=check, **kwargs)``.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxquant as jq
      >>> model = nn.Dense(256)
      >>> qparams = jq.quantize_tree(model.init(jax.random.key(0), jnp.ones((1, 512))))
      >>> adapters = jq.lora.init(jax.random.key(1), qparams, rank=8)
      >>> y = jq.lora.apply(model, qparams, jnp.ones((4, 512)), adapters=adapters)
    """
    return apply(model, variables, *args, lora=adapters, lora_rate=rate, lora_rng=rng, check=check,
                 **kwargs)
