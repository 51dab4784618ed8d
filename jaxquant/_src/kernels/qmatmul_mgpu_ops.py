"""Inline Mosaic GPU building blocks of the Hopper qmatmul kernel (``qmatmul_mgpu``): a step's
code words decoded into wgmma operands (``nibble_lut``), its block constants loaded in registers
(``block_constants``), and a finished tile stored transposed. Each runs inside the kernel body;
the ``interpret`` paths compute the same values through jnp for the Pallas GPU interpreter.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxquant._src.kernels import block_constants, nibble_lut
from jaxquant._src.kernels.qmatmul_tuning import TILE_N


def operand_type(dtype):
    """A decoded (64, 64) wgmma A operand chunk, in registers."""
    return plgpu.ShapeDtypeStruct((TILE_N, nibble_lut.CHUNK), dtype, layout=plgpu.Layout.WGMMA)


def decode_chunk(codes, scale, chunk, values, dtype):
    """Operand columns ``64 chunk ..`` of the step (in ``PERMUTATION`` order), decoded in
    registers from code words already loaded, by inline PTX."""
    @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA.reduce(1)),
                       return_type=operand_type(dtype))
    def decode(_, codes, scale):
        return nibble_lut.decode_registers(codes, scale, chunk, values, dtype)
    return decode(codes, scale)


def decode_step_from_table(codes_smem, codes_transforms, scales, dtype, table, row_bytes):
    """The step's operand chunks in stored k order, each code byte looked up in the
    shared-memory byte-pair ``table``; ``scales``: each chunk's block scales."""
    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(codes_transforms),
                                  [plgpu.Layout.WGMMA.reduce(1)] * len(scales), plgpu.RefType()),
                       return_type=[operand_type(dtype)] * len(scales))
    def decode(_, codes, scales, table_ref):
        return nibble_lut.decode_from_table(codes, row_bytes, scales, dtype, table_ref,
                                            copies=table.shape[1])
    return decode(codes_smem, list(scales), table)


def step_constants(consts_gmem, dq_gmem, ni, first_block, *, blocks, row_length, nested_block,
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


def store_transposed(acc, out_ref, interpret: bool, first: int = 0):
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
