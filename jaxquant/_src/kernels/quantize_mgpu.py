"""Single-pass NF4 / FP4 blockwise quantize for Hopper (Pallas Mosaic GPU), bfloat16 input.

XLA quantizes in two passes (a block reduction for the absmax, then the codes), so it reads the
input twice; this kernel reads each tile once: per pipeline step, ``TILE_BLOCKS`` blocks of 64
values come into shared memory, and the block absmax, the codes and the packed bytes are all
computed in registers. The input is viewed as int32 words of two bfloat16 (even element in the
low half), so that a word's two codes make one output byte without moving data between threads:
``float32(bf16) = bits << 16``. The arithmetic is the XLA path's (``x * (1 / absmax)``, code =
number of midpoints strictly below, with an IEEE reciprocal: PTX ``rcp.rn.ftz.f32``),
so the bytes and constants are identical. The code comes from one shared-memory lookup and one
compare per value (cell_table.py); a binary search over the midpoints made the kernel ALU-bound
at 41% of a copy's bandwidth, the lookup runs at 94% (H100, 4096x14336,
experiments/results/quantize_kernel_h100_session6.log).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxquant._src import codebooks, division
from jaxquant._src.kernels import cell_table, platform

BLOCK = 64  # the kernel's block size (values per absmax)
TILE_BLOCKS = 64  # blocks per pipeline step
STEPS_PER_CTA = 8
STAGES = 4


def supports(x, qtype: str, block_size, zero_point: bool) -> bool:
    """Whether the kernel applies (else the XLA path): bf16, NF4 or FP4, block 64, whole tiles."""
    return (x.dtype == jnp.bfloat16 and qtype in ("nf4", "fp4") and block_size == BLOCK
            and not zero_point and x.size % (BLOCK * TILE_BLOCKS) == 0 and x.size > 0)


def can_use(x, qtype: str, block_size, zero_point: bool) -> bool:
    return supports(x, qtype, block_size, zero_point) and platform.hopper_present()


def _reciprocal(a, interpret):
    """IEEE 1 / a of the blocks' absmax (the GPU's own float32 division is within 2 ulp only,
    division.py): PTX ``rcp.rn.ftz.f32`` on the GPU (subnormal results flush, as XLA's do), the
    integer fix-up of ``division.reciprocal`` in the interpreter (in the kernel it cost 12 us)."""
    if interpret:
        return division.reciprocal(a)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA.reduce(1),),
                       return_type=plgpu.ShapeDtypeStruct((TILE_BLOCKS,), jnp.float32,
                                                          layout=plgpu.Layout.WGMMA.reduce(1)))
    def rcp(_, a):
        from jax._src.lib.mlir import ir
        from jax._src.lib.mlir.dialects import vector
        from jax.experimental.mosaic import gpu as mgpu
        from jax.experimental.mosaic.gpu import utils

        out = np.empty(a.registers.shape, dtype=object)
        for idx, reg in np.ndenumerate(a.registers):
            for e in range(ir.VectorType(reg.type).shape[0]):
                value = utils.inline_ptx("rcp.rn.ftz.f32 $0, $1;", vector.extract(reg, [], [e]),
                                         result_types=ir.F32Type.get())
                reg = vector.insert(value, reg, [], [e])
            out[idx] = reg
        return mgpu.FragmentedArray(_registers=out, _layout=a.layout, _is_signed=None)

    return rcp(a)


def _to_codes(sorted_index, order):
    """Sorted index -> the table's code, ``order[index]``: the 16 codes packed as nibbles of two
    int32 constants and shifted out (FP4's codes are not in value order; NF4's are)."""
    if list(order) == list(range(16)):
        return sorted_index
    low, high = (np.uint32(sum(int(c) << (4 * i) for i, c in enumerate(half))).view(np.int32)
                 for half in (order[:8], order[8:]))
    shift = lax.shift_left(sorted_index & np.int32(7), np.int32(2))
    word = jnp.where(sorted_index < 8, low, high)
    return lax.shift_right_logical(word, shift) & np.int32(15)


def _search(scaled, table_smem, midpoints, interpret):
    """Sorted code indices (midpoints strictly below) through the cell table in shared memory:
    inline PTX on the GPU, the same arithmetic in jnp in the interpreter (cell_table.py)."""
    words, per_cell = cell_table.entry_words(midpoints), cell_table.midpoints_per_cell(midpoints)
    if interpret:
        return cell_table.codes_reference(scaled, table_smem[...], words)

    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()),
                       return_type=plgpu.ShapeDtypeStruct(scaled.shape, jnp.int32,
                                                          layout=plgpu.Layout.WGMMA))
    def lookup(_, scaled, table):
        return cell_table.codes_registers(scaled, table, words, per_cell)

    return lookup(scaled, table_smem)


def _step(words_smem, codes_smem, absmax_smem, table_smem, *, midpoints, order, interpret):
    if interpret:
        w = words_smem[...]
    else:
        w = plgpu.load(words_smem, layout=plgpu.Layout.WGMMA)
    even_bits = lax.shift_left(w, np.int32(16))  # element 2i: the word's low half
    odd_bits = w & np.int32(-65536)  # element 2i + 1: the high half, already in place
    magnitude = jnp.maximum(even_bits & np.int32(0x7FFFFFFF), odd_bits & np.int32(0x7FFFFFFF))
    absmax_bits = jnp.max(magnitude, axis=1)  # non-negative floats order like their bits
    absmax = lax.bitcast_convert_type(absmax_bits, jnp.float32)
    # a non-finite block's constant is NaN (its bits are >= those of inf)
    absmax_smem[...] = jnp.where(absmax_bits < np.int32(0x7F800000), absmax, np.float32(np.nan))
    inverse = _reciprocal(jnp.maximum(absmax, np.float32(np.finfo(np.float32).tiny)), interpret)
    packed = None
    for bits, shift in ((even_bits, 4), (odd_bits, 0)):
        # no clip to [-1, 1] (the XLA path's): every midpoint lies inside, so compares agree
        scaled = lax.bitcast_convert_type(bits, jnp.float32) * inverse[:, None]
        index = _search(scaled, table_smem, midpoints, interpret)
        code = lax.shift_left(_to_codes(index, order), np.int32(shift))
        packed = code if packed is None else packed | code
    codes_smem[...] = packed.astype(jnp.uint8)


def _kernel(words_gmem, table_gmem, codes_gmem, absmax_gmem, *, steps, midpoints, order,
            interpret):
    first = lax.axis_index("c") * steps

    # results go out through two slots of shared memory, each copied to HBM while the next
    # step computes (the pipeline's own out_specs use predicated copies the interpreter lacks)
    @functools.partial(pl.run_scoped,
                       codes_smem=plgpu.SMEM((2, TILE_BLOCKS, BLOCK // 2), jnp.uint8),
                       absmax_smem=plgpu.SMEM((2, TILE_BLOCKS), jnp.float32),
                       table_smem=plgpu.SMEM(table_gmem.shape, jnp.int32),
                       table_barrier=plgpu.Barrier())
    def _scope(codes_smem, absmax_smem, table_smem, table_barrier):
        plgpu.copy_gmem_to_smem(table_gmem, table_smem, table_barrier)
        plgpu.barrier_wait(table_barrier)
        step = functools.partial(_step, table_smem=table_smem, midpoints=midpoints, order=order,
                                 interpret=interpret)

        def body(idx, words):
            s = idx[0]
            slot = lax.rem(s, 2)
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # this slot's copy from s - 2
            step(words, codes_smem.at[slot], absmax_smem.at[slot])
            plgpu.commit_smem()
            tile = pl.ds((first + s) * TILE_BLOCKS, TILE_BLOCKS)
            plgpu.copy_smem_to_gmem(codes_smem.at[slot], codes_gmem.at[tile], commit_group=False)
            plgpu.copy_smem_to_gmem(absmax_smem.at[slot], absmax_gmem.at[tile])

        plgpu.emit_pipeline(
            body, grid=(steps,),
            in_specs=[plgpu.BlockSpec((TILE_BLOCKS, BLOCK // 2), lambda s: (first + s, 0))],
            max_concurrent_steps=min(STAGES, steps),
        )(words_gmem)
        plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("qtype", "interpret"))
def quantize_blocks(x: jax.Array, qtype: str, interpret: bool = False):
    """bf16 ``x`` (any shape, row-major blocks of 64) -> (packed uint8 codes ``(x.size // 2,)``,
    float32 absmax ``(x.size // 64,)``), exactly as the XLA path computes them."""
    if not supports(x, qtype, BLOCK, False):
        raise NotImplementedError(f"quantize_mgpu does not handle {x.dtype} {x.shape} {qtype}")
    qt = codebooks.get_qtype(qtype)
    blocks = x.size // BLOCK
    words = lax.bitcast_convert_type(x.reshape(blocks, BLOCK // 2, 2), jnp.int32)
    tiles = blocks // TILE_BLOCKS
    per_cta = STEPS_PER_CTA if tiles % STEPS_PER_CTA == 0 else 1
    kernel = functools.partial(_kernel, steps=per_cta, midpoints=qt.midpoints,
                               order=tuple(int(c) for c in qt.sorted_order), interpret=interpret)
    codes, absmax = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((blocks, BLOCK // 2), jnp.uint8),
                  jax.ShapeDtypeStruct((blocks,), jnp.float32)),
        grid=(tiles // per_cta,), grid_names=("c",),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )(words, jnp.asarray(cell_table.table(qt.midpoints)))
    return codes.reshape(-1), absmax
