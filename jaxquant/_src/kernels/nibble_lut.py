"""Decode 4-bit codes to bf16/fp16 wgmma operands in a few instructions per weight.

A 16-entry table of 16-bit values is looked up with ``prmt`` (byte permute): the low bytes and
the high bytes of the table each fill four 32-bit registers, ``prmt`` picks 4 bytes out of 8 by
3-bit selectors, and a third ``prmt`` picks between entries 0-7 and 8-15 by the code's top bit.
One 32-bit word of codes (8 weights) costs 5 shared setup ops, 16 ``prmt`` and 4 packed
multiplies by the block's scale: about 3 instructions per weight, against ~40 for a select tree
on unpacked codes (what kernel v2 did, and why it was instruction-bound). Those ``prmt`` run on
the integer ALU pipe (half rate), which they kept 68% busy at 1 token on the H100; the
alternative (``pair_table``) looks each code byte up in a 256-entry table of value pairs in
shared memory: one ``prmt``, one ``mad`` and one load per byte, on other pipes.

Layout trick: a dot product does not care about the order of k, so the decoded registers are
placed where the wgmma register layout wants them *without* moving data between threads, and x
is permuted (once, in XLA; it is small) to match. ``PERMUTATION`` says which stored k each
operand column holds, within every 64 consecutive k.

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
# word (within the chunk's 8) and nibble that operand column c comes from
WORD_OF_COLUMN = PERMUTATION // 8
NIBBLE_OF_COLUMN = 2 * (PERMUTATION % 8 // 2) + 1 - PERMUTATION % 2


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
    """The byte-pair table: (256, copies) uint32, entry ``b`` = the two values of code byte
    ``b`` in ``dtype`` (low half: the low nibble's, which the decode puts in the lower column),
    repeated ``copies`` times along the minor axis so that lane ``l`` reads copy ``l % copies``
    from its own bank (no bank conflicts at 32 copies)."""
    bits = np.asarray(values, np.float32).astype(dtype).view(np.uint16).astype(np.uint32)
    byte = np.arange(256)
    entries = bits[byte & 0xF] | bits[byte >> 4] << 16
    return np.repeat(entries[:, None], copies, axis=1).astype(np.uint32)


def _smem_ptx(copies: int, packed_mul: str) -> str:
    """PTX of the shared-memory decode: $4 = a word of 8 codes, $5 = the scale in both halves,
    $6 = the shared address of this lane's table copy; $0..$3 = 8 scaled values. Per byte one
    ``prmt`` (integer ALU), one ``mad`` (FMA pipe), one ``ld.shared`` and one packed multiply,
    against about 5 ALU instructions per byte for the register decode."""
    lookups = "".join(f"""
    prmt.b32 b, $4, 0, {0x4440 + i:#x};
    mad.lo.u32 a, b, {4 * copies}, $6;
    ld.shared.b32 v, [a];
    {packed_mul} ${i}, v, $5;""" for i in range(4))
    return f"""{{
    .reg .b32 b, a, v;{lookups}
    }}"""


def decode_registers(codes, scale, chunk: int, values, dtype, raw: bool = False,
                     table=None, copies: int = 0):
    """Inside ``plgpu.inline_mgpu``: codes (64, W) int32 (WGMMA layout) and the chunk's block
    scales (64,) float32 (WGMMA_ROW layout) -> operand chunk ``chunk`` (64, 64), WGMMA layout.
    With ``table`` (a shared-memory ``pair_table`` of ``copies`` copies) each code byte is one
    shared-memory load instead of ``prmt`` arithmetic.
    ``raw`` (experiments only) skips the decode: the code words themselves, as garbage values."""
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, gpu, llvm, vector
    from jax.experimental.mosaic import gpu as mgpu
    from jax.experimental.mosaic.gpu import utils

    i32 = ir.IntegerType.get_signless(32)
    is_bf16 = np.dtype(dtype) != np.dtype(np.float16)
    mul = "mul.rn.bf16x2" if is_bf16 else "mul.rn.f16x2"
    extra = ()
    if table is None:
        ptx = _ptx(table_words(values, dtype), mul)
    else:
        ptx = _smem_ptx(copies, mul)
        lane = arith.remui(arith.index_cast(i32, gpu.thread_id(gpu.Dimension.x)),
                           utils.c(32, i32))
        start = llvm.ptrtoint(i32, utils.memref_ptr(table))
        extra = (arith.addi(start, arith.muli(arith.remui(lane, utils.c(copies, i32)),
                                              utils.c(4, i32))),)
    cvt = "cvt.rn.bf16x2.f32 $0, $1, $1;" if is_bf16 else "cvt.rn.f16x2.f32 $0, $1, $1;"
    out_elt = ir.BF16Type.get() if is_bf16 else ir.F16Type.get()
    out = np.empty((1, CHUNK // 8, 1, 1, 2, 1, 1, 1, 1), dtype=object)
    for h in range(2):  # rows 16w + r and 16w + r + 8
        s = vector.extract(scale.registers[0, 0, h, 0, 0], [], [0])
        s2 = utils.inline_ptx(cvt, utils.bitcast(s, i32), result_types=i32)
        word_pair = codes.registers[0, chunk, 0, 0, h, 0, 0, 0, 0]
        for e in range(2):
            word = utils.bitcast(vector.extract(word_pair, [], [e]), i32)
            regs = [word] * 4 if raw else utils.inline_ptx(ptx, word, s2, *extra,
                                                           result_types=[i32] * 4)
            for j, reg in enumerate(regs):
                vec = utils.bitcast(reg, ir.VectorType.get((2,), out_elt))
                out[0, 4 * e + j, 0, 0, h, 0, 0, 0, 0] = vec
    return mgpu.FragmentedArray(_registers=out, _layout=mgpu.WGMMA_LAYOUT, _is_signed=None)


def select_decode(codes, values, dtype):
    """4-bit codes -> table values in ``dtype`` by a select tree on the code's bits (scalar
    constants only: Pallas kernels cannot capture arrays)."""
    import jax.numpy as jnp

    level = [jnp.asarray(v, dtype) for v in values]
    for bit in range(4):
        set_ = (codes & (1 << bit)) != 0
        level = [jnp.where(set_, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


def decode_reference(words, scale, values, dtype):
    """What ``decode_registers`` computes, in jnp (for interpret mode): words (64, 8) int32,
    scale (64,) float32 -> (64, 64) operand columns in the permuted order, same roundings."""
    import jax.numpy as jnp

    table = np.asarray(values, np.float32).astype(dtype)  # rounded to dtype first, as the PTX
    scale = scale.astype(dtype)[:, None]
    columns = [select_decode((words[:, word:word + 1] >> int(4 * nibble)) & 0xF, table, dtype)
               for word, nibble in zip(WORD_OF_COLUMN, NIBBLE_OF_COLUMN)]
    return jnp.concatenate(columns, axis=1) * scale
