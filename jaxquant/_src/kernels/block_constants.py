"""A kernel step's block constants, decoded in registers from the QArray's own storage.

Double-quantized constants (bitsandbytes/QLoRA) are stored as one dynamic8 code per block, a
float32 nested scale per ``nested_block_size`` consecutive codes of the row-major ``(N, K/bs)``
code array, and one float32 offset: ``absmax = dynamic8[code] * nested[flat // 256] + offset``.
Each thread of the warpgroup needs the constants of its two rows (``16w + r`` and ``+ 8``, the
``WGMMA_ROW`` layout) for the step's blocks: per row one 32-bit load of its 4 codes, one nested
scale and 4 (L1-cached) table loads, so the kernel never rebuilds a float32 absmax array in HBM.
Plain float32 constants are loaded as is.
"""

from __future__ import annotations

import numpy as np


def registers(codes_ref, table_ref, nested_ref, offset_ref, *, blocks: int, row_length: int,
              nested_block: int):
    """Inside ``plgpu.inline_mgpu``: ``codes_ref`` is the tile's ``(64, blocks)`` window of the
    ``(N, row_length)`` constants (dynamic8 codes, or float32 constants when ``table_ref`` is
    None) -> ``blocks`` float32 (64,) arrays in the WGMMA_ROW layout."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, gpu, llvm, memref, vector
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils

    index = ir.IndexType.get()
    f32 = ir.F32Type.get()
    c = lambda v: utils.c(v, index)
    tid = arith.remui(gpu.thread_id(gpu.Dimension.x), c(128))
    lane = arith.remui(tid, c(32))
    first_row = arith.addi(arith.muli(arith.divui(tid, c(32)), c(16)), arith.divui(lane, c(4)))
    if table_ref is not None:
        # flat index of the window's (0, 0) in the (N, row_length) codes: picks the nested scale
        window_start = memref.extract_strided_metadata(codes_ref)[1]
        offset = memref.load(offset_ref, [c(0)])
    # A row's ``blocks`` codes are consecutive bytes: one aligned 32-bit load instead of four,
    # and they share one nested scale (``packed``; the caller guarantees the alignment).
    packed = table_ref is not None and blocks == 4 and row_length % 4 == 0 \
        and nested_block % 4 == 0
    if packed:
        i32 = ir.IntegerType.get_signless(32)
        window = utils.memref_ptr(codes_ref)
    def decoded(code, nested):  # absmax = dynamic8[code] * nested scale + offset
        return arith.addf(arith.mulf(memref.load(table_ref, [code]), nested), offset)

    columns = [[None, None] for _ in range(blocks)]
    for h in range(2):
        row = arith.addi(first_row, c(8 * h))
        if packed:
            row_start = arith.index_cast(i32, arith.muli(row, c(row_length)))
            row_ptr = utils.getelementptr(window, [row_start], ir.IntegerType.get_signless(8))
            word = llvm.load(i32, row_ptr, alignment=4)
            flat = arith.addi(window_start, arith.muli(row, c(row_length)))
            nested = memref.load(nested_ref, [arith.divui(flat, c(nested_block))])
        for j in range(blocks):
            if packed:
                byte = arith.andi(arith.shrui(word, utils.c(8 * j, i32)), utils.c(255, i32))
                value = decoded(arith.index_cast(index, byte), nested)
            else:
                value = memref.load(codes_ref, [row, c(j)])
                if table_ref is not None:
                    code = arith.index_cast(
                        index, arith.extui(ir.IntegerType.get_signless(32), value))
                    flat = arith.addi(window_start,
                                      arith.addi(arith.muli(row, c(row_length)), c(j)))
                    nested = memref.load(nested_ref, [arith.divui(flat, c(nested_block))])
                    value = decoded(code, nested)
            columns[j][h] = vector.broadcast(ir.VectorType.get((1,), f32), value)
    out = []
    for j in range(blocks):
        regs = np.empty((1, 1, 2, 1, 1), dtype=object)
        regs[0, 0, 0, 0, 0], regs[0, 0, 1, 0, 0] = columns[j]
        out.append(mgpu.FragmentedArray(_registers=regs, _layout=mgpu.WGMMA_ROW_LAYOUT,
                                        _is_signed=None))
    return out


def reference(codes, table, nested, offset, *, tile_row: int, first_block: int, row_length: int,
              nested_block: int):
    """What ``registers`` computes, in jnp (interpret mode): codes is the (64, blocks) window,
    table/nested/offset whole arrays (or None for float32 constants) -> (64, blocks) float32."""
    import jax.numpy as jnp
    from jax import lax

    if table is None:
        return codes
    rows = tile_row + lax.broadcasted_iota(jnp.int32, codes.shape, 0)
    flat = rows * row_length + first_block + lax.broadcasted_iota(jnp.int32, codes.shape, 1)
    return table[codes.astype(jnp.int32)] * nested[flat // nested_block] + offset[0]
