"""Fused dequantize-matmul for Hopper (sm90) on the Pallas Mosaic GPU backend.

Terms: W[K, N] is stored as codes ``(N, K/2)`` (two 4-bit codes per byte) with one constant per
*block* of ``block_size`` consecutive k. A *tile* is what one warpgroup computes: 64 output
features (the wgmma M side) by ``m_pad`` tokens (the wgmma N side), so small batches (decode) do
not waste the 64-row side of the tensor core on padding. A *step* is ``tile_k`` elements of K
streamed through shared memory by ``emit_pipeline``.

The codes are read as int32 words (8 codes each) and decoded in registers by ``prmt`` table
lookups straight into wgmma's register operand layout (``nibble_lut``); x's contraction axis is
permuted once in XLA to match, so no data moves between threads. The block constants are read
from the QArray's own storage (double-quantized ones decoded in registers, ``block_constants``),
one step ahead of their use.
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
from jaxquant._src.kernels import block_constants, nibble_lut, platform
from jaxquant._src.qarray import QArray

TILE_N = 64  # output features per warpgroup: the wgmma M dimension


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    tile_k: int = 256  # elements of K per pipeline step (32 code words per row)
    max_concurrent_steps: int = 4  # at most: fewer when the steps' buffers pass STAGE_BUDGET
    k_splits: int | None = None  # split-K: CTAs per output tile; None picks enough to fill the GPU
    target_ctas: int | None = None  # None: 528 (4 per SM) up to 32 tokens, 256 beyond
    probe: str = ""  # experiments only: "load" skips all compute, "noconst" the constant loads


def _k_splits(k: int, n: int, m_pad: int, bs: BlockSizes) -> int:
    """How many ways to split K so that (N/64) x splits CTAs fill the GPU, >= 2 steps each.

    Fewer CTAs are wanted for many tokens: each split writes float32 partial sums of
    N x tokens that XLA reads back, 29 MB at 4096x14336 and 128 tokens in 4 splits, and at 64+
    tokens that cost more than fuller waves gain (BUILD_NOTES, session 4)."""
    if bs.k_splits:
        return bs.k_splits
    target = bs.target_ctas or (528 if m_pad <= 32 else 256)
    steps, tiles = k // bs.tile_k, n // TILE_N
    best = 1
    for s in range(1, steps // 2 + 1):
        if steps % s == 0 and tiles * s <= 2 * target:
            best = s
            if tiles * s >= target:
                break
    return best


MAX_TOKENS = 128  # tokens ride on the wgmma N side, padded to a multiple of 8 (wgmma N <= 256)


def _pad_tokens(m: int) -> int:
    return -(-m // 8) * 8


def can_use(x, q: QArray, compute_dtype) -> bool:
    """Whether the kernel handles these inputs on this backend (else callers fall back to XLA)."""
    try:
        _check_supported(x, q, compute_dtype)
    except NotImplementedError:
        return False
    return platform.hopper_present()


def _fit_tile_k(k: int, block_size: int, bs: BlockSizes, m_pad: int) -> BlockSizes:
    """Shorter steps for a K that the default step does not divide (SmolLM2's 576, say), and
    for many tokens, so that two steps of x still fit the stage budget."""
    longest = bs.tile_k
    while longest > 64 and _step_bytes(longest, m_pad) > STAGE_BUDGET:
        longest //= 2
    for tile_k in (longest, 128, 64):
        if k % tile_k == 0 and (tile_k % block_size == 0 or block_size % tile_k == 0):
            return dataclasses.replace(bs, tile_k=tile_k)
    return bs


STAGE_BUDGET = 48 * 1024  # shared memory for the pipelined steps: 4 CTAs fit an SM's 228 KB


def _step_bytes(tile_k: int, m_pad: int) -> int:
    return TILE_N * tile_k // 2 + m_pad * tile_k * 2  # codes + x


def _fit_stages(bs: BlockSizes, m_pad: int) -> BlockSizes:
    """Fewer pipeline stages (>= 2) for many tokens, so that 4 CTAs still share an SM: with 64
    tokens, 4 stages took 160 KB, one CTA per SM, and ran 1.4x slower (BUILD_NOTES, kernel v4)."""
    stages = max(2, min(bs.max_concurrent_steps, STAGE_BUDGET // _step_bytes(bs.tile_k, m_pad)))
    return dataclasses.replace(bs, max_concurrent_steps=stages)


def _check_supported(x, q: QArray, compute_dtype,
                     block_sizes: BlockSizes = BlockSizes()) -> BlockSizes:
    """The block sizes the kernel will use for these inputs, or NotImplementedError."""
    k, n = q.shape
    m = int(np.prod(x.shape[:-1]))
    block_sizes = _fit_tile_k(k, q.block_size, block_sizes, _pad_tokens(m))
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
        why = f"{m} tokens (the kernel takes up to {MAX_TOKENS})"
    if why:
        raise NotImplementedError(f"qmatmul_mgpu does not handle {why}")
    return _fit_stages(block_sizes, _pad_tokens(m))


def _decode_chunk(codes, scale, chunk, values, dtype):
    """Operand columns ``64 chunk ..`` of the step, decoded in registers by inline PTX."""
    @plgpu.inline_mgpu(
        arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)),
        return_type=plgpu.ShapeDtypeStruct((TILE_N, nibble_lut.CHUNK), dtype,
                                           layout=plgpu.Layout.WGMMA))
    def decode(_, codes, scale):
        return nibble_lut.decode_registers(codes, scale, chunk, values, dtype)
    return decode(codes, scale)


def _step_constants(consts_gmem, dq_gmem, ni, first_block, *, blocks, row_length, nested_block,
                    interpret):
    """The float32 constants of a step's ``blocks`` blocks for this tile's 64 rows: a list of
    (64,) arrays. ``dq_gmem`` = (dynamic8 table, nested scales, offset) or () for plain float32."""
    window = consts_gmem.at[pl.ds(ni * TILE_N, TILE_N), pl.ds(first_block, blocks)]
    if interpret:
        table, nested, offset = (ref[...] for ref in dq_gmem) if dq_gmem else (None,) * 3
        values = block_constants.reference(
            window[...], table, nested, offset, tile_row=ni * TILE_N, first_block=first_block,
            row_length=row_length, nested_block=nested_block)
        return [values[:, j] for j in range(blocks)]

    @plgpu.inline_mgpu(
        arg_types=(plgpu.RefType(),) * (1 + len(dq_gmem)),
        return_type=[plgpu.ShapeDtypeStruct((TILE_N,), jnp.float32,
                                            layout=plgpu.Layout.WGMMA.reduce(1))] * blocks)
    def load(_, codes, *dq):
        return block_constants.registers(codes, *(dq or (None,) * 3), blocks=blocks,
                                         row_length=row_length, nested_block=nested_block)
    return load(window, *dq_gmem)


def _kernel(words_gmem, x_gmem, consts_gmem, *refs, k, m_pad, block_size, nested_block, values,
            compute_dtype, bs: BlockSizes, splits: int, interpret: bool):
    *dq_gmem, out_gmem = refs
    ni = lax.axis_index("n")
    si = lax.axis_index("s")
    steps = k // bs.tile_k // splits  # pipeline steps of this CTA's share of K
    first = si * steps
    words = bs.tile_k // 8  # int32 code words per row per step
    chunk = nibble_lut.CHUNK
    blocks = max(1, bs.tile_k // block_size)  # constants per row per step

    def constants(kk):
        return _step_constants(consts_gmem, dq_gmem, ni, (first + kk) * bs.tile_k // block_size,
                               blocks=blocks, row_length=k // block_size,
                               nested_block=nested_block, interpret=interpret)

    def step(idx, codes_smem, x_smem, consts, acc_ref, a_smem):
        # the next step's constants: their loads overlap this step's decode
        if bs.probe == "load":
            return consts
        next_consts = (consts if bs.probe == "noconst"
                       else constants(lax.min(idx[0] + 1, steps - 1)))
        if not interpret:
            codes = plgpu.load(codes_smem, layout=plgpu.Layout.WGMMA)
        for j in range(bs.tile_k // chunk):
            s = consts[j * chunk // block_size % blocks]
            # x is stored (tokens, k), k-major: wgmma reads it as the transposed B operand
            x_chunk = x_smem.at[:, pl.ds(j * chunk, chunk)].transpose((1, 0))
            if interpret:  # same values through jnp; the interpreter's wgmma reads A from smem
                a_smem[...] = nibble_lut.decode_reference(
                    codes_smem[:, pl.ds(j * 8, 8)], s, values, compute_dtype)
                plgpu.commit_smem()
                plgpu.wgmma(acc_ref, a_smem, x_chunk)
                plgpu.wgmma_wait(0)
            else:
                plgpu.wgmma(acc_ref, _decode_chunk(codes, s, j, values, compute_dtype), x_chunk)
        plgpu.wgmma_wait(0)  # the pipeline reuses this step's buffers after we return
        return next_consts

    x_transforms = (plgpu.TilingTransform((8, chunk)), plgpu.SwizzleTransform(2 * chunk))
    codes_swizzle = plgpu.find_swizzle(words * 32)
    codes_transforms = (plgpu.TilingTransform((8, codes_swizzle // 4)),
                        plgpu.SwizzleTransform(codes_swizzle))

    def acc_scope(acc_ref, a_smem=None):
        plgpu.emit_pipeline(
            lambda idx, codes, x, carry: step(idx, codes, x, carry, acc_ref, a_smem),
            grid=(steps,),
            in_specs=[
                plgpu.BlockSpec((TILE_N, words), lambda kk: (ni, first + kk),
                                transforms=codes_transforms),
                plgpu.BlockSpec((m_pad, bs.tile_k), lambda kk: (0, first + kk),
                                transforms=x_transforms),
            ],
            max_concurrent_steps=bs.max_concurrent_steps,
            init_carry=constants(0),
        )(words_gmem, x_gmem)
        return acc_ref[...]

    acc_type = plgpu.ACC((TILE_N, m_pad))
    if interpret:  # the interpreter allocates registers and shared memory in separate scopes
        acc = pl.run_scoped(lambda a_smem: pl.run_scoped(
            functools.partial(acc_scope, a_smem=a_smem), acc_type),
            plgpu.SMEM((TILE_N, chunk), compute_dtype))
    else:
        acc = pl.run_scoped(acc_scope, acc_type)

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
    block_sizes = _check_supported(x, q, compute_dtype, block_sizes)
    k, n = q.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).astype(compute_dtype)
    m = x2.shape[0]
    m_pad = _pad_tokens(m)
    x2 = jnp.pad(x2, ((0, m_pad - m), (0, 0)))
    xp = x2[:, nibble_lut.permute_k(k)]  # (m_pad, K), in the decoded operand's k order
    words = lax.bitcast_convert_type(q.codes.reshape(n, k // 8, 4), jnp.int32)  # (N, K/8)
    if isinstance(q.scale, QArray):  # double quant: dynamic8 codes, nested scales, offset
        nested = q.scale
        consts = [nested.codes.reshape(n, k // q.block_size),
                  jnp.asarray(codebooks.QTYPES[nested.qtype].values, jnp.float32),
                  nested.scale.reshape(-1), nested.offset.reshape(1)]
        nested_block = nested.block_size
    else:
        consts, nested_block = [q.scale.reshape(n, k // q.block_size)], None
    splits = _k_splits(k, n, m_pad, block_sizes)
    kernel = functools.partial(
        _kernel, k=k, m_pad=m_pad, block_size=q.block_size, nested_block=nested_block,
        values=codebooks.QTYPES[q.qtype].values, compute_dtype=np.dtype(compute_dtype),
        bs=block_sizes, splits=splits, interpret=interpret)
    call = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((splits, n, m_pad), jnp.float32),
        grid=(n // TILE_N, splits), grid_names=("n", "s"),
        interpret=plgpu.InterpretGPUParams() if interpret else None)
    out_t = call(words, xp, *consts).sum(0)  # split-K partial sums
    return out_t[:, :m].T.reshape(*lead, n).astype(x.dtype)

