"""``quantize``: blockwise absmax, affine and double quantization of one array.

Terms (``layout.py``): a *row* is a run of ``L`` elements the blocks are cut from, a *block* is
``block_size`` consecutive elements of a row, each block gets one constant. The arithmetic is in
``encode.py``; this module picks the path (the Hopper kernel, the in-place blocks off the CPU, or
the rows) and checks the input at the boundary.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src import layout
from jaxquant._src.config import QuantConfig
from jaxquant._src.encode import quantize_in_place, quantize_rows
from jaxquant._src.kernels import platform, quantize_mgpu
from jaxquant._src.nested import quantize_nested
from jaxquant._src.qarray import QArray, blocked_shape


def _check_dtype(x) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(f"quantize needs a float32, bfloat16 or float16 array, got dtype={dtype}")


@functools.partial(jax.jit, static_argnames=("cfg",))
def quantize_array(x: jax.Array, cfg: QuantConfig) -> QArray:
    """``quantize`` for a float ``x`` and a validated ``cfg`` (``QuantConfig.validated``), jitted."""
    if isinstance(cfg.axis, tuple):  # merged axes: stored as the merged array's (layout.py)
        shape, axis = layout.merge(x.shape, cfg.axis)
        q = quantize_array(x.reshape(shape), dataclasses.replace(cfg, axis=axis))
        return dataclasses.replace(q, shape=tuple(x.shape), axis=cfg.axis)
    rest, length = blocked_shape(x.shape, cfg.axis)
    block_size = cfg.block_size or max(length, 1)
    xla_path = functools.partial(quantize_rows, cfg=cfg, block_size=block_size)

    def kernel_path(x):  # one pass on Hopper; blocks never straddle rows here
        codes, scale = quantize_mgpu.quantize_blocks(x, cfg.qtype)
        return codes.reshape(*rest, -1), scale.reshape(*rest, -1), None

    if (cfg.axis is None or cfg.axis == x.ndim - 1 and length % block_size == 0) and \
            quantize_mgpu.can_use(x, cfg.qtype, block_size, cfg.zero_point):
        codes, scale, zero_point = platform.kernel_or_xla("cuda", kernel_path, xla_path, x)
    elif cfg.axis is not None and cfg.axis != x.ndim - 1 and length % block_size == 0 \
            and length % 2 == 0 and x.size:
        # off the CPU, where XLA's transposed copy of the input cost more than the quantizing
        in_place = functools.partial(quantize_in_place, cfg=cfg, block_size=block_size)
        codes, scale, zero_point = jax.lax.platform_dependent(x, cpu=xla_path, default=in_place)
    else:
        codes, scale, zero_point = xla_path(x)
    if cfg.double_quant:
        scale = quantize_nested(scale, cfg.nested_block_size)
    return QArray(codes, scale, zero_point, None, shape=tuple(x.shape), dtype=np.dtype(x.dtype),
                  qtype=cfg.qtype, block_size=block_size, axis=cfg.axis)


def _nonfinite_report(x: jax.Array) -> str:
    bad = ~np.isfinite(np.asarray(x, dtype=np.float32))
    where = [tuple(int(i) for i in idx) for idx in np.argwhere(bad)[:5]]
    return (f"quantize got {int(bad.sum())} non-finite value(s) (NaN or Inf) of {bad.size}, first at "
            f"index {where}; clean the input or pass check_finite=False (under jit the constant of a "
            f"block holding one becomes NaN and the block dequantizes to NaN; with double "
            f"quantization, so do the blocks sharing its nested block of constants)")


def quantize(x, qtype: str = "nf4", block_size: int | None = 64, axis: int | None = None,
             double_quant: bool = False, *, zero_point: bool = False, nested_block_size: int = 256,
             check_finite: bool = True) -> QArray:
    """Quantize ``x`` blockwise to ``qtype``.

    Args:
      x: float32, bfloat16 or float16 array of any shape (float64 numpy input becomes float32).
      qtype: ``"nf4"``, ``"fp4"`` (bitsandbytes' tables), ``"int4"``, ``"int8"`` (uniform grids) or
        ``"dynamic8"`` (bitsandbytes' signed 8-bit dynamic map).
      block_size: elements per block (any positive int); None for one block per row (per-tensor
        with ``axis=None``, per-channel with ``axis=k``).
      axis: None: blocks are consecutive runs of the row-major flattening (bitsandbytes). k: blocks
        run along axis k (for a matmul weight ``W[K, N]``, ``axis=0``, the contraction axis).
      double_quant: quantize the float32 block constants again (mean offset, dynamic8, blocks of
        ``nested_block_size``) as QLoRA does (arXiv 2305.14314).
      zero_point: affine quantization (int4/int8 only): ``x ≈ (code - zero_point) * scale``.
      check_finite: raise on NaN/Inf in a concrete ``x`` (costs one host sync). Under ``jax.jit``
        nothing is raised: such a block's constant becomes NaN and it dequantizes to NaN (with
        double quantization, every block of its nested block of ``nested_block_size`` constants).

    Returns:
      A ``QArray``; ``dequantize`` undoes it (see ``QArray`` for the invariant).

    Raises:
      TypeError: ``x`` is not a float array. ValueError: bad qtype, block size or axis,
      ``zero_point=True`` with a table type, or non-finite values.

    Example:
      >>> import jax, jaxquant as jq
      >>> w = jax.random.normal(jax.random.key(0), (256, 128))
      >>> q = jq.quantize(w, "nf4", block_size=64, axis=0, double_quant=True)
      >>> round(jq.bits_per_param(q), 3)
      4.128
    """
    if not isinstance(x, jax.Array):
        x = np.asarray(x)
    _check_dtype(x)
    if not isinstance(x, jax.Array) and x.dtype == np.float64:
        x = x.astype(np.float32)
    x = jnp.asarray(x)
    cfg = QuantConfig(qtype, block_size, axis, zero_point, double_quant, nested_block_size)
    cfg = cfg.validated(x.ndim)
    q = quantize_array(x, cfg)
    if check_finite:
        raise_if_nonfinite(x, q)
    return q


def raise_if_nonfinite(x, q: QArray) -> None:
    """Raise ValueError if a concrete ``x`` held NaN/Inf (read off ``q``'s block constants, NaN
    for such a block: one host sync); nothing for a tracer or an abstract array."""
    if isinstance(x, jax.core.Tracer) or not isinstance(q.codes, jax.Array) \
            or isinstance(q.codes, jax.core.Tracer):
        return
    constants = q.scale.scale if q.double_quant else q.scale
    if not bool(jnp.isfinite(constants).all()):
        raise ValueError(_nonfinite_report(x))
