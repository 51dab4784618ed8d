"""Run Flax NNX modules quantized: module surgery by the same policy and layouts as Linen.

``QArray`` is registered as an NNX data type, so a QArray held by a module attribute is part of
the module's state: it travels through ``nnx.jit``, ``nnx.split``/``merge``, ``nnx.state`` and
``nnx.scan`` / ``nnx.vmap`` (a stacked QArray's leaves lose their leading axis per layer).

``quantize_module`` swaps ``nnx.Linear`` for ``QLinear``, and gives ``nnx.LinearGeneral`` (so the
four projections of ``nnx.MultiHeadAttention``), ``nnx.Einsum``, ``nnx.Embed``, ``nnx.Conv`` and
``nnx.ConvTranspose`` a quantized subclass (``Quantized<Name>``) holding the QArray in place of its
``Param``: LinearGeneral and Einsum (and ``Embed.attend``) run as ``qeinsum`` where the blocks lie
along the contraction, everything else runs the layer's own code on the weight dequantized next to
its use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant._src import layout, lora_flax
from jaxquant._src.dequantize import dequantize
from jaxquant._src.qarray import QArray
from jaxquant._src.qeinsum import contracted_axes, matrix_form, parse, qeinsum
from jaxquant._src.tree import Layout, Policy, check_shards, plan, quantize_leaf

nnx.register_data_type(QArray)

_LETTERS = "abcdefghijklmnopqrstuvw"
_FEATURES = "ABCDEFGHIJKLMNOPQRSTUVW"


def _dtype(module, x, q, bias):
    parts = [x, jnp.zeros((), q.dtype)] + ([bias] if bias is not None else [])
    return module.dtype or jnp.result_type(*parts)


class QLinear(nnx.Module):
    """``nnx.Linear`` with its kernel stored as a QArray (blocks along the input axis)."""

    def __init__(self, kernel: QArray, bias: nnx.Param | None, dtype=None):
        self.kernel = kernel
        self.bias = bias
        self.dtype = dtype

    def __call__(self, inputs: jax.Array) -> jax.Array:
        bias = self.bias[...] if self.bias is not None else None
        dtype = _dtype(self, inputs, self.kernel, bias)
        lead = _LETTERS[:inputs.ndim - 1]
        y = qeinsum(f"{lead}Z,ZY->{lead}Y", inputs, self.kernel, dtype)
        if bias is not None:
            y = y + jnp.reshape(bias.astype(dtype), (1,) * (y.ndim - 1) + (-1,))
        return y

    def dequantized(self) -> nnx.Linear:
        """An equivalent plain ``nnx.Linear`` (for comparisons)."""
        in_f, out_f = self.kernel.shape
        linear = nnx.Linear(in_f, out_f, use_bias=self.bias is not None, dtype=self.dtype,
                            param_dtype=self.kernel.dtype, rngs=nnx.Rngs(0))
        linear.kernel[...] = dequantize(self.kernel)
        if self.bias is not None:
            linear.bias[...] = self.bias[...]
        return linear


def _spec(module, x) -> str | None:
    """The einsum a LinearGeneral / Einsum call computes (None: run the float copy)."""
    if isinstance(module, nnx.Einsum):
        return module.einsum_str.replace(" ", "")
    if isinstance(module, nnx.Linear):
        lead = _LETTERS[:x.ndim - 1]
        return f"{lead}Z,ZY->{lead}Y"
    if isinstance(module, nnx.LinearGeneral) and not module.batch_axis:
        axis = sorted(a % x.ndim for a in module.axis)
        x_spec = _LETTERS[:x.ndim]
        kept = "".join(c for i, c in enumerate(x_spec) if i not in axis)
        out = _FEATURES[:len(module.out_features)]
        return f"{x_spec},{''.join(x_spec[a] for a in axis)}{out}->{kept}{out}"
    return None


def _float_copy(module, base):
    """A shallow copy of ``module`` as its ``base`` class with every QArray dequantized."""
    copy = object.__new__(base)
    copy.__dict__.update({k: dequantize(v) if isinstance(v, QArray) else v
                          for k, v in vars(module).items()})
    return copy


def _call(self, *args, **kwargs):
    base = type(self).__mro__[1]
    kernel = getattr(self, "kernel", None)
    if kwargs.get("out_sharding", 0) is None:  # nnx.MultiHeadAttention passes None: no constraint
        kwargs = {k: v for k, v in kwargs.items() if k != "out_sharding"}
    if isinstance(kernel, QArray) and args and not kwargs:
        spec = _spec(self, args[0])
        if spec is not None and matrix_form(spec, kernel) is not None:
            bias = self.bias[...] if getattr(self, "bias", None) is not None else None
            dtype = _dtype(self, args[0], kernel, bias)
            y = qeinsum(spec, args[0], kernel, dtype)
            if bias is None:
                return y
            _, w_spec, out = parse(spec)
            bias_spec = "".join(c for c in w_spec if c in out)
            shape = [bias.shape[bias_spec.index(c)] if c in bias_spec else 1 for c in out]
            return y + bias.astype(dtype).reshape(shape)
    return base.__call__(_float_copy(self, base), *args, **kwargs)


def _attend(self, query):
    base = type(self).__mro__[1]
    table = self.embedding
    if not isinstance(table, QArray):
        return base.attend(self, query)
    dtype = self.dtype or jnp.result_type(query, jnp.zeros((), table.dtype))
    lead = _LETTERS[:query.ndim - 1]
    return qeinsum(f"{lead}Z,YZ->{lead}Y", query, table, dtype)


_CLASSES: dict[type, type] = {}


def quantized_class(base: type) -> type:
    """``Quantized<base>``: ``base`` whose methods accept QArrays in place of its Params."""
    if base not in _CLASSES:
        methods = {"__call__": _call, "__module__": __name__}
        if hasattr(base, "attend"):
            methods["attend"] = _attend
        _CLASSES[base] = type(f"Quantized{base.__name__}", (base,), methods)
    return _CLASSES[base]


def _layouts(module) -> dict[str, tuple[Layout, int]]:
    """``{param name: (Layout, one-layer ndim)}`` of a module type quantize_module covers."""
    kind = type(module).__name__
    if type(module) is nnx.Linear:
        return {"kernel": (Layout(0, module=kind), 2)}
    if type(module) is nnx.LinearGeneral:
        n_in, n_out = len(module.in_features), len(module.out_features)
        why = "LinearGeneral with batch_axis" if module.batch_axis else ""
        return {"kernel": (Layout(tuple(range(n_in)) if n_in > 1 else 0, module=kind, why_not=why),
                           n_in + n_out + len(module.batch_axis))}
    if type(module) is nnx.Einsum:
        axes, ndim = contracted_axes(module.einsum_str), len(module.kernel_shape)
        try:
            return {"kernel": (Layout(layout.normalize_axis(axes, ndim), module=kind), ndim)}
        except ValueError:
            why = f"Einsum {module.einsum_str!r} contracts kernel axes {axes}, not contiguous"
            return {"kernel": (Layout(None, module=kind, why_not=why), ndim)}
    if type(module) in (nnx.Conv, nnx.ConvTranspose):
        ndim = len(module.kernel_shape)
        return {"kernel": (Layout(tuple(range(ndim - 1)), module=kind), ndim)}
    if type(module) is nnx.Embed:
        return {"embedding": (Layout(1, module=kind), 2)}
    return {}


def _set(parent, key, value):
    if isinstance(key, int) or (isinstance(key, str) and key.isdigit() and not hasattr(parent, key)):
        parent[int(key)] = value
    else:
        setattr(parent, key, value)


def _get(node, path):
    for key in path:
        node = node[int(key)] if isinstance(key, int) else getattr(node, key)
    return node


def quantize_module(module: nnx.Module, policy: Policy | None = None, *, lora_rank: int | None = None,
                    lora_alpha: float = 32.0, lora_rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Quantize the layers of an NNX module in place, by ``policy`` (as ``quantize_tree``).

    Covers ``nnx.Linear`` (-> ``QLinear``), ``nnx.LinearGeneral`` (and so
    ``nnx.MultiHeadAttention``), ``nnx.Einsum``, ``nnx.Embed``, ``nnx.Conv`` and
    ``nnx.ConvTranspose``, with blocks along each one's contraction axes; layers stacked by
    ``nnx.vmap`` (for ``nnx.scan``) are quantized layer by layer. The policy sees paths like
    ``layers/0/kernel``; the default quantizes every kernel of at least 4096 elements to NF4 +
    double quant and leaves the rest float: ``jaxquant.memory_report(module, policy=...)`` lists
    them with the reason. Returns ``module`` (updated).

    ``lora_rank``: then wrap each quantized ``QLinear`` / ``LinearGeneral`` in ``jaxquant.lora.LoRA``
    (``jaxquant.lora.add_lora``: ``nnx.LoRAParam`` adapters of that rank, scaled by
    ``lora_alpha / lora_rank``; a stacked layer gets one adapter per layer), for QLoRA with
    ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``.

    Example:
      >>> from flax import nnx; import jax.numpy as jnp, jaxquant as jq
      >>> model = nnx.Sequential(nnx.Linear(256, 256, rngs=nnx.Rngs(0)))
      >>> model = jq.flax.quantize_module(model)
      >>> y = nnx.jit(lambda m, x: m(x))(model, jnp.ones((2, 256)))
      >>> lora = jq.flax.quantize_module(nnx.Sequential(nnx.Linear(256, 256, rngs=nnx.Rngs(0))),
      ...                                lora_rank=8, lora_alpha=16.0)
      >>> lora.layers[0].lora_a.shape
      (256, 8)
    """
    found = []
    for path, m in nnx.iter_modules(module):
        for name, (lay, ndim) in _layouts(m).items():
            value = getattr(m, name)
            if isinstance(value, nnx.Variable):
                found.append((path, m, name, value[...], lay, ndim))
    params, layouts = {}, {}
    for path, m, name, value, lay, ndim in found:
        key = "/".join(map(str, (*path, name)))
        params[key] = value
        layouts[key] = Layout(lay.axis, value.ndim - ndim, lay.module, lay.why_not)
    decisions = plan(params, policy, layouts)
    check_shards(params, decisions)  # before the first layer is replaced: no half-quantized module
    for path, m, name, value, lay, ndim in found:
        decision = decisions["/".join(map(str, (*path, name)))]
        if decision.config is None:
            continue
        q = quantize_leaf(value, decision.config, decision.stack)
        if type(m) is nnx.Linear and not decision.stack and q.axis == 0:
            if not path:
                raise ValueError("quantize_module: pass a module that contains the Linear layers")
            _set(_get(module, path[:-1]), path[-1], QLinear(q, m.bias, m.dtype))
            continue
        delattr(m, name)
        object.__setattr__(m, "__class__", quantized_class(type(m)))
        setattr(m, name, q)
    if lora_rank is not None:
        lora_flax.add_lora(module, lora_rank, lora_alpha, rngs=lora_rngs)
    return module
