"""Fused dequantize-matmul for Hopper (sm90) on the Pallas Mosaic GPU backend.

Terms: W[K, N] is stored as codes ``(N, K/2)`` (two 4-bit codes per byte) with one constant per
*block* of ``block_size`` consecutive k. A *tile* is what one warpgroup computes: 64 output
features (the wgmma M side) by up to ``token_tile`` tokens (the wgmma N side), so small batches
(decode) do not waste the 64-row side of the tensor core on padding. A *step* is ``tile_k``
elements of K streamed through shared memory by a Pallas pipeline. How a problem is tiled, and
when ``auto`` runs this kernel, is ``qmatmul_tuning``.

The codes are read as int32 words (8 codes each) and decoded straight into wgmma's register
operand layout (``nibble_lut``): with a byte-pair table in shared memory, one load per code byte
in stored k order, so x is read as it is (fewer than 8 tokens not even padded: the copies fill
the rest with zeros); without a table by ``prmt`` lookups in registers, with x's contraction axis
permuted once in XLA to match, so no data moves between threads. The block constants are read
from the QArray's own storage (double-quantized ones decoded in registers, ``block_constants``),
one step ahead of their use.

Two code paths share the step and the store. One warpgroup per CTA (``compute_wgs=1``): a plain
pipeline per output tile. Two (``compute_wgs=2``): both decode 64 rows each against one shared x
tile and one shared table, fed by a third warpgroup that issues the copies (warp
specialization); a persistent CTA runs several output tiles as chained pipelines. Token tiles
vary fastest on the grid, so the CTAs sharing a weight tile read it from HBM once. Without
split-K each tile is stored transposed, in the output's dtype, straight into the ``(tokens, N)``
result; with it, float32 partial sums that XLA adds.
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
from jaxquant._src.kernels import nibble_lut, platform
from jaxquant._src.kernels import qmatmul_mgpu_ops as ops
from jaxquant._src.kernels import qmatmul_tuning as tuning
from jaxquant._src.kernels.qmatmul_tuning import TILE_N, BlockSizes, Launch
from jaxquant._src.matmul_xla import qmatmul_xla
from jaxquant._src.qarray import QArray


def check_supported(x, q: QArray, compute_dtype,
                    block_sizes: BlockSizes = BlockSizes()) -> BlockSizes:
    """The fitted block sizes the kernel will use for these inputs, or NotImplementedError."""
    k, n = q.shape
    m = int(np.prod(x.shape[:-1]))
    if m == 0:  # qmatmul returns the empty result before choosing a kernel
        raise NotImplementedError("qmatmul_mgpu does not handle an empty x (no tokens)")
    bs = block_sizes.for_problem(m, k, n, q.block_size)
    rows = TILE_N * bs.compute_wgs
    why = None
    if q.qtype not in ("nf4", "fp4", "int4") or q.zero_point is not None:
        why = f"qtype {q.qtype!r} (zero_point={q.zero_point is not None})"
    elif np.dtype(compute_dtype) not in (np.dtype(jnp.bfloat16), np.dtype(jnp.float16)):
        why = f"compute dtype {np.dtype(compute_dtype)}"
    elif q.block_size % 64 or bs.tile_k % q.block_size and q.block_size % bs.tile_k:
        why = f"block_size {q.block_size} (needs a multiple of 64)"
    elif bs.table_copies not in tuning.TABLE_COPIES:  # the table's TMA rows: 16-byte units
        why = f"table_copies={bs.table_copies} (needs 4, 8, 16 or 32)"
    elif bs.table_copies and bs.tile_k > 256:  # rows in one swizzle tile
        why = f"a shared-memory decode table with tile_k={bs.tile_k} (at most 256)"
    elif bs.persistent_ctas and (bs.compute_wgs, bs.k_splits) != (2, 1):
        why = "persistent_ctas without two warpgroups and k_splits=1"
    elif k % bs.tile_k or n % rows:
        why = f"shape K={k}, N={n} (needs K % {bs.tile_k} == 0 and N % {rows} == 0)"
    if why:
        raise NotImplementedError(f"qmatmul_mgpu does not handle {why}")
    return bs


def can_use(x, q: QArray, compute_dtype) -> bool:
    """Whether ``auto`` runs this kernel (else XLA): supported, an sm90 GPU in the process, and
    faster than the XLA path by ``qmatmul_tuning.auto_uses_kernel``."""
    try:
        sizes = check_supported(x, q, compute_dtype)
    except NotImplementedError:
        return False
    m = int(np.prod(x.shape[:-1]))
    return (tuning.auto_uses_kernel(m, int(np.prod(q.shape)), sizes)
            and platform.hopper_present())


def reference(x, q: QArray, compute_dtype=jnp.bfloat16) -> jax.Array:
    """What the kernel computes: the XLA path, ``x @ dequantize(q)`` with float32 accumulation."""
    return qmatmul_xla(x, q, compute_dtype)


@dataclasses.dataclass(frozen=True)
class _Problem:
    """What a launch's kernel body is traced for (static)."""
    k: int
    block_size: int
    nested_block: int | None  # double quant: the nested scales' block size; None: float32 constants
    values: tuple  # the qtype's 16 values
    compute_dtype: np.dtype
    bs: BlockSizes  # fitted
    grid: Launch
    interpret: bool


class _Tiles:
    """The parts both code paths share, traced inside the kernel: which output tile a CTA
    computes, the pipeline's in-specs, one step (constants, decode, wgmma) and the store."""

    def __init__(self, p: _Problem, words_gmem, x_gmem, consts_gmem, dq_gmem, table_gmem,
                 out_gmem):
        self.p, self.bs = p, p.bs
        self.words_gmem, self.x_gmem, self.out_gmem = words_gmem, x_gmem, out_gmem
        self.consts_gmem, self.dq_gmem, self.table_gmem = consts_gmem, dq_gmem, table_gmem
        self.wgs = p.bs.compute_wgs
        self.tokens, self.tiles, self.ctas = p.grid.tokens, p.grid.tiles, p.grid.ctas
        self.steps = p.k // p.bs.tile_k // p.grid.splits  # pipeline steps of this CTA's share of K
        self.words = p.bs.tile_k // 8  # int32 code words per row per step
        self.blocks = max(1, p.bs.tile_k // p.block_size)  # constants per row per step
        if self.ctas:  # persistent: CTA c runs output tiles c, c + ctas, ... (token tiles fastest)
            cta = lax.axis_index("cta")
            self.count, self.first = self.tiles[0] * self.tiles[1] // self.ctas, 0
            self.tile_at = lambda j: ((cta + j * self.ctas) % self.tiles[0],
                                      (cta + j * self.ctas) // self.tiles[0])
        else:
            self.count, self.first = 1, lax.axis_index("s") * self.steps
            self.tile_at = lambda j: (lax.axis_index("m"), lax.axis_index("n"))
        chunk = nibble_lut.CHUNK
        self.x_transforms = (plgpu.TilingTransform((8, chunk)), plgpu.SwizzleTransform(2 * chunk))
        swizzle = plgpu.find_swizzle(self.words * 32)
        self.codes_transforms = (plgpu.TilingTransform((8, swizzle // 4)),
                                 plgpu.SwizzleTransform(swizzle))
        # Without a split of K the tile is written transposed in the output's dtype, in place;
        # with one, float32 partial sums (splits, N, tokens) that XLA adds up. Two warpgroups
        # store their tiles in two halves through half-size buffers: 32 KB of shared memory
        # freed at 256 tokens, room for a 32-copy decode table.
        self.direct = p.grid.splits == 1
        self.parts = 2 if self.direct and self.wgs > 1 and self.tokens % 16 == 0 else 1
        out_block = ((self.tokens // self.parts, TILE_N) if self.direct
                     else (TILE_N, self.tokens))
        self.out_scratch = plgpu.SMEM((self.wgs, *out_block), out_gmem.dtype)
        self.acc_type = plgpu.ACC((TILE_N, self.tokens))
        # the interpreter's wgmma reads its A operand from shared memory
        self.a_type = plgpu.SMEM((self.wgs, TILE_N, chunk), p.compute_dtype)

    def rows(self, ni):
        """Which 64 output features this warpgroup computes."""
        return ni * self.wgs + lax.axis_index("wg") if self.wgs > 1 else ni

    def constants(self, ni, kk):
        p = self.p
        return ops.step_constants(self.consts_gmem, self.dq_gmem, self.rows(ni),
                               (self.first + kk) * self.bs.tile_k // p.block_size,
                               blocks=self.blocks, row_length=p.k // p.block_size,
                               nested_block=p.nested_block, interpret=p.interpret)

    def in_specs(self, mi, ni):
        """The steps of one output tile: its rows' code words and its tokens' x."""
        first = self.first
        return [plgpu.BlockSpec((self.wgs * TILE_N, self.words), lambda kk: (ni, first + kk),
                                transforms=self.codes_transforms),
                plgpu.BlockSpec((self.tokens, self.bs.tile_k), lambda kk: (mi, first + kk),
                                transforms=self.x_transforms)]

    def step(self, idx, codes_smem, x_smem, consts, acc_ref, a_smem, table=None,
             table_ready=None, ni=None, first_tile=True):
        """One pipeline step: decode the codes with ``consts`` into wgmma operands and multiply
        them into ``acc_ref``; returns the next step's constants."""
        p, bs, chunk = self.p, self.bs, nibble_lut.CHUNK
        if table is not None:  # the table's copy overlaps the pipeline's first loads
            pl.when((idx[0] == 0) & first_tile)(lambda: plgpu.barrier_wait(table_ready))
        # the next step's constants: their loads overlap this step's decode
        next_consts = self.constants(ni, lax.min(idx[0] + 1, self.steps - 1))
        if self.wgs > 1:  # the warpgroups share x and decode their own rows of the codes
            codes_smem = codes_smem.at[pl.ds(lax.axis_index("wg") * TILE_N, TILE_N)]
        chunk_scales = [consts[j * chunk // p.block_size % self.blocks]
                        for j in range(bs.tile_k // chunk)]
        if not p.interpret and table is not None:
            operands = ops.decode_step_from_table(codes_smem, self.codes_transforms,
                                                  chunk_scales, p.compute_dtype, table,
                                                  row_bytes=self.words * 4)
        elif not p.interpret:
            codes = plgpu.load(codes_smem, layout=plgpu.Layout.WGMMA)
        for j, s in enumerate(chunk_scales):
            # x is stored (tokens, k), k-major: wgmma reads it as the transposed B operand
            x_chunk = x_smem.at[:, pl.ds(j * chunk, chunk)].transpose((1, 0))
            if p.interpret:  # same values through jnp; the interpreter's wgmma reads A from smem
                a_smem[...] = nibble_lut.decode_reference(
                    codes_smem[:, pl.ds(j * 8, 8)], s, p.values, p.compute_dtype,
                    permuted=not bs.table_copies)
                plgpu.commit_smem()
                plgpu.wgmma(acc_ref, a_smem, x_chunk)
                plgpu.wgmma_wait(0)
            else:
                operand = (operands[j] if table is not None else
                           ops.decode_chunk(codes, s, j, p.values, p.compute_dtype))
                plgpu.wgmma(acc_ref, operand, x_chunk)
        # the pipeline reuses this step's buffers after we return; and the decoded A operand
        # lives in registers, which a wgmma still running into the next step would find reused
        # (wrong results on the H100 when the pipeline released buffers a step late)
        plgpu.wgmma_wait(0)
        return next_consts

    def store(self, acc, out_smem, mi, ni):
        """The finished tile into the output: transposed in place, or as split-K partials."""
        out_gmem, tokens = self.out_gmem, self.tokens
        if not self.direct:
            out_smem[...] = acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[
                lax.axis_index("s"), pl.ds(self.rows(ni) * TILE_N, TILE_N),
                pl.ds(mi * tokens, tokens)])
            plgpu.wait_smem_to_gmem(0)
            return
        acc = acc.astype(out_gmem.dtype)
        part = tokens // self.parts
        for p in range(self.parts):
            if p or self.ctas:  # the previous part (or tile) has left the buffer
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            ops.store_transposed(acc, out_smem, self.p.interpret, first=p * part)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[
                pl.ds(mi * tokens + p * part, part), pl.ds(self.rows(ni) * TILE_N, TILE_N)])
        if not self.ctas:  # persistent: the copies run on beside the next tile's steps
            plgpu.wait_smem_to_gmem(0)


def _kernel(words_gmem, x_gmem, consts_gmem, *refs, problem: _Problem):
    *dq_gmem, out_gmem = refs
    table_gmem = dq_gmem.pop() if problem.bs.table_copies else None  # the last input, if any
    t = _Tiles(problem, words_gmem, x_gmem, consts_gmem, dq_gmem, table_gmem, out_gmem)
    if problem.bs.compute_wgs == 1:
        _one_warpgroup(t)
    else:
        _warp_specialized(t)


def _one_warpgroup(t: _Tiles):
    """One warpgroup per CTA: a plain pipeline over the steps of one output tile."""
    mi, ni = t.tile_at(0)

    def acc_scope(acc_ref, a_smem=None, table=None, table_ready=None):
        plgpu.emit_pipeline(
            lambda idx, codes, x, carry: t.step(idx, codes, x, carry, acc_ref, a_smem, table,
                                                table_ready, ni=ni),
            grid=(t.steps,), in_specs=t.in_specs(mi, ni),
            max_concurrent_steps=t.bs.max_concurrent_steps, init_carry=t.constants(ni, 0),
        )(t.words_gmem, t.x_gmem)
        plgpu.wgmma_wait(0)
        return acc_ref[...]

    def table_scope(table, barrier):  # the byte-pair table, copied in once per CTA
        plgpu.copy_gmem_to_smem(t.table_gmem, table, barrier)
        return pl.run_scoped(functools.partial(acc_scope, table=table, table_ready=barrier),
                             t.acc_type)

    if t.p.interpret:  # the interpreter allocates registers and shared memory in separate
        # scopes (and decodes through jnp: the values are the table's either way)
        acc = pl.run_scoped(lambda a_smem: pl.run_scoped(
            functools.partial(acc_scope, a_smem=a_smem.at[0]), t.acc_type), t.a_type)
    elif t.table_gmem is not None:
        acc = pl.run_scoped(table_scope, plgpu.SMEM(t.table_gmem.shape, jnp.uint32),
                            plgpu.Barrier(num_arrivals=1))
    else:
        acc = pl.run_scoped(acc_scope, t.acc_type)
    pl.run_scoped(lambda out_smem: t.store(acc, out_smem.at[0], mi, ni), t.out_scratch)


def _warp_specialized(t: _Tiles):
    """Several compute warpgroups share each step's x tile (half the L2 -> SMEM traffic of x at
    two) and a memory warpgroup issues the copies. A persistent CTA runs one pipeline per output
    tile, chained (``pipeline_state``): the copies of a tile's first steps overlap the previous
    tile's last steps and its store."""
    mi, ni = t.tile_at(0)  # this CTA's first output tile

    def pipeline(body, context, mi, ni, state=None):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(t.steps,), memory_registers=40, in_specs=t.in_specs(mi, ni),
            wg_axis="wg", num_compute_wgs=t.wgs, max_concurrent_steps=t.bs.max_concurrent_steps,
            compute_context=context, pipeline_state=state)

    ignore = lambda *_, **__: None
    scratch = dict(allocs=pipeline(ignore, ignore, mi, ni).get_allocations(t.words_gmem, t.x_gmem),
                   out_smem=t.out_scratch)
    if t.p.interpret:
        scratch["a_smem"] = t.a_type
    elif t.table_gmem is not None:  # one table shared by the compute warpgroups
        scratch.update(table=plgpu.SMEM(t.table_gmem.shape, jnp.uint32),
                       table_ready=plgpu.Barrier(num_arrivals=1))

    @functools.partial(pl.run_scoped, **scratch, collective_axes="wg")
    def _scope(allocs, out_smem, a_smem=None, table=None, table_ready=None):
        wg = lax.axis_index("wg")
        a_smem = None if a_smem is None else a_smem.at[wg]
        if table is not None:  # copied in by the first warpgroup, overlapping the first steps
            pl.when(wg == 0)(lambda: plgpu.copy_gmem_to_smem(t.table_gmem, table, table_ready))

        def run_tile(j, state=None):  # this CTA's j-th output tile
            mi, ni = t.tile_at(j)

            def context(run_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=t.acc_type)
                def _acc(acc_ref):
                    cell["acc"] = acc_ref
                    run_pipeline(t.constants(ni, 0))
                    plgpu.wgmma_wait(0)
                    t.store(acc_ref[...], out_smem.at[wg], mi, ni)

            cell = {}
            body = lambda idx, codes, x, carry: t.step(idx, codes, x, carry, cell["acc"], a_smem,
                                                       table, table_ready, ni, j == 0)
            pipeline(body, context, mi, ni, state)(t.words_gmem, t.x_gmem, allocations=allocs)

        if not t.ctas:
            run_tile(0)
            return

        @pl.loop(0, t.count)
        def _tiles(j):
            Stage = plgpu.PipelinePipeline
            run_tile(j, jnp.where(j == 0, Stage.START,
                                  jnp.where(j == t.count - 1, Stage.STOP, Stage.STEADY)))
        plgpu.wait_smem_to_gmem(0)  # the last tile's stores


@functools.partial(jax.jit, static_argnames=("compute_dtype", "interpret", "block_sizes"))
def qmatmul(x: jax.Array, q: QArray, *, compute_dtype=jnp.bfloat16, interpret=False,
            block_sizes: BlockSizes = BlockSizes()) -> jax.Array:
    """``x @ dequantize(q)`` through the kernel; NotImplementedError for what it does not handle.

    ``block_sizes``: ``BlockSizes()`` picks them for the problem (``qmatmul_tuning``); others are
    fitted to shared memory and used. ``interpret=True`` runs the kernel in the Pallas GPU
    interpreter (on CPU), decoding through jnp.
    """
    bs = check_supported(x, q, compute_dtype, block_sizes)
    k, n = q.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).astype(compute_dtype)
    m = x2.shape[0]
    grid = tuning.launch(m, k, n, bs)
    if not bs.table_copies:  # the register decode's operand is in a permuted k order
        # (padded in the same XLA pass)
        x2 = jnp.pad(x2, ((0, grid.m_pad - m), (0, 0)))[:, nibble_lut.permute_k(k)]
    elif m > 8 and m % 8:  # the table decode reads x as it is (the copies fill the tokens past
        # m with zeros), but a copy's tiled rows need fewer than 8 or a multiple of 8
        x2 = jnp.pad(x2, ((0, tuning.pad_tokens(m) - m), (0, 0)))
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
                                                bs.table_copies))] if bs.table_copies else []
    problem = _Problem(k=k, block_size=q.block_size, nested_block=nested_block,
                       values=codebooks.QTYPES[q.qtype].values,
                       compute_dtype=np.dtype(compute_dtype), bs=bs, grid=grid,
                       interpret=interpret)
    out_type = (jax.ShapeDtypeStruct((grid.m_pad, n), x.dtype) if grid.splits == 1
                else jax.ShapeDtypeStruct((grid.splits, n, grid.m_pad), jnp.float32))
    # token tiles vary fastest: the CTAs that share a weight tile run together (one HBM read)
    extra = dict(num_threads=bs.compute_wgs + 1, thread_name="wg") if bs.compute_wgs > 1 else {}
    launch_grid = dict(grid=(grid.ctas,), grid_names=("cta",)) if grid.ctas else dict(
        grid=(*grid.tiles, grid.splits), grid_names=("m", "n", "s"))
    call = plgpu.kernel(
        functools.partial(_kernel, problem=problem), out_type=out_type, **launch_grid, **extra,
        interpret=plgpu.InterpretGPUParams() if interpret else None)
    out = call(words, x2, *consts, *tables)
    out = out[:m] if grid.splits == 1 else out.sum(0)[:, :m].T  # split-K partial sums
    out = out.reshape(*lead, n).astype(x.dtype)
    if grid.splits > 1:  # the sum is its own pass: XLA would fuse it into a consumer that reads
        # each output many times (Llama's attention scores summed k_proj's partials again for
        # every cached key: 5.8 instead of 1.7 us per layer on the H100)
        out = lax.optimization_barrier(out)
    return out
