"""The decodes of the Hopper kernel (prmt lookups in registers, and the shared-memory byte-pair
table): their PTX text, run by a small PTX interpreter, and the register decode's operand
permutation, against plain table decoding."""

import re

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxquant._src import codebooks
from jaxquant._src.kernels import nibble_lut as L

MASK = 0xFFFFFFFF


def prmt(a, b, sel):
    pool = (b << 32 | a).to_bytes(8, "little")
    out = 0
    for i in range(4):
        nib = sel >> 4 * i & 0xF
        byte = pool[nib & 7]
        if nib & 8:  # sign-replicate mode (the decode must never use it)
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * i
    return out


def lop3(a, b, c, lut):
    out = 0
    for bit in range(32):
        idx = (a >> bit & 1) << 2 | (b >> bit & 1) << 1 | (c >> bit & 1)
        out |= (lut >> idx & 1) << bit
    return out


def packed_mul(dtype):
    def mul(a, b):
        halves = lambda r: np.array([r & 0xFFFF, r >> 16], np.uint16).view(dtype)
        prod = (halves(a).astype(np.float32) * halves(b).astype(np.float32)).astype(dtype)
        lo, hi = prod.view(np.uint16).astype(np.uint32)
        return int(lo | hi << 16)
    return mul


OPS = {"and.b32": lambda a, b: a & b, "shr.u32": lambda a, b: a >> b, "lop3.b32": lop3,
       "mad.lo.u32": lambda a, b, c: a * b + c, "mul.lo.u32": lambda a, b: a * b,
       "add.u32": lambda a, b: a + b, "xor.b32": lambda a, b: a ^ b,
       "prmt.b32": prmt, "mul.rn.bf16x2": packed_mul(ml_dtypes.bfloat16),
       "mul.rn.f16x2": packed_mul(np.float16)}
LOADS = {"ld.shared.b32": 1, "ld.shared.v4.b32": 4}


def run_ptx(ptx: str, args: dict[str, int], shared: bytes = b"") -> dict[str, int]:
    regs = dict(args)
    value = lambda tok: regs[tok] if tok in regs else int(tok, 0)
    for line in ptx.splitlines():
        line = line.split("//")[0].strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op in LOADS:  # {dst, ...}, [address]: 32-bit words from ``shared`` (bytes)
            dsts, address = re.fullmatch(r"\{?([^}\[]+?)\}?,\s*\[(\S+)\]", rest).groups()
            address = value(address)
            assert address % (4 * LOADS[op]) == 0, (op, address)
            for i, dst in enumerate(d.strip() for d in dsts.split(",")):
                regs[dst] = int.from_bytes(shared[address + 4 * i:address + 4 * i + 4], "little")
            continue
        dst, *srcs = [t.strip() for t in rest.split(",")]
        regs[dst] = OPS[op](*map(value, srcs)) & MASK
    return regs


@pytest.mark.parametrize("qtype", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16])
def test_ptx_decodes_every_nibble_like_the_table(qtype, dtype, rng):
    values = codebooks.QTYPES[qtype].values
    mul = "mul.rn.bf16x2" if dtype == ml_dtypes.bfloat16 else "mul.rn.f16x2"
    ptx = L._ptx(L.table_words(values, dtype), mul)
    assert set(re.findall(r"^\s*([a-z0-9.]+)\s", ptx, re.M)) <= set(OPS) | {".reg"}
    table = np.asarray(values, np.float32).astype(dtype).astype(np.float32)
    for _ in range(50):
        word = int(rng.integers(0, 2**32))
        scale = np.asarray(rng.uniform(0.01, 3.0), np.float32).astype(dtype)
        s_bits = int(np.asarray(scale).view(np.uint16))
        regs = run_ptx(ptx, {"$4": word, "$5": s_bits | s_bits << 16})
        got = np.array([regs[f"${i}"] for i in range(4)], np.uint32).view(np.uint16).view(dtype)
        nibbles = [(word >> 4 * q) & 0xF for q in range(8)]  # output half q holds nibble q
        want = (table[nibbles] * np.float32(scale)).astype(dtype)
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def tma_swizzled(tile: np.ndarray) -> bytes:
    """A (rows, S) byte tile as TMA stores it with an S-byte swizzle (S = 32, 64 or 128): within
    each row the 16-byte units are XORed with bits 7.. of the byte offset."""
    rows, row_bytes = tile.shape
    out = np.empty(rows * row_bytes, np.uint8)
    offsets = np.arange(rows * row_bytes)
    out[offsets ^ (((offsets >> 7) & (row_bytes // 16 - 1)) << 4)] = tile.reshape(-1)
    return out.tobytes()


@pytest.mark.parametrize("copies,dtype,tile_k", [(32, ml_dtypes.bfloat16, 256),
                                                 (16, ml_dtypes.bfloat16, 128),
                                                 (32, np.float16, 64)])
@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_shared_table_decode_puts_each_weight_where_the_operand_wants_it(qtype, copies, dtype,
                                                                        tile_k, rng):
    """Every lane of the warpgroup, both of its rows, every chunk of a step: the PTX reads the
    swizzled codes, looks them up in the table and gives, bit for bit, the scaled values of stored k ``64 chunk + 8i +
    2t`` and ``+1`` in register i (the WGMMA operand layout, x not permuted)."""
    values = codebooks.QTYPES[qtype].values
    mul = "mul.rn.bf16x2" if dtype == ml_dtypes.bfloat16 else "mul.rn.f16x2"
    row_bytes = tile_k // 2
    codes = rng.integers(0, 256, (64, row_bytes), dtype=np.uint8)  # bitsandbytes bytes
    per_k = np.stack([codes >> 4, codes & 0xF], axis=-1).reshape(64, tile_k)  # even k: high
    table_at, codes_at = 16384, 1024  # shared addresses (bytes); codes 1024-aligned, as TMA's
    shared = bytearray(table_at + 256 * copies * 4)
    shared[codes_at:codes_at + codes.size] = tma_swizzled(codes)
    shared[table_at:] = L.pair_table(values, dtype, copies).astype("<u4").tobytes()
    grid = np.asarray(values, np.float32).astype(dtype).astype(np.float32)
    lookup = L.lookup_ptx(copies, mul)
    for chunk in range(tile_k // 64):
        load = L.codes_ptx(row_bytes, chunk)
        for thread in range(0, 128, 5):  # a spread of warps and lanes
            warp, lane = divmod(thread, 32)
            r, t = divmod(lane, 4)
            for row in (16 * warp + r, 16 * warp + r + 8):
                scale = np.asarray(rng.uniform(0.01, 3.0), np.float32).astype(dtype)
                s_bits = int(np.asarray(scale).view(np.uint16)) * 0x10001
                words = run_ptx(load, {"$8": codes_at, "$9": row}, bytes(shared))
                got = run_ptx(lookup, {**{f"${8 + i}": words[f"${i}"] for i in range(8)},
                                       "$16": 0x4440 + t, "$17": s_bits,
                                       "$18": table_at + 4 * (lane % copies)}, bytes(shared))
                got = np.array([got[f"${i}"] for i in range(8)], np.uint32)
                ks = 64 * chunk + 8 * np.arange(8)[:, None] + 2 * t + np.arange(2)
                want = (grid[per_k[row, ks]] * np.float32(scale)).astype(dtype)
                np.testing.assert_array_equal(got.view(np.uint16).reshape(8, 2),
                                              want.view(np.uint16))


def test_permutation_is_a_bijection_within_blocks_of_64():
    perm = L.permute_k(256)
    assert sorted(perm) == list(range(256))
    assert np.all(perm // 64 == np.arange(256) // 64)


def test_reference_decode_reads_the_stored_k_that_the_permutation_names(rng):
    """Operand column c of a chunk must hold the weight stored at k = PERMUTATION[c]."""
    codes = rng.integers(0, 256, (64, 32), dtype=np.uint8)  # bitsandbytes bytes: (rows, K/2)
    words = codes.reshape(64, 8, 4).view(np.uint32).reshape(64, 8).view(np.int32)
    per_k = np.stack([codes >> 4, codes & 0xF], axis=-1).reshape(64, 64)  # even k: high nibble
    values = codebooks.QTYPES["nf4"].values
    scale = rng.uniform(0.5, 2, 64).astype(np.float32)
    out = L.decode_reference(jnp.asarray(words), jnp.asarray(scale), values, jnp.bfloat16)
    want = (np.asarray(values, np.float32)[per_k[:, L.PERMUTATION]]
            .astype(ml_dtypes.bfloat16).astype(np.float32)
            * scale.astype(ml_dtypes.bfloat16).astype(np.float32)[:, None])
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  want.astype(ml_dtypes.bfloat16).astype(np.float32))
