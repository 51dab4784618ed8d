"""LoRA adapters on a frozen quantized base (QLoRA, arXiv 2305.14314): the array math.

An adapter on a kernel ``W`` viewed as a matrix ``K x N`` (the leading axes of a multi-axis kernel
that the layer contracts are ``K``, the rest ``N``) is a pair ``a (K, r)``, ``b (r, N)`` and a
scale ``alpha / r``; the adapted layer computes::

    y = x @ dequantize(q) + (alpha / r) * (dropout(x) @ a) @ b

``a`` starts like PEFT's (kaiming-uniform, ``U(-1/sqrt(K), 1/sqrt(K))``) and ``b`` at zero, so a
fresh adapter changes nothing. Adapters are a flat dict ``{kernel path: Adapter}``, a pytree whose
only leaves are ``a`` and ``b``: ``jax.grad`` and any optax optimizer work on it directly, with
the quantized base passed as a separate, frozen argument. No flax here (``lora_flax`` has the
Linen and NNX glue); ``lora_io`` saves and loads adapters.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src import layout
from jaxquant._src.dequantize import dequantize
from jaxquant._src.matmul import qmatmul
from jaxquant._src.qarray import QArray
from jaxquant._src.quantize import quantize
from jaxquant._src.tree import path_str

DEFAULT_PATTERN = r"(^|/)kernel$"


class AdapterError(ValueError):
    """Adapters that do not fit a quantized tree, or a pattern that selects no quantized layer."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Adapter:
    """One low-rank update ``delta W = (alpha / rank) * a @ b`` of a ``K x N`` kernel.

    ``a`` is ``(K, rank)``, ``b`` is ``(rank, N)`` (the leaves, trained); ``alpha`` is static.
    """

    a: jax.Array
    b: jax.Array
    alpha: float = dataclasses.field(default=1.0, metadata=dict(static=True))

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def split_point(shape: tuple[int, ...], k: int) -> int:
    """How many leading axes of a kernel of ``shape`` make up ``K = k`` (ValueError if none do)."""
    for i in range(1, len(shape)):
        if math.prod(shape[:i]) == k:
            return i
    raise AdapterError(f"an adapter with K={k} rows does not fit a kernel of shape {tuple(shape)}: "
                       f"no leading axes multiply to {k}")


def matrix_shape(q: QArray) -> tuple[int, int]:
    """The ``K x N`` view of a quantized kernel (``layout.matrix_shape``): its axes up to and
    including the last block axis are contracted (the library quantizes kernels along their
    contraction axes; an output projection ``(heads, head_dim, features)`` along ``(0, 1)`` or
    along ``head_dim`` has ``K = heads * head_dim``)."""
    return layout.matrix_shape(q.shape, q.axis)


def _quantized(qparams) -> list[tuple[str, QArray]]:
    leaves = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=lambda x: isinstance(x, QArray))[0]
    return [(path_str(p), x) for p, x in leaves if isinstance(x, QArray)]


def _check_rank(rank, name: str, k: int, n: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
        raise ValueError(f"lora rank must be a positive int, got rank={rank!r}")
    if rank > min(k, n):
        raise ValueError(f"lora rank={rank} is larger than {name!r} allows: its kernel is {k} x {n}, "
                         f"so the rank is at most {min(k, n)}")


def init(key: jax.Array, qparams, rank: int = 16, alpha: float = 32.0, *, pattern: str | None = None,
         dtype=jnp.float32) -> dict[str, Adapter]:
    """Fresh adapters for the quantized kernels of ``qparams`` whose path matches ``pattern``.

    Args:
      key: PRNG key (``a`` is random, ``b`` is zero).
      qparams: a tree from ``quantize_tree``.
      rank, alpha: the update is ``(alpha / rank) * a @ b``.
      pattern: regex (``re.search``) on the kernel's path, e.g. ``r"(q|v)_proj"``; by default
        every quantized leaf named ``kernel``.
      dtype: the adapters' dtype (float32: they are what trains).

    Returns:
      ``{path: Adapter}`` with ``a (K, rank)``, ``b (rank, N)`` (``matrix_shape`` of the kernel).

    Raises:
      ValueError: rank not a positive int, or above ``min(K, N)`` of a selected kernel.
      AdapterError: the pattern selects no quantized kernel. TypeError: non-float dtype.
      NotImplementedError: a selected kernel holds stacked (scanned) layers.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxquant as jq
      >>> params = nn.Dense(256).init(jax.random.key(0), jnp.ones((1, 512)))
      >>> adapters = jq.lora.init(jax.random.key(1), jq.quantize_tree(params), rank=8, alpha=16.0)
      >>> adapters["params/kernel"].a.shape, adapters["params/kernel"].b.shape
      ((512, 8), (8, 256))
    """
    if not jnp.issubdtype(np.dtype(dtype), jnp.floating):
        raise TypeError(f"lora adapters must have a float dtype, got dtype={np.dtype(dtype)}")
    regex = re.compile(DEFAULT_PATTERN if pattern is None else pattern)
    quantized = _quantized(qparams)
    chosen = [(name, q) for name, q in quantized if regex.search(name) and q.ndim >= 2]
    if not chosen:
        names = [name for name, _ in quantized][:8]
        raise AdapterError(f"lora.init: pattern {regex.pattern!r} matches no quantized kernel; the "
                           f"quantized leaves are {names}{' ...' if len(quantized) > 8 else ''}")
    keys = jax.random.split(key, len(chosen))
    adapters = {}
    stacked = [name for name, q in chosen if layout.stack_ndim(q)]
    if stacked:
        raise NotImplementedError(f"lora.init: {stacked[:4]} hold stacked (scanned) layers; adapters "
                                  f"are per layer of an unstacked kernel: leave them out with pattern=")
    for k, (name, q) in zip(keys, chosen):
        fan_in, fan_out = matrix_shape(q)
        _check_rank(rank, name, fan_in, fan_out)
        bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)), as PEFT initializes lora_A
        a = jax.random.uniform(k, (fan_in, rank), dtype, -bound, bound)
        adapters[name] = Adapter(a, jnp.zeros((rank, fan_out), dtype), float(alpha))
    return adapters


def check_adapters(qparams, adapters) -> dict[str, QArray]:
    """The quantized kernel each adapter belongs to; AdapterError naming the first that does not
    fit (no such quantized leaf, or ``a``/``b`` shapes other than ``(K, r)``/``(r, N)``)."""
    if not isinstance(adapters, dict):
        raise AdapterError(f"adapters must be a dict {{path: Adapter}} from lora.init, got "
                           f"{type(adapters).__name__}")
    kernels = dict(_quantized(qparams))
    out = {}
    for name, ad in adapters.items():
        if not isinstance(ad, Adapter):
            raise AdapterError(f"adapters[{name!r}] is a {type(ad).__name__}, not a lora.Adapter")
        if name not in kernels:
            raise AdapterError(f"adapter {name!r} has no quantized kernel in the tree (quantized "
                               f"leaves: {sorted(kernels)[:8]})")
        q = kernels[name]
        k = ad.a.shape[0]
        n = math.prod(q.shape) // k if math.prod(q.shape) % k == 0 else -1
        if ad.a.ndim != 2 or ad.b.ndim != 2 or ad.b.shape != (ad.rank, n):
            raise AdapterError(f"adapter {name!r} has a{tuple(ad.a.shape)} b{tuple(ad.b.shape)}, which "
                               f"do not fit the kernel {tuple(q.shape)} as (K, r) and (r, N)")
        split_point(q.shape, k)
        out[name] = q
    return out


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout (identity without ``rng`` or at ``rate=0``)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"lora dropout rate must be in [0, 1), got rate={rate!r}")
    if not rate or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: float, *, dropout_rng=None,
          rate: float = 0.0, dtype=None) -> jax.Array:
    """``scale * (dropout(x) @ a) @ b`` over x's last axis, in ``dtype`` (x's by default) with
    float32 accumulation; the adapters keep their own dtype (their gradients come back in it)."""
    dtype = np.dtype(x.dtype if dtype is None else dtype)
    x = dropout(x, rate, dropout_rng)
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    xa = jax.lax.dot_general(x.astype(dtype), a.astype(dtype), dims, preferred_element_type=jnp.float32)
    out = jax.lax.dot_general(xa.astype(dtype), b.astype(dtype), dims, preferred_element_type=jnp.float32)
    return (out * scale).astype(dtype)


def lora_matmul(x, q: QArray, a, b, scale: float, *, dropout_rng=None, rate: float = 0.0,
                compute_dtype=None, implementation: str = "auto") -> jax.Array:
    """``qmatmul(x, q) + scale * ((dropout(x) @ a) @ b)``, differentiable in x, a and b.

    Example:
      >>> import jax, jax.numpy as jnp, jaxquant as jq
      >>> q = jq.quantize(jax.random.normal(jax.random.key(0), (256, 128)), "nf4", 64, axis=0)
      >>> a, b = jnp.ones((256, 4)), jnp.zeros((4, 128))
      >>> jq.lora.lora_matmul(jnp.ones((2, 256)), q, a, b, 2.0).shape
      (2, 128)
    """
    x = jnp.asarray(x)
    y = qmatmul(x, q, implementation=implementation, compute_dtype=compute_dtype)
    compute = x.dtype if compute_dtype is None else compute_dtype
    d = delta(x, a, b, scale, dropout_rng=dropout_rng, rate=rate, dtype=compute)
    return y + d.astype(y.dtype)


def _merged(q: QArray, ad: Adapter) -> jax.Array:
    w = dequantize(q, jnp.float32)
    update = jnp.dot(ad.a.astype(jnp.float32), ad.b.astype(jnp.float32)) * ad.scale
    return w + update.reshape(w.shape)


def _like(w: jax.Array, q: QArray) -> QArray:
    nested = q.scale.block_size if isinstance(q.scale, QArray) else 256
    return quantize(w.astype(q.dtype), q.qtype, q.block_size, q.axis, isinstance(q.scale, QArray),
                    zero_point=q.zero_point is not None, nested_block_size=nested)


def merge(qparams, adapters: dict[str, Adapter], *, requantize: bool = False,
          return_report: bool = False):
    """Fold adapters into the base: ``dequantize(W) + (alpha / rank) * a @ b`` per adapted kernel.

    Args:
      qparams: the quantized base tree; adapters: from ``init`` (trained).
      requantize: False: a float tree (every QArray dequantized to its original dtype).
        True: the adapted kernels quantized again in their base's format (qtype, block size, axis,
        zero point, double quant); other leaves as they were.
      return_report: also return one row per adapted kernel: ``path`` and ``rel_rms_error``, the
        error requantizing adds, ``||dequantize(requantized) - merged|| / ||merged||`` (0.0 without
        ``requantize``), plus ``update_norm``, ``||delta W|| / ||W||``.

    Returns:
      The merged tree, or ``(tree, report)`` with ``return_report``.

    Raises:
      AdapterError: an adapter that does not fit the tree.

    Example:
      >>> import flax.linen as nn, jax, jax.numpy as jnp, jaxquant as jq
      >>> params = nn.Dense(256).init(jax.random.key(0), jnp.ones((1, 512)))
      >>> qparams = jq.quantize_tree(params)
      >>> adapters = jq.lora.init(jax.random.key(1), qparams, rank=8, alpha=16.0)
      >>> merged = jq.lora.merge(qparams, adapters)
      >>> requant, report = jq.lora.merge(qparams, adapters, requantize=True, return_report=True)
    """
    check_adapters(qparams, adapters)
    report = []

    def fold(path, leaf):
        if not isinstance(leaf, QArray):
            return leaf
        name = path_str(path)
        if name not in adapters:
            return leaf if requantize else dequantize(leaf)
        merged = _merged(leaf, adapters[name])
        base = dequantize(leaf, jnp.float32)
        row = dict(path=name, update_norm=float(jnp.linalg.norm(merged - base) / jnp.linalg.norm(base)),
                   rel_rms_error=0.0)
        if requantize:
            out = _like(merged, leaf)
            err = dequantize(out, jnp.float32) - merged
            row["rel_rms_error"] = float(jnp.linalg.norm(err) / jnp.linalg.norm(merged))
        else:
            out = merged.astype(leaf.dtype)
        report.append(row)
        return out

    tree = jax.tree_util.tree_map_with_path(fold, qparams, is_leaf=lambda x: isinstance(x, QArray))
    return (tree, report) if return_report else tree
