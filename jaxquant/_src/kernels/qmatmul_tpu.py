"""Fused dequantize-matmul as a Pallas TPU (Mosaic) kernel. Tested in interpret mode only.

Terms as in ``qmatmul_mgpu``: W[K, N] stored as codes ``(N, K/2)``, constants ``(N, K/bs)``. The
grid runs over (output tiles of ``tile_n`` features, steps of ``tile_k`` along K); each step
decodes a ``(tile_n, tile_k/2)`` tile of high and low nibbles (select tree), scales them by their
block constants and accumulates ``x_even @ hi^T + x_odd @ lo^T`` into the float32 output block,
which stays resident across the K steps (K is the innermost, "arbitrary" grid axis). Block shapes
follow TPU tiling: the last two dims multiples of (8, 128) or whole dims, hence the constants are
loaded as whole rows (``K/bs`` is small) and sliced per step.

Not measured on TPU hardware (none here); ``lower_for_tpu`` in the tests checks that Mosaic TPU
accepts the kernel.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jaxquant._src import codebooks
from jaxquant._src.dequantize import block_scale
from jaxquant._src.kernels import platform
from jaxquant._src.kernels.nibble_lut import select_decode
from jaxquant._src.matmul_xla import qmatmul_xla
from jaxquant._src.qarray import QArray


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """How the TPU kernel tiles one call (not tuned: no TPU to measure on).

    Attributes:
      tile_n: output features per grid step (a multiple of 128, the lane width).
      tile_k: elements of K per grid step (``tile_k / 2`` code bytes per row).
    """

    tile_n: int = 128
    tile_k: int = 256


def check_supported(x, q: QArray, compute_dtype, bs: BlockSizes = BlockSizes()) -> None:
    """NotImplementedError for what the kernel does not handle."""
    k, n = q.shape
    why = None
    if x.size == 0:  # qmatmul returns the empty result before choosing a kernel
        why = "an empty x (no tokens)"
    elif q.qtype not in ("nf4", "fp4", "int4") or q.zero_point is not None:
        why = f"qtype {q.qtype!r} (zero_point={q.zero_point is not None})"
    elif k % bs.tile_k or n % bs.tile_n:
        why = f"shape K={k}, N={n} (needs K % {bs.tile_k} == 0 and N % {bs.tile_n} == 0)"
    elif bs.tile_k % q.block_size or q.block_size % 2:
        why = f"block_size {q.block_size} (must divide tile_k={bs.tile_k})"
    if why:
        raise NotImplementedError(f"qmatmul_tpu does not handle {why}")


def can_use(x, q: QArray, compute_dtype) -> bool:
    """Whether ``auto`` runs this kernel: supported, and a TPU in the process."""
    try:
        check_supported(x, q, compute_dtype)
    except NotImplementedError:
        return False
    return platform.tpu_present()


def reference(x, q: QArray, compute_dtype=jnp.bfloat16) -> jax.Array:
    """What the kernel computes: the XLA path, ``x @ dequantize(q)`` with float32 accumulation."""
    return qmatmul_xla(x, q, compute_dtype)


def _kernel(xe_ref, xo_ref, codes_ref, scales_ref, out_ref, *, values, block_size, tile_k,
            compute_dtype):
    step = pl.program_id(1)

    @pl.when(step == 0)
    def _():
        out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

    c = codes_ref[...].astype(jnp.int32)
    per_step = tile_k // block_size
    s = scales_ref[:, pl.ds(step * per_step, per_step)]  # (tile_n, blocks in this step)
    s = jnp.repeat(s, block_size // 2, axis=1)  # one constant per code byte column
    hi = (select_decode(c >> 4, values, jnp.float32) * s).astype(compute_dtype)
    lo = (select_decode(c & 0xF, values, jnp.float32) * s).astype(compute_dtype)
    dims = (((1,), (1,)), ((), ()))
    acc = jax.lax.dot_general(xe_ref[...], hi, dims, preferred_element_type=jnp.float32)
    acc += jax.lax.dot_general(xo_ref[...], lo, dims, preferred_element_type=jnp.float32)
    out_ref[...] += acc


@functools.partial(jax.jit, static_argnames=("compute_dtype", "interpret", "block_sizes"))
def qmatmul(x: jax.Array, q: QArray, *, compute_dtype=jnp.bfloat16, interpret=False,
            block_sizes: BlockSizes = BlockSizes()) -> jax.Array:
    """``x @ dequantize(q)`` through the TPU kernel; NotImplementedError for what it does not
    handle. ``interpret=True`` runs it in the Pallas interpreter (on CPU)."""
    check_supported(x, q, compute_dtype, block_sizes)
    bs = block_sizes
    k, n = q.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).astype(compute_dtype)
    m = x2.shape[0]
    m_pad = -(-m // 8) * 8
    x2 = jnp.pad(x2, ((0, m_pad - m), (0, 0)))
    xe, xo = x2[:, 0::2], x2[:, 1::2]
    scales = block_scale(q)  # (N, K/bs) float32
    kernel = functools.partial(_kernel, values=codebooks.QTYPES[q.qtype].values,
                               block_size=q.block_size, tile_k=bs.tile_k,
                               compute_dtype=np.dtype(compute_dtype))
    out = pl.pallas_call(
        kernel,
        grid=(n // bs.tile_n, k // bs.tile_k),
        in_specs=[pl.BlockSpec((m_pad, bs.tile_k // 2), lambda j, s: (0, s)),
                  pl.BlockSpec((m_pad, bs.tile_k // 2), lambda j, s: (0, s)),
                  pl.BlockSpec((bs.tile_n, bs.tile_k // 2), lambda j, s: (j, s)),
                  pl.BlockSpec((bs.tile_n, k // q.block_size), lambda j, s: (j, 0))],
        out_specs=pl.BlockSpec((m_pad, bs.tile_n), lambda j, s: (0, j)),
        out_shape=jax.ShapeDtypeStruct((m_pad, n), jnp.float32),
        interpret=interpret,
    )(xe, xo, q.codes, scales)
    return out[:m].reshape(*lead, n).astype(x.dtype)
