"""Decode 4-bit codes to bf16/fp16 wgmma operands in a few instructions per weight.

A 16-entry table of 16-bit values is looked up with ``prmt`` (byte permute): the low bytes and
the high bytes of the table each fill four 32-bit registers, ``prmt`` picks 4 bytes out of 8 by
3-bit selectors, and a third ``prmt`` picks between entries 0-7 and 8-15 by the code's top bit.
One 32-bit word of codes (8 weights) costs 5 shared setup ops, 16 ``prmt`` and 4 packed
multiplies by the block's scale: about 3 instructions per weight, against ~40 for a select tree
on unpacked codes (which keeps a kernel instruction-bound). Those ``prmt`` run on
the integer ALU pipe (half rate), which they kept 68% busy at 1 token on the H100; the
alternative (``pair_table``, ``codes_ptx`` + ``lookup_ptx``) looks each code byte up in a
256-entry table of value pairs in shared memory: one ``prmt``, one ``mad`` and one load per byte,
on other pipes. It also reads the codes in stored k order: each thread loads its row's 8 words of
a chunk straight from shared memory and looks up byte ``t`` of each, which is exactly the pair
of k that lane ``4r + t`` holds in the wgmma operand, so x is used as it is.

Layout trick of the register decode: a dot product does not care about the order of k, so the
decoded registers are placed where the wgmma register layout wants them *without* moving data
between threads, and x is permuted (once, in XLA; it is small) to match. ``PERMUTATION`` says
which stored k each operand column holds, within every 64 consecutive k.

Thread (lane ``4r + t`` of warp ``w``) loads, with ``plgpu.Layout.WGMMA`` on a ``(64, K/8)``
int32 view of the codes, words ``8g + 2t + e`` (e = 0, 1) of rows ``16w + r`` and ``16w + r + 8``.
Word nibble ``q`` (bits 4q..4q+3) is stored k ``8 * word + 2 * (q // 2) + 1 - q % 2`` (bitsandbytes
puts even k in the high nibble). Its decoded value goes to wgmma operand column
``64g + 8 * (4e + q // 2) + 2t + q % 2``, which is what that thread holds in the WGMMA layout.
"""

from __future__ import annotations

import numpy as np

CHUNK = 64  # operand columns decoded per call: 8 code words per row, one block of 64


def _permutation() -> np.ndarray:
    """``PERMUTATION[c]`` = the stored k (within a chunk of 64) that operand column c holds."""
    perm = np.empty(CHUNK, np.int32)
    for t in range(4):
        for e in range(2):
            for q in range(8):
                column = 8 * (4 * e + q // 2) + 2 * t + q % 2
                word = 2 * t + e
                perm[column] = 8 * word + 2 * (q // 2) + 1 - q % 2
    assert sorted(perm) == list(range(CHUNK))
    return perm


PERMUTATION = _permutation()


def _nibble_of_k(k):
    """Which nibble of its int32 code word holds stored k (bitsandbytes: even k high)."""
    return 2 * (k % 8 // 2) + 1 - k % 2


def permute_k(k: int) -> np.ndarray:
    """Indices that reorder x's contraction axis (length k, a multiple of 64) for the kernel."""
    return (np.arange(0, k, CHUNK)[:, None] + PERMUTATION[None, :]).reshape(-1)


def table_words(values, dtype) -> list[int]:
    """The 16 table values in ``dtype`` as 8 words: low bytes of entries 0-15, then high bytes."""
    bits = np.asarray(values, np.float32).astype(dtype).view(np.uint16).astype(np.uint32)
    words = []
    for byte in (bits & 0xFF, bits >> 8):
        words += [int(byte[i] | byte[i + 1] << 8 | byte[i + 2] << 16 | byte[i + 3] << 24)
                  for i in range(0, 16, 4)]
    return words


def _ptx(table: list[int], packed_mul: str) -> str:
    """PTX: $4 = a word of 8 codes, $5 = the scale in both halves; $0..$3 = 8 scaled values."""
    lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3 = table
    part = lambda idx, sel, out0, out1: f"""
    prmt.b32 p, {lo0}, {lo1}, {idx};
    prmt.b32 n, {lo2}, {lo3}, {idx};
    prmt.b32 lo, p, n, {sel};
    prmt.b32 p, {hi0}, {hi1}, {idx};
    prmt.b32 n, {hi2}, {hi3}, {idx};
    prmt.b32 hi, p, n, {sel};
    prmt.b32 v, lo, hi, 0x5140;
    {packed_mul} {out0}, v, $5;
    prmt.b32 v, lo, hi, 0x7362;
    {packed_mul} {out1}, v, $5;"""
    # idx: each nibble's low 3 bits select a byte of entries 0-7 or 8-15 (prmt ignores the
    # selectors' upper 16 bits, hence the shifted copies for nibbles 4-7); sel: byte i of the
    # positive (i) or the negative (4 + i) lookup, by the nibble's top bit
    return f"""{{
    .reg .b32 idx, idxh, sel, selh, p, n, lo, hi, v;
    and.b32 idx, $4, 0x77777777;
    shr.u32 idxh, idx, 16;
    shr.u32 sel, $4, 1;
    lop3.b32 sel, sel, 0x44444444, 0x32103210, 0xea;  // (a & b) | c
    shr.u32 selh, sel, 16;
    {part("idx", "sel", "$0", "$1")}
    {part("idxh", "selh", "$2", "$3")}
    }}"""


def pair_table(values, dtype, copies: int) -> np.ndarray:
    """The byte-pair table: (256, copies) uint32, entry ``b`` = the two values of code byte ``b``
    in ``dtype``, the high nibble's (the even k: bitsandbytes stores it there) in the low half,
    the lower operand column; repeated ``copies`` times along the minor axis so that lane ``l``
    reads copy ``l % copies`` from its own bank (no bank conflicts at 32 copies)."""
    bits = np.asarray(values, np.float32).astype(dtype).view(np.uint16).astype(np.uint32)
    byte = np.arange(256)
    entries = bits[byte >> 4] | bits[byte & 0xF] << 16
    return np.repeat(entries[:, None], copies, axis=1).astype(np.uint32)


def codes_ptx(row_bytes: int, chunk: int) -> str:
    """PTX loading the 8 code words of chunk ``chunk`` of one row of the step's codes (rows of
    ``row_bytes`` in shared memory, TMA-swizzled by ``row_bytes``): $8 = the codes' shared
    address, $9 = the row; $0..$7 = its words. The four lanes of a quad load the same ones."""
    units = row_bytes // 16  # 16-byte units per row; the swizzle XORs them with row bits
    assert units in (2, 4, 8), row_bytes
    return f"""{{
    .reg .b32 row, key, a0, a1;
    mad.lo.u32 row, $9, {row_bytes}, $8;
    mul.lo.u32 key, $9, {row_bytes};
    shr.u32 key, key, 3;
    and.b32 key, key, {(units - 1) << 4};  // (row offset >> 7) & (units - 1), in 16-byte units
    xor.b32 a0, key, {32 * chunk};
    add.u32 a0, a0, row;
    xor.b32 a1, key, {32 * chunk + 16};
    add.u32 a1, a1, row;
    ld.shared.v4.b32 {{$0, $1, $2, $3}}, [a0];
    ld.shared.v4.b32 {{$4, $5, $6, $7}}, [a1];
    }}"""


def lookup_ptx(copies: int, packed_mul: str) -> str:
    """PTX of the shared-memory decode in stored k order, so x needs no permutation: $8..$15 = a
    chunk's 8 code words of one row (``codes_ptx``), $16 = the ``prmt`` selector of byte ``t``
    (lane ``4r + t``), $17 = the scale in both halves, $18 = the shared address of this lane's
    table copy; $0..$7 = operand columns ``8i + 2t, 8i + 2t + 1`` = k ``8i + 2t (+1)`` of the
    chunk: the two codes of byte ``t`` of word ``i``. Per byte one ``prmt`` (integer ALU), one
    ``mad`` (FMA pipe), one ``ld.shared`` and one packed multiply, against about 5 ALU
    instructions per byte for the register decode."""
    lookups = "".join(f"""
    prmt.b32 b, ${8 + i}, 0, $16;
    mad.lo.u32 a, b, {4 * copies}, $18;
    ld.shared.b32 v, [a];
    {packed_mul} ${i}, v, $17;""" for i in range(8))
    return f"""{{
    .reg .b32 b, a, v;{lookups}
    }}"""


def _packed(dtype):
    """(packed multiply, f32 -> packed pair conversion, element type) for bf16 or fp16."""
    from jax._src.lib.mlir import ir

    if np.dtype(dtype) == np.dtype(np.float16):
        return "mul.rn.f16x2", "cvt.rn.f16x2.f32 $0, $1, $1;", ir.F16Type.get()
    return "mul.rn.bf16x2", "cvt.rn.bf16x2.f32 $0, $1, $1;", ir.BF16Type.get()


def _scale_pair(scale, h: int, cvt: str):
    """Row half ``h``'s block scale (a (64,) float32 in WGMMA_ROW layout) as a packed pair."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import vector
    from jax.experimental.mosaic.gpu import utils

    i32 = ir.IntegerType.get_signless(32)
    s = vector.extract(scale.registers[0, 0, h, 0, 0], [], [0])
    return utils.inline_ptx(cvt, utils.bitcast(s, i32), result_types=i32)


def _as_pairs(regs, out_elt):
    """Packed pairs held in i32 registers -> 2-vectors of the operand's element type."""
    from jax._src.lib.mlir import ir
    from jax.experimental.mosaic.gpu import utils

    return [utils.bitcast(reg, ir.VectorType.get((2,), out_elt)) for reg in regs]


def _operand(halves):
    """``halves[h][i]``: the pair of column group ``i`` in row half ``h`` -> the (64, 64)
    operand chunk, WGMMA layout."""
    from jax.experimental.mosaic import gpu as mgpu

    out = np.empty((1, CHUNK // 8, 1, 1, 2, 1, 1, 1, 1), dtype=object)
    for h, half in enumerate(halves):
        for i, pair in enumerate(half):
            out[0, i, 0, 0, h, 0, 0, 0, 0] = pair
    return mgpu.FragmentedArray(_registers=out, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)


def decode_from_table(codes_ref, row_bytes: int, scales, dtype, table, copies: int):
    """Inside ``plgpu.inline_mgpu``: the step's codes (a shared (64, row_bytes / 4) int32 ref,
    TMA-swizzled by ``row_bytes`` <= 128) and each chunk's block scales (64,) float32
    (WGMMA_ROW layout) -> the step's operand chunks (64, 64), WGMMA layout, in stored k order,
    looked up in the shared-memory ``pair_table`` ``table`` of ``copies`` copies. All the
    step's code words are loaded first, so their latency is paid once per step."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, gpu, llvm
    from jax.experimental.mosaic.gpu import utils

    i32 = ir.IntegerType.get_signless(32)
    c = lambda v: utils.c(v, i32)
    mul, cvt, out_elt = _packed(dtype)
    tid = arith.index_cast(i32, gpu.thread_id(gpu.Dimension.x))
    lane = arith.remui(tid, c(32))
    warp = arith.remui(arith.divui(tid, c(32)), c(4))
    rows = [arith.addi(arith.addi(arith.muli(warp, c(16)), arith.divui(lane, c(4))), c(8 * h))
            for h in range(2)]  # this thread's rows 16w + r and 16w + r + 8
    selector = arith.addi(c(0x4440), arith.remui(lane, c(4)))
    copy = arith.addi(llvm.ptrtoint(i32, utils.memref_ptr(table)),
                      arith.muli(arith.remui(lane, c(copies)), c(4)))
    codes = llvm.ptrtoint(i32, utils.memref_ptr(codes_ref))
    # side effects: nothing tells LLVM that these loads read what the step's copy wrote, so
    # they must not move above the pipeline's barrier wait
    words = [[utils.inline_ptx(codes_ptx(row_bytes, chunk), codes, row, result_types=[i32] * 8,
                               has_side_effects=True) for row in rows]
             for chunk in range(len(scales))]
    lookup = lookup_ptx(copies, mul)
    return [_operand([_as_pairs(utils.inline_ptx(lookup, *words[chunk][h], selector,
                                                 _scale_pair(scale, h, cvt), copy,
                                                 result_types=[i32] * 8), out_elt)
                      for h in range(2)])
            for chunk, scale in enumerate(scales)]


def decode_registers(codes, scale, chunk: int, values, dtype):
    """Inside ``plgpu.inline_mgpu``: codes (64, W) int32 (WGMMA layout) and the chunk's block
    scales (64,) float32 (WGMMA_ROW layout) -> operand chunk ``chunk`` (64, 64), WGMMA layout,
    in ``PERMUTATION`` order."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import vector
    from jax.experimental.mosaic.gpu import utils

    i32 = ir.IntegerType.get_signless(32)
    mul, cvt, out_elt = _packed(dtype)
    ptx = _ptx(table_words(values, dtype), mul)
    halves = []
    for h in range(2):  # rows 16w + r and 16w + r + 8
        s2 = _scale_pair(scale, h, cvt)
        word_pair = codes.registers[0, chunk, 0, 0, h, 0, 0, 0, 0]
        halves.append([])
        for e in range(2):  # column groups 4e .. 4e + 3
            word = utils.bitcast(vector.extract(word_pair, [], [e]), i32)
            regs = utils.inline_ptx(ptx, word, s2, result_types=[i32] * 4)
            halves[h] += _as_pairs(regs, out_elt)
    return _operand(halves)


def select_decode(codes, values, dtype):
    """4-bit codes -> table values in ``dtype`` by a select tree on the code's bits (scalar
    constants only: Pallas kernels cannot capture arrays)."""
    import jax.numpy as jnp

    level = [jnp.asarray(v, dtype) for v in values]
    for bit in range(4):
        set_ = (codes & (1 << bit)) != 0
        level = [jnp.where(set_, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def decode_reference(words, scale, values, dtype, permuted: bool = True):
    """What ``decode_registers`` (``permuted``) or ``decode_from_table`` computes, in jnp (for
    interpret mode): words (64, 8) int32, scale (64,) float32 -> (64, 64) operand columns in
    ``PERMUTATION`` order or in stored k order, same roundings."""
    import jax.numpy as jnp

    table = np.asarray(values, np.float32).astype(dtype)  # rounded to dtype first, as the PTX
    scale = scale.astype(dtype)[:, None]
    order = PERMUTATION if permuted else np.arange(CHUNK)
    columns = [select_decode((words[:, word:word + 1] >> int(4 * nibble)) & 0xF, table, dtype)
               for word, nibble in zip(order // 8, _nibble_of_k(order))]
    return jnp.concatenate(columns, axis=1) * scale
