"""Fused dequantize-matmul for Hopper (sm90) on the Pallas Mosaic GPU backend.

Terms: W[K, N] is stored as codes ``(N, K/2)`` (two 4-bit codes per byte, even k in the high
nibble) with one constant per *block* of ``block_size`` consecutive k. A *tile* is what one
warpgroup computes: 64 output features (the wgmma M side) by ``m_pad`` tokens (the wgmma N side),
so small batches (decode) do not waste the 64-row side of the tensor core on padding. A *step*
is ``tile_k`` elements of K streamed through shared memory by ``emit_pipeline``.

Since a dot product does not care about the order of k, the kernel never interleaves nibbles:
``out^T = hi(W^T) @ x_even^T + lo(W^T) @ x_odd^T``, with x split into its even and odd columns
once in XLA (x is small next to W). Codes are decoded in registers (16-way select), multiplied by
their block's constant, cast to bf16/fp16 and fed to ``wgmma`` as the register operand.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxquant._src import codebooks
from jaxquant._src.qarray import QArray
from jaxquant._src.quantize import _constants

TILE_N = 64  # output features per warpgroup: the wgmma M dimension


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    tile_k: int = 256  # elements of K per pipeline step (128 code bytes per row)
    max_concurrent_steps: int = 4
    k_splits: int | None = None  # split-K: CTAs per output tile; None picks enough to fill the GPU
    target_ctas: int = 528  # 4 per SM on a 132-SM H100
    # float32: decode and scale in f32, round once (bit-identical to the XLA path); the compute
    # dtype: table values and scales rounded first (fewer instructions, within bf16 tolerance).
    decode_in_compute_dtype: bool = False
    # Feed the decoded tile to wgmma from registers (no shared-memory round trip). GPU only: the
    # Pallas GPU interpreter models wgmma with A in shared memory alone.
    a_in_registers: bool = False


def _k_splits(k: int, n: int, bs: BlockSizes) -> int:
    """How many ways to split K so that (N/64) x splits CTAs fill the GPU, >= 2 steps each."""
    if bs.k_splits:
        return bs.k_splits
    steps, tiles = k // bs.tile_k, n // TILE_N
    best = 1
    for s in range(1, steps // 2 + 1):
        if steps % s == 0 and tiles * s <= 2 * bs.target_ctas:
            best = s
            if tiles * s >= bs.target_ctas:
                break
    return best


MAX_TOKENS = 32  # m_pad 16 or 32: A's 32-element sub-tiles cover a 32 or 64 B swizzle


def _pad_tokens(m: int) -> int:
    return max(16, -(-m // 16) * 16)


def can_use(x, q: QArray, compute_dtype) -> bool:
    """Whether the kernel handles these inputs on this backend (else callers fall back to XLA)."""
    try:
        _check_supported(x, q, compute_dtype)
    except NotImplementedError:
        return False
    dev = jax.devices()[0]
    return dev.platform == "gpu" and getattr(dev, "compute_capability", "") == "9.0"


def _check_supported(x, q: QArray, compute_dtype, block_sizes: BlockSizes = BlockSizes()):
    k, n = q.shape
    m = int(np.prod(x.shape[:-1]))
    why = None
    if q.qtype not in ("nf4", "fp4", "int4") or q.zero_point is not None:
        why = f"qtype {q.qtype!r} (zero_point={q.zero_point is not None})"
    elif np.dtype(compute_dtype) not in (np.dtype(jnp.bfloat16), np.dtype(jnp.float16)):
        why = f"compute dtype {np.dtype(compute_dtype)}"
    elif q.block_size % 64 or block_sizes.tile_k % q.block_size and q.block_size % block_sizes.tile_k:
        why = f"block_size {q.block_size} (needs a multiple of 64)"
    elif k % block_sizes.tile_k or n % TILE_N:
        why = f"shape K={k}, N={n} (needs K % {block_sizes.tile_k} == 0 and N % {TILE_N} == 0)"
    elif m > MAX_TOKENS:
        why = f"{m} tokens (the small-batch kernel takes up to {MAX_TOKENS})"
    if why:
        raise NotImplementedError(f"qmatmul_mgpu does not handle {why}")


def _decode(codes: jax.Array, values: np.ndarray, dtype=jnp.float32) -> jax.Array:
    """4-bit codes -> table values in ``dtype``, by a select tree on the code's bits."""
    level = [jnp.asarray(v, dtype) for v in values]
    for bit in range(4):
        set_ = (codes & (1 << bit)) != 0
        level = [jnp.where(set_, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def _kernel(codes_gmem, scales_gmem, xe_gmem, xo_gmem, out_gmem, *, k, m_pad, block_size,
            values, compute_dtype, bs: BlockSizes, splits: int):
    ni = lax.axis_index("n")
    si = lax.axis_index("s")
    steps = k // bs.tile_k // splits  # pipeline steps of this CTA's share of K
    first = si * steps
    decode_dtype = compute_dtype if bs.decode_in_compute_dtype else jnp.float32
    tile_kb = bs.tile_k // 2  # code bytes (and x rows of each parity) per step
    sub = min(block_size, bs.tile_k) // 2  # bytes per scale group within a step
    scale_rows = max(1, bs.tile_k // block_size)

    def step(_, codes_smem, scales_smem, xe_smem, xo_smem, acc_ref, a_hi, a_lo):
        for j in range(tile_kb // sub):
            c = codes_smem[:, pl.ds(j * sub, sub)].astype(jnp.int32)  # no 8-bit arithmetic in regs
            s = plgpu.load(scales_smem.at[(j * sub * 2) // block_size % scale_rows],
                           layout=plgpu.Layout.WGMMA.reduce(1))
            s = lax.broadcast_in_dim(s.astype(decode_dtype), (TILE_N, sub), [0])
            # The decoded tile goes through shared memory: wgmma reads A from there (the GPU
            # interpreter, which CI runs, only models that form). Two buffers, so the decode of
            # sub-tile j overlaps the wgmma of j - 1.
            hi = (_decode(c >> 4, values, decode_dtype) * s).astype(compute_dtype)
            lo = (_decode(c & 0xF, values, decode_dtype) * s).astype(compute_dtype)
            if bs.a_in_registers:
                plgpu.wgmma(acc_ref, hi, xe_smem.at[pl.ds(j * sub, sub)])
                plgpu.wgmma(acc_ref, lo, xo_smem.at[pl.ds(j * sub, sub)])
                continue
            slot = j % 2
            a_hi[slot] = hi
            a_lo[slot] = lo
            plgpu.commit_smem()
            plgpu.wgmma(acc_ref, a_hi.at[slot], xe_smem.at[pl.ds(j * sub, sub)])
            plgpu.wgmma(acc_ref, a_lo.at[slot], xo_smem.at[pl.ds(j * sub, sub)])
            plgpu.wgmma_wait(2)  # the pair of sub-tile j - 1 is done: its slot can be rewritten
        plgpu.wgmma_wait(0)  # the pipeline reuses this step's buffers after we return
        return acc_ref

    x_swizzle = plgpu.find_swizzle(m_pad * 16, "rhs")
    x_transforms = (plgpu.TilingTransform((8, x_swizzle // 2)), plgpu.SwizzleTransform(x_swizzle))
    # index maps return block indices: a step holds scale_rows rows of constants, or (blocks
    # longer than a step) one row shared by block_size / tile_k steps
    scale_k = lambda kk: ((first + kk) if block_size <= bs.tile_k else
                          (first + kk) * bs.tile_k // block_size, ni)

    a_swizzle = x_swizzle  # wgmma needs both operands in the same swizzle
    a_type = plgpu.SMEM((2, TILE_N, sub), compute_dtype, transforms=(
        plgpu.TilingTransform((8, a_swizzle // 2)), plgpu.SwizzleTransform(a_swizzle)))

    def scope(a_hi, a_lo):
        return pl.run_scoped(functools.partial(acc_scope, a_hi=a_hi, a_lo=a_lo),
                             plgpu.ACC((TILE_N, m_pad)))

    def acc_scope(acc_ref, a_hi, a_lo):
        plgpu.emit_pipeline(
            lambda idx, *refs: step(idx, *refs, acc_ref, a_hi, a_lo),
            grid=(steps,),
            in_specs=[
                plgpu.BlockSpec((TILE_N, tile_kb), lambda kk: (ni, first + kk)),
                plgpu.BlockSpec((scale_rows, TILE_N), scale_k),
                plgpu.BlockSpec((tile_kb, m_pad), lambda kk: (first + kk, 0), transforms=x_transforms),
                plgpu.BlockSpec((tile_kb, m_pad), lambda kk: (first + kk, 0), transforms=x_transforms),
            ],
            max_concurrent_steps=bs.max_concurrent_steps,
        )(codes_gmem, scales_gmem, xe_gmem, xo_gmem)
        return acc_ref[...]

    if bs.a_in_registers:  # no A scratch: less shared memory, more CTAs per SM
        acc = pl.run_scoped(functools.partial(acc_scope, a_hi=None, a_lo=None), plgpu.ACC((TILE_N, m_pad)))
    else:
        acc = pl.run_scoped(scope, a_type, a_type)

    @functools.partial(pl.run_scoped, out_smem=plgpu.SMEM((TILE_N, m_pad), jnp.float32))
    def _store(out_smem):
        out_smem[...] = acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[si, pl.ds(ni * TILE_N, TILE_N)])
        plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("compute_dtype", "interpret", "block_sizes"))
def qmatmul(x: jax.Array, q: QArray, *, compute_dtype=jnp.bfloat16, interpret=False,
            block_sizes: BlockSizes = BlockSizes()) -> jax.Array:
    """``x @ dequantize(q)`` through the kernel; NotImplementedError for what it does not handle."""
    _check_supported(x, q, compute_dtype, block_sizes)
    k, n = q.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).astype(compute_dtype)
    m = x2.shape[0]
    m_pad = _pad_tokens(m)
    x2 = jnp.pad(x2, ((0, m_pad - m), (0, 0)))
    xe, xo = x2[:, 0::2].T, x2[:, 1::2].T  # (K/2, m_pad) each
    scales = _constants(q).T  # (K/bs, N) float32
    splits = _k_splits(k, n, block_sizes)
    kernel = functools.partial(
        _kernel, k=k, m_pad=m_pad, block_size=q.block_size,
        values=codebooks.QTYPES[q.qtype].values, compute_dtype=np.dtype(compute_dtype),
        bs=block_sizes, splits=splits)
    call = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((splits, n, m_pad), jnp.float32),
        grid=(n // TILE_N, splits), grid_names=("n", "s"),
        interpret=plgpu.InterpretGPUParams() if interpret else None)
    out_t = call(q.codes, scales, xe, xo).sum(0)  # split-K partial sums
    return out_t[:, :m].T.reshape(*lead, n).astype(x.dtype)


def reference(x, q, compute_dtype=jnp.bfloat16):
    """What the kernel computes: the XLA path."""
    from jaxquant._src.matmul import qmatmul_xla
    return qmatmul_xla(x, q, compute_dtype)
