"""Fused dequantize-matmul for Hopper (sm90) on the Pallas Mosaic GPU backend.

Terms: W[K, N] is stored as codes ``(N, K/2)`` (two 4-bit codes per byte) with one constant per
*block* of ``block_size`` consecutive k. A *tile* is what one warpgroup computes: 64 output
features (the wgmma M side) by ``m_pad`` tokens (the wgmma N side), so small batches (decode) do
not waste the 64-row side of the tensor core on padding. A *step* is ``tile_k`` elements of K
streamed through shared memory by ``emit_pipeline``.

The codes are read as int32 words (8 codes each) and decoded straight into wgmma's register
operand layout (``nibble_lut``): with the default block sizes by one shared-memory load per
code byte from a byte-pair table, in stored k order, so x is read as it is (fewer than 8 tokens
not even padded: the copies fill the rest with zeros); without a table by ``prmt`` lookups in
registers, with x's contraction axis permuted once in XLA to match, so no data moves between
threads. The block constants are read from the QArray's own storage (double-quantized ones
decoded in registers, ``block_constants``), one step ahead of their use.

Tokens beyond one CTA's tile (``token_tile``) run on a grid axis of token tiles, fastest-varying so
the CTAs sharing a weight tile read it from HBM once. Up to 64 tokens one warpgroup per CTA
(``FEW_TOKENS``); beyond, two warpgroups decode 64 rows each against one shared x tile and one
shared table, fed by a third that issues the copies (warp specialization): 256-token tiles
past 128 tokens where they make enough CTAs (``MANY_TOKENS``), else 128-token tiles with K split
to fill the GPU (``MID_TOKENS``). Without split-K each tile is stored transposed, in the output's
dtype, straight into the ``(tokens, N)`` result. Where 256-token tiles are short (K = 4096) and
many, one CTA per SM runs several of them as chained pipelines (``persistent_ctas``).
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


MAX_TOKENS = 128  # tokens per CTA, on the wgmma N side (padded to a multiple of 8, N <= 256)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    tile_k: int = 256  # elements of K per pipeline step (32 code words per row)
    max_concurrent_steps: int = 4  # at most: fewer when the steps' buffers pass STAGE_BUDGET
    k_splits: int | None = None  # split-K: CTAs per output tile; None picks enough to fill the GPU
    target_ctas: int | None = None  # None: 528 (4 per SM) up to 32 tokens, 256 beyond
    token_tile: int = MAX_TOKENS  # tokens per CTA; more tokens run as several token tiles
    compute_wgs: int = 1  # warpgroups per CTA sharing x: 1 (plain pipeline) or 2 (+1 for copies)
    table_copies: int = 0  # > 0: decode by a shared-memory byte-pair table with this many copies
    persistent_ctas: int = 0  # > 0, two warpgroups, K not split: at most this many CTAs, each
    # running several output tiles back to back (one table fill; the copies run on)
    probe: str = ""  # experiments only: "load" skips all compute, "noconst" the constant loads,
    # "nodecode" the register decode (wrong results), "tablefirst" fills the table before the
    # pipeline starts


def _rows_per_cta(bs: BlockSizes) -> int:
    return TILE_N * bs.compute_wgs


def _pad_tokens(m: int) -> int:
    return -(-m // 8) * 8


def _token_tiling(m: int, bs: BlockSizes) -> tuple[int, int]:
    """(tokens per CTA, tokens padded to a whole number of such tiles)."""
    tokens = min(_pad_tokens(m), bs.token_tile)
    return tokens, -(-m // tokens) * tokens


def _output_tiles(m: int, n: int, bs: BlockSizes) -> tuple[int, int]:
    """(token tiles, weight tiles): the CTA tiles of an (m tokens, n features) output."""
    tokens, m_pad = _token_tiling(m, bs)
    return m_pad // tokens, n // _rows_per_cta(bs)


def _k_splits(k: int, n: int, tokens: int, token_tiles: int, bs: BlockSizes) -> int:
    """How many ways to split K so that the output tiles x splits CTAs fill the GPU, >= 2 steps
    each; 1 (no split) when the output tiles alone fill it.

    Fewer CTAs are wanted for many tokens: each split writes float32 partial sums of
    N x tokens that XLA reads back, 29 MB at 4096x14336 and 128 tokens in 4 splits, and at 64+
    tokens that cost more than fuller waves gain (BUILD_NOTES, session 4)."""
    if bs.k_splits:
        return bs.k_splits
    target = bs.target_ctas or (528 if tokens <= 32 else 256)
    steps, tiles = k // bs.tile_k, n // _rows_per_cta(bs) * token_tiles
    best = 1
    for s in range(1, steps // 2 + 1):
        if steps % s == 0 and tiles * s <= 2 * target:
            best = s
            if tiles * s >= target:
                break
    return best


# auto leaves more tokens than this to XLA. At 2048 tokens the warp-specialized kernel with the
# table decode is 0.93x / 0.89-0.93x / 0.85-0.86x a bf16 dot (14336x4096 / 4096x4096 /
# 4096x14336) against XLA's dequantize + cuBLAS gemm at 0.85x / 0.84-0.85x / 0.85-0.86x (H100,
# BUILD_NOTES session 10), and it never materializes the bf16 weights.
AUTO_MAX_TOKENS = 2048
# Many tokens on a wide output: two warpgroups share 256-token x tiles (half the x traffic per
# weight row, each weight tile decoded once per 256 tokens) and write their tiles in place; with
# fewer than ~100 such tiles the GPU is not filled and 128-token tiles with split-K are faster
# (MID_TOKENS below; 4096x4096, 256 tokens: 23.9 vs 47.1 us, session 10). Both decode through
# one shared-memory byte-pair table (32 copies fit beside two 72 KB steps with the output stored
# in halves): at 2048 tokens 380.7 -> 349.5 us at 4096x14336, 388.1 -> 318.3 at 14336x4096.
# Short tiles (K = 4096: 32 steps) run persistent, one CTA per SM (132 on an H100 or H200; fewer
# where the GPU has fewer):
# 4096x14336 at 512 / 1024 / 2048 tokens 100.8 -> 93.2 / 198.7 -> 179.4 / 350.2 -> 325.8 us
# (session 11).
MANY_TOKENS = BlockSizes(tile_k=128, max_concurrent_steps=2, k_splits=1, token_tile=256,
                         compute_wgs=2, table_copies=32, persistent_ctas=132)
MANY_TOKENS_MIN_CTAS = 100
# 65-128 tokens (and more, see below): the same two warpgroups on 128-token tiles with a
# 32-copy table and 3 stages, K split so that ~one CTA per SM runs (112 = 4096x14336's tiles
# unsplit). At 128 tokens 42.8 -> 34.6 us (4096x14336), 44.6 -> 35.6-36.0 (14336x4096, 4
# splits), 18.1 -> 15.7 (4096x4096, 4 splits); with 2 stages 38.6 / 38.6 / 15.9. Also where
# 256-token tiles make too few CTAs: at 256 / 512 tokens 14336x4096 76.7 -> 59.8 / (XLA 134.7)
# -> 105.8 us, 4096x4096 28.0 -> 23.9 / (XLA 42.0) -> 33.5 (session 10).
MID_TOKENS = BlockSizes(tile_k=128, max_concurrent_steps=3, token_tile=128, compute_wgs=2,
                        table_copies=32, target_ctas=112)
MID_TOKENS_MAX = 128


# Up to 64 tokens the decode's integer-ALU work was the limit (68% busy at 1 token): a shared-
# memory byte-pair table moves it to the load/store unit. Its 32 KB fill per CTA pays with fewer,
# longer CTAs (~200, K not split at 4096x14336) and 2 stages (3 CTAs per SM). H100, whole call,
# 1 / 16 / 64 tokens: 4096x14336 24.2 -> 20.3 / 25.7 -> 21.0 / 35.8 -> 27.6 us; 14336x4096
# 26.9 -> 19.9 / 28.2 -> 21.6 / 31.1 -> 27.2; 4096x4096 9.9 -> 9.0 / 10.9 -> 9.9 / 14.1 -> 13.2
# (BUILD_NOTES session 8). Reading the codes in stored k order (no XLA pass over x) then took 1 /
# 16 / 64 tokens to 18.4 / 18.8 / 24.9 us, 18.5 / 19.4 / 25.7 and 7.8 / 8.0 / 10.8 (session 9).
FEW_TOKENS = BlockSizes(max_concurrent_steps=2, target_ctas=200, table_copies=32)
FEW_TOKENS_MAX = 64


def _default_for(m: int, n: int, bs: BlockSizes) -> BlockSizes:
    """The caller's block sizes, or for the defaults the ones that suit this many tokens."""
    if bs != BlockSizes():
        return bs
    if m <= FEW_TOKENS_MAX:
        return FEW_TOKENS
    if n % _rows_per_cta(MANY_TOKENS):
        return bs
    if m <= MID_TOKENS_MAX:
        return MID_TOKENS
    token_tiles, weight_tiles = _output_tiles(m, n, MANY_TOKENS)
    return MANY_TOKENS if token_tiles * weight_tiles >= MANY_TOKENS_MIN_CTAS else MID_TOKENS


# past this many tokens the one-warpgroup split-K kernel (now only for N not a multiple of 128 or
# the caller's block sizes) was 4-5% slower than XLA (4096x4096 and 14336x4096 at 512 tokens;
# bench_qmatmul, session 7)
AUTO_SPLIT_K_MAX_TOKENS = 256


def can_use(x, q: QArray, compute_dtype) -> bool:
    """Whether auto should run the kernel on these inputs on this backend (else XLA)."""
    try:
        sizes = _check_supported(x, q, compute_dtype)
    except NotImplementedError:
        return False
    m = int(np.prod(x.shape[:-1]))
    faster = m <= (AUTO_MAX_TOKENS if sizes.compute_wgs > 1 else AUTO_SPLIT_K_MAX_TOKENS)
    return faster and platform.hopper_present()


# Past this many steps per tile a CTA per tile is as fast: the fill and store a persistent CTA
# saves are ~1% of such a tile, and at 14336x4096 (112 steps) the chained pipelines were 2%
# slower (322.5 vs 315.9 us at 2048 tokens, H100, session 11)
PERSISTENT_MAX_STEPS = 64


def _persistent_ctas(tiles: int, steps: int, bs: BlockSizes) -> int:
    """How many CTAs share ``tiles`` output tiles of ``steps`` steps, the same number each, in
    as few rounds as ``persistent_ctas`` CTAs would take (896 tiles: 128 CTAs of 7); 0 (one CTA
    per tile) where that does not divide evenly, takes one round, the tiles are long, or the
    steps do not divide into the stages (the pipelines run on from tile to tile)."""
    if (not bs.persistent_ctas or steps > PERSISTENT_MAX_STEPS
            or steps % bs.max_concurrent_steps):
        return 0
    # more CTAs than SMs would run as a second wave (an H100 PCIe has 114)
    rounds = -(-tiles // min(bs.persistent_ctas, platform.hopper_sm_count() or bs.persistent_ctas))
    return tiles // rounds if rounds > 1 and tiles % rounds == 0 else 0


def _launch_grid(m: int, k: int, n: int, bs: BlockSizes) -> tuple[tuple[int, int], int, int]:
    """(output tiles (token, weight), ways K is split, persistent CTAs or 0) of a launch with
    the fitted block sizes ``bs``."""
    tokens, _ = _token_tiling(m, bs)
    tiles = _output_tiles(m, n, bs)
    splits = _k_splits(k, n, tokens, tiles[0], bs)
    return tiles, splits, _persistent_ctas(tiles[0] * tiles[1], k // bs.tile_k, bs)


def _fit_tile_k(k: int, block_size: int, bs: BlockSizes, tokens: int) -> BlockSizes:
    """Shorter steps for a K that the default step does not divide (SmolLM2's 576, say), and
    for many tokens, so that two steps of x still fit the stage budget."""
    longest = bs.tile_k
    # one step within the budget (4 CTAs per SM); warp specialized: two steps (1 CTA per SM)
    limit = _stage_budget(bs) // (2 if bs.compute_wgs > 1 else 1)
    while longest > 64 and _step_bytes(longest, tokens, bs.compute_wgs) > limit:
        longest //= 2
    for tile_k in (longest, 128, 64):
        if k % tile_k == 0 and (tile_k % block_size == 0 or block_size % tile_k == 0):
            return dataclasses.replace(bs, tile_k=tile_k)
    return bs


STAGE_BUDGET = 48 * 1024  # shared memory for the pipelined steps: 4 CTAs fit an SM's 228 KB
# a warp-specialized CTA has the SM to itself (registers): of the 227 KB a CTA may have, its
# steps and decode table take up to 176 KB, its output tile (stored in halves: 32 KB at 256
# tokens; float32 split-K partials at 128 tokens: 64 KB, with shorter steps) the rest
WS_STAGE_BUDGET = 176 * 1024


def _stage_budget(bs: BlockSizes) -> int:
    if bs.compute_wgs == 1:
        return STAGE_BUDGET
    return WS_STAGE_BUDGET - bs.table_copies * 1024  # the byte-pair table: 1 KB per copy


def _step_bytes(tile_k: int, tokens: int, compute_wgs: int = 1) -> int:
    return compute_wgs * TILE_N * tile_k // 2 + tokens * tile_k * 2  # codes + x


def _fit_stages(bs: BlockSizes, tokens: int) -> BlockSizes:
    """Fewer pipeline stages (>= 2) for many tokens, so that 4 CTAs still share an SM: with 64
    tokens, 4 stages took 160 KB, one CTA per SM, and ran 1.4x slower (BUILD_NOTES, kernel v4)."""
    step = _step_bytes(bs.tile_k, tokens, bs.compute_wgs)
    stages = max(2, min(bs.max_concurrent_steps, _stage_budget(bs) // step))
    return dataclasses.replace(bs, max_concurrent_steps=stages)


def _check_supported(x, q: QArray, compute_dtype,
                     block_sizes: BlockSizes = BlockSizes()) -> BlockSizes:
    """The block sizes the kernel will use for these inputs, or NotImplementedError."""
    k, n = q.shape
    m = int(np.prod(x.shape[:-1]))
    block_sizes = _default_for(m, n, block_sizes)
    tokens, _ = _token_tiling(m, block_sizes)
    block_sizes = _fit_tile_k(k, q.block_size, block_sizes, tokens)
    rows = _rows_per_cta(block_sizes)
    why = None
    if q.qtype not in ("nf4", "fp4", "int4") or q.zero_point is not None:
        why = f"qtype {q.qtype!r} (zero_point={q.zero_point is not None})"
    elif np.dtype(compute_dtype) not in (np.dtype(jnp.bfloat16), np.dtype(jnp.float16)):
        why = f"compute dtype {np.dtype(compute_dtype)}"
    elif q.block_size % 64 or block_sizes.tile_k % q.block_size and q.block_size % block_sizes.tile_k:
        why = f"block_size {q.block_size} (needs a multiple of 64)"
    elif block_sizes.table_copies not in (0, 4, 8, 16, 32):  # the table's TMA rows: 16-byte units
        why = f"table_copies={block_sizes.table_copies} (needs 4, 8, 16 or 32)"
    elif block_sizes.table_copies and block_sizes.tile_k > 256:  # rows in one swizzle tile
        why = f"a shared-memory decode table with tile_k={block_sizes.tile_k} (at most 256)"
    elif block_sizes.persistent_ctas and (block_sizes.compute_wgs, block_sizes.k_splits) != (2, 1):
        why = "persistent_ctas without two warpgroups and k_splits=1"
    elif k % block_sizes.tile_k or n % rows:
        why = f"shape K={k}, N={n} (needs K % {block_sizes.tile_k} == 0 and N % {rows} == 0)"
    if why:
        raise NotImplementedError(f"qmatmul_mgpu does not handle {why}")
    return _fit_stages(block_sizes, tokens)


_OPERAND = lambda dtype: plgpu.ShapeDtypeStruct((TILE_N, nibble_lut.CHUNK), dtype,
                                                 layout=plgpu.Layout.WGMMA)


def _decode_chunk(codes, scale, chunk, values, dtype, raw=False):
    """Operand columns ``64 chunk ..`` of the step (in ``PERMUTATION`` order), decoded in
    registers from code words already loaded, by inline PTX."""
    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)),
                       return_type=_OPERAND(dtype))
    def decode(_, codes, scale):
        return nibble_lut.decode_registers(codes, scale, chunk, values, dtype, raw)
    return decode(codes, scale)


def _decode_step_from_table(codes_smem, codes_transforms, scales, dtype, table, row_bytes):
    """The step's operand chunks in stored k order, each code byte looked up in the
    shared-memory byte-pair ``table``; ``scales``: each chunk's block scales."""
    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(codes_transforms),
                                  [plgpu.Layout.WGMMA.reduce(1)] * len(scales), plgpu.RefType()),
                       return_type=[_OPERAND(dtype)] * len(scales))
    def decode(_, codes, scales, table_ref):
        return nibble_lut.decode_from_table(codes, row_bytes, scales, dtype, table_ref,
                                            copies=table.shape[1])
    return decode(codes_smem, list(scales), table)


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


def _store_transposed(acc, out_ref, interpret: bool, first: int = 0):
    """``out_ref (count, 64) = acc[:, first:first + count].T`` in SMEM: the kernel computes
    W^T x^T (weights on the wgmma M side), and writing the tile transposed gives the output its
    (tokens, N) layout."""
    count = out_ref.shape[0]
    if interpret:
        out_ref[...] = acc[:, first:first + count].T
        return

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))
    def store(_, acc, ref):
        from jax._src.lib.mlir.dialects import arith, memref, vector
        from jax._src.lib.mlir import ir
        index = ir.IndexType.get()
        # each register holds 2 consecutive columns (tokens) of one row (output feature), in
        # the columns' 8-wide group idx[1]
        for idx, (row, col) in zip(np.ndindex(acc.registers.shape),
                                   acc.layout.thread_idxs(acc.shape)):
            if not first <= idx[1] * 8 < first + count:
                continue
            for e in range(2):
                token = arith.addi(col, arith.constant(index, e - first))
                memref.store(vector.extract(acc.registers[idx], [], [e]), ref, [token, row])
    store(acc, out_ref)


def _kernel(words_gmem, x_gmem, consts_gmem, *refs, k, tokens, block_size, nested_block, values,
            compute_dtype, bs: BlockSizes, splits: int, tiles: tuple[int, int], ctas: int,
            interpret: bool):
    *dq_gmem, out_gmem = refs
    table_gmem = dq_gmem.pop() if bs.table_copies else None  # the last input, when there is one
    wgs = bs.compute_wgs
    steps = k // bs.tile_k // splits  # pipeline steps of this CTA's share of K
    words = bs.tile_k // 8  # int32 code words per row per step
    chunk = nibble_lut.CHUNK
    blocks = max(1, bs.tile_k // block_size)  # constants per row per step
    if ctas:  # persistent: CTA c runs output tiles c, c + ctas, ... (token tiles fastest)
        cta, count, first = lax.axis_index("cta"), tiles[0] * tiles[1] // ctas, 0
        tile_at = lambda j: ((cta + j * ctas) % tiles[0], (cta + j * ctas) // tiles[0])
    else:
        count, first = 1, lax.axis_index("s") * steps
        tile_at = lambda j: (lax.axis_index("m"), lax.axis_index("n"))
    mi, ni = tile_at(0)  # (token tile, weight tile) of this CTA's first output tile

    def rows(ni):  # which 64 output features this warpgroup computes
        return ni * wgs + lax.axis_index("wg") if wgs > 1 else ni

    def constants(ni, kk):
        return _step_constants(consts_gmem, dq_gmem, rows(ni),
                               (first + kk) * bs.tile_k // block_size,
                               blocks=blocks, row_length=k // block_size,
                               nested_block=nested_block, interpret=interpret)

    def step(idx, codes_smem, x_smem, consts, acc_ref, a_smem, table=None, table_ready=None,
             ni=ni, first_tile=True):
        if table is not None and bs.probe != "tablefirst":
            # the table's copy overlaps the pipeline's first loads
            pl.when((idx[0] == 0) & first_tile)(lambda: plgpu.barrier_wait(table_ready))
        # the next step's constants: their loads overlap this step's decode
        if bs.probe == "load":
            return consts
        next_consts = (consts if bs.probe == "noconst"
                       else constants(ni, lax.min(idx[0] + 1, steps - 1)))
        if wgs > 1:  # the warpgroups share x and decode their own rows of the codes
            codes_smem = codes_smem.at[pl.ds(lax.axis_index("wg") * TILE_N, TILE_N)]
        chunk_scales = [consts[j * chunk // block_size % blocks]
                        for j in range(bs.tile_k // chunk)]
        if not interpret and table is not None:
            operands = _decode_step_from_table(codes_smem, codes_transforms, chunk_scales,
                                               compute_dtype, table, row_bytes=words * 4)
        elif not interpret:
            codes = plgpu.load(codes_smem, layout=plgpu.Layout.WGMMA)
        for j, s in enumerate(chunk_scales):
            # x is stored (tokens, k), k-major: wgmma reads it as the transposed B operand
            x_chunk = x_smem.at[:, pl.ds(j * chunk, chunk)].transpose((1, 0))
            if interpret:  # same values through jnp; the interpreter's wgmma reads A from smem
                a_smem[...] = nibble_lut.decode_reference(
                    codes_smem[:, pl.ds(j * 8, 8)], s, values, compute_dtype,
                    permuted=not bs.table_copies)
                plgpu.commit_smem()
                plgpu.wgmma(acc_ref, a_smem, x_chunk)
                plgpu.wgmma_wait(0)
            else:
                operand = (operands[j] if table is not None else
                           _decode_chunk(codes, s, j, values, compute_dtype,
                                         raw=bs.probe == "nodecode"))
                plgpu.wgmma(acc_ref, operand, x_chunk)
        # the pipeline reuses this step's buffers after we return; and the decoded A operand
        # lives in registers, which a wgmma still running into the next step found reused
        # (wrong results on the H100 with delay_release=1, BUILD_NOTES session 7)
        plgpu.wgmma_wait(0)
        return next_consts

    x_transforms = (plgpu.TilingTransform((8, chunk)), plgpu.SwizzleTransform(2 * chunk))
    codes_swizzle = plgpu.find_swizzle(words * 32)
    codes_transforms = (plgpu.TilingTransform((8, codes_swizzle // 4)),
                        plgpu.SwizzleTransform(codes_swizzle))

    def in_specs(mi, ni):  # the steps of one output tile
        return [plgpu.BlockSpec((wgs * TILE_N, words), lambda kk: (ni, first + kk),
                                transforms=codes_transforms),
                plgpu.BlockSpec((tokens, bs.tile_k), lambda kk: (mi, first + kk),
                                transforms=x_transforms)]

    # Without a split of K, the tile is written transposed in the output's dtype, in place;
    # with one, float32 partial sums (splits, N, tokens) that XLA adds up.
    # Two warpgroups store their tiles in two halves through half-size buffers: 32 KB of shared
    # memory freed at 256 tokens, room for a 32-copy decode table.
    direct = splits == 1
    parts = 2 if direct and wgs > 1 and tokens % 16 == 0 else 1
    out_block = (tokens // parts, TILE_N) if direct else (TILE_N, tokens)
    out_scratch = plgpu.SMEM((wgs, *out_block), out_gmem.dtype)

    def store(acc, out_smem, mi, ni):
        if not direct:
            out_smem[...] = acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[
                lax.axis_index("s"), pl.ds(rows(ni) * TILE_N, TILE_N), pl.ds(mi * tokens, tokens)])
            plgpu.wait_smem_to_gmem(0)
            return
        acc = acc.astype(out_gmem.dtype)
        part = tokens // parts
        for p in range(parts):
            if p or ctas:  # the previous part (or tile) has left the buffer
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            _store_transposed(acc, out_smem, interpret, first=p * part)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[
                pl.ds(mi * tokens + p * part, part), pl.ds(rows(ni) * TILE_N, TILE_N)])
        if not ctas:  # persistent: the copies run on beside the next tile's steps
            plgpu.wait_smem_to_gmem(0)

    acc_type = plgpu.ACC((TILE_N, tokens))
    a_type = plgpu.SMEM((wgs, TILE_N, chunk), compute_dtype)  # the interpreter's wgmma operand
    if wgs == 1:
        def acc_scope(acc_ref, a_smem=None, table=None, table_ready=None):
            plgpu.emit_pipeline(
                lambda idx, codes, x, carry: step(idx, codes, x, carry, acc_ref, a_smem, table,
                                                  table_ready),
                grid=(steps,), in_specs=in_specs(mi, ni),
                max_concurrent_steps=bs.max_concurrent_steps, init_carry=constants(ni, 0),
            )(words_gmem, x_gmem)
            plgpu.wgmma_wait(0)
            return acc_ref[...]

        def table_scope(table, barrier):  # the byte-pair table, copied in once per CTA
            plgpu.copy_gmem_to_smem(table_gmem, table, barrier)
            if bs.probe == "tablefirst":  # experiments: the order before session 9
                plgpu.barrier_wait(barrier)
            return pl.run_scoped(functools.partial(acc_scope, table=table, table_ready=barrier),
                                 acc_type)

        if interpret:  # the interpreter allocates registers and shared memory in separate scopes
            # (and decodes through jnp: the values are the table's either way)
            acc = pl.run_scoped(lambda a_smem: pl.run_scoped(
                functools.partial(acc_scope, a_smem=a_smem.at[0]), acc_type), a_type)
        elif table_gmem is not None:
            acc = pl.run_scoped(table_scope, plgpu.SMEM(table_gmem.shape, jnp.uint32),
                                plgpu.Barrier(num_arrivals=1))
        else:
            acc = pl.run_scoped(acc_scope, acc_type)
        pl.run_scoped(lambda out_smem: store(acc, out_smem.at[0], mi, ni), out_scratch)
        return

    # Several compute warpgroups share each step's x tile (half the L2 -> SMEM traffic of x at
    # 2 warpgroups); a memory warpgroup issues the copies (warp specialization). A persistent
    # CTA runs one pipeline per output tile, chained (``pipeline_state``): the copies of a tile's
    # first steps overlap the previous tile's last steps and its store.
    def pipeline(body, context, mi, ni, state=None):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(steps,), memory_registers=40, in_specs=in_specs(mi, ni), wg_axis="wg",
            num_compute_wgs=wgs, max_concurrent_steps=bs.max_concurrent_steps,
            compute_context=context, pipeline_state=state)

    ignore = lambda *_, **__: None
    scratch = dict(allocs=pipeline(ignore, ignore, mi, ni).get_allocations(words_gmem, x_gmem),
                   out_smem=out_scratch)
    if interpret:
        scratch["a_smem"] = a_type
    elif table_gmem is not None:  # one table shared by the compute warpgroups
        scratch.update(table=plgpu.SMEM(table_gmem.shape, jnp.uint32),
                       table_ready=plgpu.Barrier(num_arrivals=1))

    @functools.partial(pl.run_scoped, **scratch, collective_axes="wg")
    def _scope(allocs, out_smem, a_smem=None, table=None, table_ready=None):
        wg = lax.axis_index("wg")
        a_smem = None if a_smem is None else a_smem.at[wg]
        if table is not None:  # copied in by the first warpgroup, overlapping the first steps
            pl.when(wg == 0)(lambda: plgpu.copy_gmem_to_smem(table_gmem, table, table_ready))

        def run_tile(j, state=None):  # this CTA's j-th output tile
            mi, ni = tile_at(j)

            def context(run_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=acc_type)
                def _acc(acc_ref):
                    cell["acc"] = acc_ref
                    run_pipeline(constants(ni, 0))
                    plgpu.wgmma_wait(0)
                    store(acc_ref[...], out_smem.at[wg], mi, ni)

            cell = {}
            body = lambda idx, codes, x, carry: step(idx, codes, x, carry, cell["acc"], a_smem,
                                                     table, table_ready, ni, j == 0)
            pipeline(body, context, mi, ni, state)(words_gmem, x_gmem, allocations=allocs)

        if not ctas:
            run_tile(0)
            return

        @pl.loop(0, count)
        def _tiles(j):
            Stage = plgpu.PipelinePipeline
            run_tile(j, jnp.where(j == 0, Stage.START,
                                  jnp.where(j == count - 1, Stage.STOP, Stage.STEADY)))
        plgpu.wait_smem_to_gmem(0)  # the last tile's stores


@functools.partial(jax.jit, static_argnames=("compute_dtype", "interpret", "block_sizes"))
def qmatmul(x: jax.Array, q: QArray, *, compute_dtype=jnp.bfloat16, interpret=False,
            block_sizes: BlockSizes = BlockSizes()) -> jax.Array:
    """``x @ dequantize(q)`` through the kernel; NotImplementedError for what it does not handle."""
    block_sizes = _check_supported(x, q, compute_dtype, block_sizes)
    k, n = q.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).astype(compute_dtype)
    m = x2.shape[0]
    tokens, m_pad = _token_tiling(m, block_sizes)
    if not block_sizes.table_copies:  # the register decode's operand is in a permuted k order
        # (padded in the same XLA pass)
        x2 = jnp.pad(x2, ((0, m_pad - m), (0, 0)))[:, nibble_lut.permute_k(k)]
    elif m > 8 and m % 8:  # the table decode reads x as it is (the copies fill the tokens past
        # m with zeros), but a copy's tiled rows need fewer than 8 or a multiple of 8
        x2 = jnp.pad(x2, ((0, _pad_tokens(m) - m), (0, 0)))
    words = lax.bitcast_convert_type(q.codes.reshape(n, k // 8, 4), jnp.int32)  # (N, K/8)
    if isinstance(q.scale, QArray):  # double quant: dynamic8 codes, nested scales, offset
        nested = q.scale
        consts = [nested.codes.reshape(n, k // q.block_size),
                  jnp.asarray(codebooks.QTYPES[nested.qtype].values, jnp.float32),
                  nested.scale.reshape(-1), nested.offset.reshape(1)]
        nested_block = nested.block_size
    else:
        consts, nested_block = [q.scale.reshape(n, k // q.block_size)], None
    tables = [jnp.asarray(nibble_lut.pair_table(codebooks.QTYPES[q.qtype].values, compute_dtype,
                                                block_sizes.table_copies))
              ] if block_sizes.table_copies else []
    tiles, splits, ctas = _launch_grid(m, k, n, block_sizes)
    wgs = block_sizes.compute_wgs
    kernel = functools.partial(
        _kernel, k=k, tokens=tokens, block_size=q.block_size, nested_block=nested_block,
        values=codebooks.QTYPES[q.qtype].values, compute_dtype=np.dtype(compute_dtype),
        bs=block_sizes, splits=splits, tiles=tiles, ctas=ctas, interpret=interpret)
    out_type = (jax.ShapeDtypeStruct((m_pad, n), x.dtype) if splits == 1
                else jax.ShapeDtypeStruct((splits, n, m_pad), jnp.float32))
    # token tiles vary fastest: the CTAs that share a weight tile run together (one HBM read)
    extra = dict(num_threads=wgs + 1, thread_name="wg") if wgs > 1 else {}
    grid = dict(grid=(ctas,), grid_names=("cta",)) if ctas else dict(
        grid=(*tiles, splits), grid_names=("m", "n", "s"))
    call = plgpu.kernel(
        kernel, out_type=out_type, **grid, **extra,
        interpret=plgpu.InterpretGPUParams() if interpret else None)
    out = call(words, x2, *consts, *tables)
    out = out[:m] if splits == 1 else out.sum(0)[:, :m].T  # split-K partial sums
    out = out.reshape(*lead, n).astype(x.dtype)
    if splits > 1:  # the sum is its own pass: XLA fused it into a consumer that reads each
        # output many times (Llama's attention scores summed k_proj's partials again for every
        # cached key: 5.8 instead of 1.7 us per layer on the H100, BUILD_NOTES session 9)
        out = lax.optimization_barrier(out)
    return out
