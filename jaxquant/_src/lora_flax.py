"""LoRA adapters in Flax models: a Linen interceptor and an NNX wrapper module.

Linen: ``intercept(adapters)`` is a context under which every ``nn.Dense``, ``nn.DenseGeneral``
or ``nn.Einsum`` whose kernel has an adapter returns ``base(x) + delta(x)``. The base is whatever
the next interceptor (``jaxquant.flax.apply``'s, which runs the quantized kernel) or the module
itself computes, so the two compose; the adapter term depends only on the module's input and path.
``jaxquant.flax.apply(..., lora=adapters)`` enters it (``adapted``, with its checks) around its own.

NNX: ``add_lora(module, rank, alpha)`` wraps each layer whose ``kernel`` is a QArray in a
``LoRA`` module holding ``nnx.LoRAParam`` adapters, so ``nnx.Optimizer(..., wrt=nnx.LoRAParam)``
trains only them.
"""

from __future__ import annotations

import contextlib
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxquant._src.lora import (DEFAULT_PATTERN, Adapter, AdapterError, check_adapters, delta, dropout,
                               split_point)
from jaxquant._src import layout
from jaxquant._src.qarray import QArray


def _kernel_path(module: nn.Module) -> str:
    return "/".join(("params", *map(str, module.path), "kernel"))


def _einsum_delta(module: nn.Einsum, x, ad: Adapter, einsum_str, dtype, rate=0.0, dropout_rng=None):
    """The adapter term of an Einsum whose kernel axes are [contracted with x] + [output only]."""
    spec = (einsum_str or module.einsum_str).replace(" ", "")
    inputs, out_spec = spec.split("->")
    x_spec, k_spec = inputs.split(",")
    shape = tuple(module.variables["params"]["kernel"].shape)
    split = split_point(shape, ad.a.shape[0])
    k_in, k_out = k_spec[:split], k_spec[split:]
    rest = "".join(c for c in x_spec if c not in k_in)
    if (not set(k_in) <= set(x_spec) or set(k_out) & set(x_spec)
            or set(out_spec) != set(rest) | set(k_out) or "Z" in spec):
        raise NotImplementedError(f"lora: Einsum {spec!r} at {_kernel_path(module)}: the adapter "
                                  f"needs the kernel's axes ordered [contracted with x] + [output only]")
    a = ad.a.reshape(*shape[:split], ad.rank).astype(dtype)
    b = ad.b.reshape(ad.rank, *shape[split:]).astype(dtype)
    xa = jnp.einsum(f"{x_spec},{k_in}Z->{rest}Z", dropout(x, rate, dropout_rng).astype(dtype), a,
                    preferred_element_type=jnp.float32)
    out = jnp.einsum(f"{rest}Z,Z{k_out}->{out_spec}", xa.astype(dtype), b,
                     preferred_element_type=jnp.float32)
    return (out * ad.scale).astype(dtype)


def _module_delta(module: nn.Module, args, kwargs, ad: Adapter, y, **kw):
    x = args[0] if args else kwargs["inputs"]
    if isinstance(module, nn.Einsum):
        spec = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
        return _einsum_delta(module, x, ad, spec, y.dtype, **kw)
    if isinstance(module, nn.DenseGeneral):
        axes = module.axis if isinstance(module.axis, tuple) else (module.axis,)
        if module.batch_dims:
            raise NotImplementedError(f"lora: DenseGeneral with batch_dims at {_kernel_path(module)}")
        axes = sorted(a % x.ndim for a in axes)
        if axes != list(range(x.ndim - len(axes), x.ndim)):
            x = jnp.moveaxis(x, axes, list(range(x.ndim - len(axes), x.ndim)))
        x = x.reshape(*x.shape[:x.ndim - len(axes)], -1)
    if x.shape[-1] != ad.a.shape[0]:
        raise AdapterError(f"lora: adapter {_kernel_path(module)!r} has K={ad.a.shape[0]}, the layer "
                           f"contracts {x.shape[-1]} input features")
    d = delta(x, ad.a, ad.b, ad.scale, dtype=y.dtype, **kw)
    return d.reshape(y.shape)


@contextlib.contextmanager
def intercept(adapters: dict[str, Adapter], *, rate: float = 0.0, rng: jax.Array | None = None):
    """Within this context, Linen layers with an adapter return ``base(x) + delta(x)``.

    Adapters are keyed by kernel path (``params/<module path>/kernel``, as ``lora.init`` names
    them). ``rate`` > 0 with an ``rng`` applies dropout to the adapter's input (each layer gets
    its own key, folded from its index). Compose with ``jaxquant.flax.apply`` by entering this
    context around it.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxquant as jq
      >>> model = nn.Dense(256)
      >>> qparams = jq.quantize_tree(model.init(jax.random.key(0), jnp.ones((1, 512))))
      >>> adapters = jq.lora.init(jax.random.key(1), qparams, rank=8)
      >>> with jq.lora.intercept(adapters):
      ...     y = jq.flax.apply(model, qparams, jnp.ones((4, 512)))
    """
    if not isinstance(adapters, dict):
        raise AdapterError(f"adapters must be a dict {{path: Adapter}}, got {type(adapters).__name__}")
    index = {name: i for i, name in enumerate(sorted(adapters))}
    used = set()

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Einsum)):
            return next_fun(*args, **kwargs)
        name = _kernel_path(module)
        if name not in adapters:
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        kw = {}
        if rate:
            kw = dict(rate=rate, dropout_rng=None if rng is None else jax.random.fold_in(rng, index[name]))
        used.add(name)
        return y + _module_delta(module, args, kwargs, adapters[name], y, **kw)

    with nn.intercept_methods(interceptor):
        yield used


@contextlib.contextmanager
def adapted(variables, adapters: dict[str, Adapter], *, rate: float = 0.0, rng: jax.Array | None = None,
            check: bool = True):
    """``intercept(adapters)`` with ``jaxquant.flax.apply``'s checks: before, that the adapters
    fit ``variables``; after, that a Dense/DenseGeneral/Einsum layer reached every one.

    Raises:
      AdapterError: adapters that do not fit the tree, or that no layer of the model uses.
    """
    if check:
        check_adapters(variables, adapters)
    with intercept(adapters, rate=rate, rng=rng) as used:
        yield used
    if check and set(adapters) - used:
        raise AdapterError(f"lora: no Dense/DenseGeneral/Einsum layer of the model uses the adapters "
                           f"{sorted(set(adapters) - used)[:8]}")


# ---------------------------------------------------------------- NNX


class LoRA(nnx.Module):
    """``base(x) + (alpha / rank) * (dropout(x) @ lora_a) @ lora_b`` around a quantized layer.

    ``lora_a (K, rank)`` and ``lora_b (rank, N)`` are ``nnx.LoRAParam`` (``b`` starts at zero);
    ``base`` is a layer whose ``kernel`` is a QArray and stays frozen: a 2-D one contracted with
    x's last axis (``QLinear``), or an ``nnx.LinearGeneral`` (the projections of
    ``nnx.MultiHeadAttention``), whose contracted input axes are flattened into K
    (``lora.matrix_shape``). Around stacked layers (``nnx.vmap``-made, run by ``nnx.scan``) the
    adapters are stacked alike, ``(*stack, K, rank)`` and ``(*stack, rank, N)``: one per layer,
    sliced with the kernel.
    """

    def __init__(self, base: nnx.Module, rank: int, alpha: float, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, dropout: float = 0.0):
        k, n = layout.matrix_shape(base.kernel.shape, base.kernel.axis)
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 < rank <= min(k, n):
            raise ValueError(f"lora rank must be an int in [1, {min(k, n)}] for a {k} x {n} kernel, "
                             f"got rank={rank!r}")
        bound = 1.0 / math.sqrt(k)
        stack = layout.stack_shape(base.kernel)
        self.base = base
        self.lora_a = nnx.LoRAParam(jax.random.uniform(rngs.params(), (*stack, k, rank), dtype, -bound, bound))
        self.lora_b = nnx.LoRAParam(jnp.zeros((*stack, rank, n), dtype))
        self.scale = float(alpha) / rank
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None
        if self.dropout is not None and stack:  # stacked keys, which nnx.scan slices with the layers
            self.dropout.rngs = rngs[self.dropout.rng_collection].split(stack)

    def __call__(self, x: jax.Array, **kwargs) -> jax.Array:
        if self.lora_a.ndim != 2:
            raise ValueError(f"this LoRA layer holds {self.lora_a.ndim - 2} stack axes of layers: run it "
                             f"one layer at a time (nnx.scan / nnx.vmap over the stack)")
        y = self.base(x, **kwargs)  # e.g. out_sharding, which nnx.MultiHeadAttention passes
        h = self.dropout(x) if self.dropout is not None else x
        if isinstance(self.base, nnx.LinearGeneral):  # its input axes, moved last and merged
            axes = sorted(a % h.ndim for a in self.base.axis)
            h = jnp.moveaxis(h, axes, list(range(h.ndim - len(axes), h.ndim)))
            h = h.reshape(*h.shape[:h.ndim - len(axes)], -1)
        d = delta(h, self.lora_a[...], self.lora_b[...], self.scale, dtype=y.dtype)
        return y + d.reshape(y.shape)


def _adaptable(m) -> bool:
    """A layer ``LoRA`` can wrap: a QArray kernel (one layer or a stack) contracted as
    ``x[..., K] @ W[K, N]``."""
    kernel = getattr(m, "kernel", None)
    if not isinstance(kernel, QArray):
        return False
    if isinstance(m, nnx.LinearGeneral):
        return not m.batch_axis
    return kernel.ndim == 2 and not isinstance(m, (nnx.Einsum, nnx.Conv, nnx.ConvTranspose))


def add_lora(module: nnx.Module, rank: int = 16, alpha: float = 32.0, *, rngs: nnx.Rngs | None = None,
             pattern: str | None = None, dtype=jnp.float32, dropout: float = 0.0) -> nnx.Module:
    """Wrap every quantized ``QLinear`` or ``nnx.LinearGeneral`` layer (kernel path matching
    ``pattern``, default all) in ``LoRA``, in place; returns ``module``. Einsum, Conv and Embed
    keep no adapter; stacked layers (``nnx.vmap``-made) get stacked adapters, one per layer.

    Raises:
      AdapterError: no quantized layer matches. ValueError: a bad rank.

    Example:
      >>> from flax import nnx; import jax.numpy as jnp, jaxquant as jq, optax
      >>> model = jq.flax.quantize_module(nnx.Sequential(nnx.Linear(256, 256, rngs=nnx.Rngs(0))))
      >>> model = jq.lora.add_lora(model, rank=8, alpha=16.0, rngs=nnx.Rngs(1))
      >>> opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.LoRAParam)
    """
    rngs = rngs or nnx.Rngs(0)
    regex = re.compile(DEFAULT_PATTERN if pattern is None else pattern)
    found = [(path, m) for path, m in nnx.iter_modules(module)
             if _adaptable(m) and regex.search("/".join(map(str, (*path, "kernel"))))]
    if not found:
        raise AdapterError(f"add_lora: pattern {regex.pattern!r} matches no layer with a quantized kernel")
    for path, layer in found:
        if not path:
            raise AdapterError("add_lora: pass a module that contains the quantized layers")
        wrapped = LoRA(layer, rank, alpha, rngs=rngs, dtype=dtype, dropout=dropout)
        parent = module
        for key in path[:-1]:
            parent = parent[int(key)] if isinstance(key, int) else getattr(parent, key)
        if isinstance(path[-1], int):
            parent[path[-1]] = wrapped
        else:
            setattr(parent, path[-1], wrapped)
    return module
