"""The quantize kernel's code search as one shared-memory lookup per value.

The code of a scaled value ``n`` is the number of the table's midpoints strictly below it. A
binary search over 15 midpoints costs ~25 ALU instructions per value, which made the kernel
compute-bound at 41% of a copy's bandwidth. Here ``[-1, 1]`` is cut into 32 uniform cells,
``cell = floor(32 * sat(0.5 n + 0.5))`` (two FMAs; NaN saturates to cell 0), and each cell stores
the number of midpoints below it and the few midpoints inside it (one for NF4, two for FP4, whose
codes +-0.0052 crowd around zero), so ``code = below + sum(n > inside)``: a load and one compare
per midpoint. The cells' limits are found exactly (by bisection over float32 bit patterns) for
this very arithmetic, so the result equals the binary search for every float32, not nearly.

Each row (cell) is replicated for every lane of a load phase, so that a warp's 32 lookups, wherever
its values fall, hit distinct shared-memory banks.
"""

from __future__ import annotations

import functools

import numpy as np

from jaxquant._src import codebooks

CELLS = 33  # floor(32 u) for u in [0, 1]: u = 1 (n >= 1) has a cell of its own
ROW_WORDS = 32  # one 128-byte row per cell: all 32 banks
_MAGIC = 0x4B000000  # bits of 2**23: floor(32 u) + 2**23 has the cell in its low bits


def cell_of(n):
    """The cell of float32 ``n`` exactly as the kernel computes it (numpy or jnp arrays)."""
    xp = _namespace(n)
    u = n * np.float32(0.5) + np.float32(0.5)  # n * 0.5 is exact: one rounding, as the FMA's
    u = xp.where(u > 0, xp.minimum(u, np.float32(1)), np.float32(0))  # sat: NaN -> 0
    return xp.floor(u * np.float32(32)).astype(np.int32)  # 32 u is exact


def _first_in_cell(cell: int) -> np.float32:
    """The smallest float32 whose cell is >= ``cell`` (cells are monotonic in n)."""
    lo, hi = -0x7F800000, 0x7F800000  # -inf and +inf in the ordered ints
    while lo < hi:
        mid = (lo + hi) // 2
        if int(cell_of(np.array([_from_ordered(mid)]))[0]) >= cell:
            hi = mid
        else:
            lo = mid + 1
    return _from_ordered(lo)


def _from_ordered(i: int) -> np.float32:
    """The float32 at position ``i`` of the total order of non-NaN floats (0 is +0.0)."""
    bits = i if i >= 0 else (-i) | (1 << 31)
    return np.array([bits & 0xFFFFFFFF], np.uint32).view(np.float32)[0]


def midpoints_per_cell(midpoints) -> int:
    return _cells(_key(midpoints))[1].shape[1]


def _key(midpoints) -> tuple:
    return tuple(float(m) for m in np.asarray(midpoints, np.float32))


@functools.lru_cache(maxsize=None)
def _cells(midpoints: tuple):
    """(midpoints below each cell, the midpoints inside it padded with +inf)."""
    starts = np.array([-np.inf] + [_first_in_cell(c) for c in range(1, CELLS)], np.float32)
    lasts = np.append(np.nextafter(starts[1:], np.float32(-np.inf)), np.float32(np.inf))
    return codebooks.cell_entries(np.asarray(midpoints, np.float32), starts, lasts)


def entry_words(midpoints) -> int:
    """32-bit words per entry: the count and the inside midpoints, padded to a vector load."""
    return 2 if midpoints_per_cell(midpoints) == 1 else 4


@functools.lru_cache(maxsize=None)
def _table(midpoints: tuple) -> np.ndarray:
    words = entry_words(midpoints)
    below, inside = _cells(midpoints)
    if inside.shape[1] > words - 1:
        raise ValueError(f"a cell holds {inside.shape[1]} midpoints, more than {words - 1}")
    rows = np.full((CELLS, words), np.float32(np.inf)).view(np.int32)
    rows[:, 0] = below
    rows[:, 1:1 + inside.shape[1]] = inside.view(np.int32)
    return np.tile(rows, (1, ROW_WORDS // words))


def table(midpoints) -> np.ndarray:
    """(CELLS, ROW_WORDS) int32: per cell, ``ROW_WORDS // entry_words`` copies of the entry
    [below, inside midpoints' bits..., +inf padding]."""
    return _table(_key(midpoints))


def codes_reference(n, table_rows, words: int):
    """What the kernel's lookup computes, in numpy or jnp: the sorted code index of float32
    ``n`` from ``table(midpoints)`` (its first copy of each entry; ``entry_words`` words)."""
    xp = _namespace(n)
    entry = xp.asarray(table_rows)[:, :words][cell_of(n)]
    inside = entry[..., 1:].view(np.float32) if xp is np else _bitcast_f32(entry[..., 1:])
    return entry[..., 0] + xp.sum(n[..., None] > inside, axis=-1).astype(np.int32)


def _bitcast_f32(words):
    from jax import lax
    import jax.numpy as jnp
    return lax.bitcast_convert_type(words, jnp.float32)


def _namespace(n):
    if isinstance(n, np.ndarray):
        return np
    import jax.numpy as jnp
    return jnp


def codes_registers(scaled, table_ref, words: int, per_cell: int):
    """Inside ``plgpu.inline_mgpu``: float32 ``scaled`` (any layout) and the ``table`` in shared
    memory -> the int32 sorted code indices, one inline PTX block per value: two FMAs find the
    cell, one ``mad`` its address (this lane's copy), one vector load the entry, and a
    ``set``/``sub`` pair per inside midpoint adds the compares."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, gpu, llvm, vector
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils

    i32 = ir.IntegerType.get_signless(32)
    index = ir.IndexType.get()
    copies = ROW_WORDS // words
    lane = arith.index_cast(i32, arith.remui(gpu.thread_id(gpu.Dimension.x), utils.c(copies, index)))
    base = llvm.ptrtoint(i32, utils.memref_ptr(table_ref))
    # byte address = base + 4 ROW_WORDS cell + 4 words lane, with cell = bits(t) - _MAGIC
    unbias = np.uint32((-_MAGIC * 4 * ROW_WORDS) % 2**32).view(np.int32)
    offset = arith.addi(arith.addi(base, arith.muli(lane, utils.c(4 * words, i32))),
                        utils.c(int(unbias), i32))
    entry = ", ".join(["k"] + [f"m{j}" for j in range(1, words)])
    compares = "".join(f"""
    set.gt.u32.f32 g, $1, m{j};
    sub.s32 k, k, g;""" for j in range(1, per_cell + 1))
    ptx = f"""{{
    .reg .b32 u, t, a, g, {entry};
    fma.rn.sat.f32 u, $1, 0f3F000000, 0f3F000000;
    fma.rm.f32 t, u, 0f42000000, 0f4B000000;
    mad.lo.u32 a, t, {4 * ROW_WORDS}, $2;
    ld.shared.v{words}.u32 {{{entry}}}, [a];{compares}
    mov.b32 $0, k;
    }}"""
    out = np.empty(scaled.registers.shape, dtype=object)
    for idx, reg in np.ndenumerate(scaled.registers):
        length = ir.VectorType(reg.type).shape[0]
        codes = llvm.mlir_undef(ir.VectorType.get((length,), i32))
        for e in range(length):
            code = utils.inline_ptx(ptx, vector.extract(reg, [], [e]), offset, result_types=i32)
            codes = vector.insert(code, codes, [], [e])
        out[idx] = codes
    return mgpu.FragmentedArray(_registers=out, _layout=scaled.layout, _is_signed=True)
