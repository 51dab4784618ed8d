"""The prmt table decode of the Hopper kernel: its PTX text, run by a small PTX interpreter, and
its operand permutation, against plain table decoding."""

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
       "mad.lo.u32": lambda a, b, c: a * b + c,
       "prmt.b32": prmt, "mul.rn.bf16x2": packed_mul(ml_dtypes.bfloat16),
       "mul.rn.f16x2": packed_mul(np.float16)}


def run_ptx(ptx: str, args: dict[str, int], shared: bytes = b"") -> dict[str, int]:
    regs = dict(args)
    value = lambda tok: regs[tok] if tok in regs else int(tok, 0)
    for line in ptx.splitlines():
        line = line.split("//")[0].strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        dst, *srcs = [t.strip() for t in rest.split(",")]
        if op == "ld.shared.b32":  # [address] in bytes into ``shared``
            address = value(srcs[0].strip("[]"))
            assert address % 4 == 0
            regs[dst] = int.from_bytes(shared[address:address + 4], "little")
            continue
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


@pytest.mark.parametrize("copies,dtype", [(32, ml_dtypes.bfloat16), (16, ml_dtypes.bfloat16),
                                          (32, np.float16)])
@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_shared_table_decode_matches_the_register_decode(qtype, copies, dtype, rng):
    """The byte-pair table and its PTX give bit for bit what the prmt decode gives, for every
    lane (each reads its own copy of the table)."""
    values = codebooks.QTYPES[qtype].values
    mul = "mul.rn.bf16x2" if dtype == ml_dtypes.bfloat16 else "mul.rn.f16x2"
    table = L.pair_table(values, dtype, copies)
    base = 4096  # where the table starts in shared memory (bytes)
    shared = bytes(base) + table.astype("<u4").tobytes()
    smem_ptx = L._smem_ptx(copies, mul)
    assert set(re.findall(r"^\s*([a-z0-9.]+)\s", smem_ptx, re.M)) <= set(OPS) | {
        ".reg", "ld.shared.b32"}
    prmt_ptx = L._ptx(L.table_words(values, dtype), mul)
    for lane in range(32):
        word = int(rng.integers(0, 2**32))
        scale = np.asarray(rng.uniform(0.01, 3.0), np.float32).astype(dtype)
        s_bits = int(np.asarray(scale).view(np.uint16)) * 0x10001
        want = run_ptx(prmt_ptx, {"$4": word, "$5": s_bits})
        got = run_ptx(smem_ptx, {"$4": word, "$5": s_bits, "$6": base + 4 * (lane % copies)},
                      shared)
        assert [got[f"${i}"] for i in range(4)] == [want[f"${i}"] for i in range(4)]


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
