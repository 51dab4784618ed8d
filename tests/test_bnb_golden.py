"""Bit-exactness with bitsandbytes 0.50.2 (CPU/default path), from committed golden vectors.

tests/data/bnb_golden.npz comes from scripts/make_bnb_golden.py, run with the real
bitsandbytes; these tests need no torch.
"""

import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant._src import codebooks

GOLDEN = np.load(pathlib.Path(__file__).parent / "data" / "bnb_golden.npz")
CASES = sorted({k.split("/")[0] for k in GOLDEN.files if "/" in k})


def load(name):
    entries = {k.split("/", 1)[1]: GOLDEN[k] for k in GOLDEN.files if k.startswith(name + "/")}
    qtype, bs = name.split("_")[0], int(name.split("_")[1][1:])
    dtype = entries.pop("input_dtype").tobytes().decode()
    x = jnp.asarray(entries.pop("input")).astype(dtype)
    deq = entries.pop("dequantized")
    state = json.loads(entries[f"weight.quant_state.bitsandbytes__{qtype}"].tobytes())
    return x, qtype, bs, "nested_offset" in state, entries, state, deq


def exact_reference(entries, state, qtype):
    """float32 dequantization of a bitsandbytes dict, written out in numpy."""
    n, bs = int(np.prod(state["shape"])), state["blocksize"]
    absmax = entries["weight.absmax"]
    if "nested_offset" in state:
        nested = entries["weight.nested_absmax"][np.arange(absmax.size) // state["nested_blocksize"]]
        absmax = (codebooks.DYNAMIC8_SIGNED[absmax] * nested).astype(np.float32)
        absmax = absmax + np.float32(state["nested_offset"])
    w = entries["weight"].reshape(-1)
    codes = np.stack([w >> 4, w & 0xF], -1).reshape(-1)[:n]
    return (codebooks.QTYPES[qtype].values[codes] * absmax[np.arange(n) // bs]).reshape(state["shape"])


def test_golden_file_covers_the_required_cases():
    assert json.loads(GOLDEN["meta"].tobytes())["bitsandbytes"] == "0.50.2"
    assert {int(c.split("_")[1][1:]) for c in CASES} == {32, 64, 128, 256, 512, 1024, 2048, 4096}
    assert {c.split("_")[0] for c in CASES} == {"nf4", "fp4"}
    assert any("bf" in c for c in CASES) and any("dq" in c for c in CASES)
    assert any("ties" in c for c in CASES)  # a partial last block on midpoints: bnb divides there


@pytest.mark.parametrize("name", CASES)
def test_quantize_gives_bitsandbytes_bytes_and_absmax(name):
    x, qtype, bs, dq, bnb, bnb_state, _ = load(name)
    ours = jq.to_bnb(jq.quantize(x, qtype, bs, double_quant=dq))
    assert set(ours) == set(bnb)
    np.testing.assert_array_equal(ours["weight"], bnb["weight"])
    np.testing.assert_array_equal(ours["weight.quant_map"], bnb["weight.quant_map"])
    state = json.loads(ours[f"weight.quant_state.bitsandbytes__{qtype}"].tobytes())
    offset, bnb_offset = state.pop("nested_offset", None), bnb_state.pop("nested_offset", None)
    assert state == bnb_state
    if not dq:
        absmax, bnb_absmax = ours["weight.absmax"], bnb["weight.absmax"]
        if name.endswith("zerotail"):
            # bitsandbytes' default path stores the clamp 1e-38 for an all-zero PARTIAL last
            # block (0.0 for a full one); jaxquant stores 0.0 for both. Both dequantize to 0.
            assert absmax[-1] == 0 and bnb_absmax[-1] == np.float32(1e-38)
            absmax, bnb_absmax = absmax[:-1], bnb_absmax[:-1]
        np.testing.assert_array_equal(absmax, bnb_absmax)
        return
    # The offset is a float32 mean: its last bits depend on the summation order.
    assert abs(offset - bnb_offset) <= 2e-7 * abs(bnb_offset)
    np.testing.assert_array_equal(ours["weight.nested_quant_map"], bnb["weight.nested_quant_map"])
    # A last-bit offset difference can move a nested code by one level at a decision boundary.
    moved = ours["weight.absmax"].astype(int) - bnb["weight.absmax"].astype(int)
    assert np.abs(moved).max() <= 1 and np.count_nonzero(moved) <= 0.01 * moved.size
    np.testing.assert_allclose(ours["weight.nested_absmax"], bnb["weight.nested_absmax"], rtol=1e-6)


@pytest.mark.parametrize("name", [c for c in CASES if "dq" in c])
def test_nested_codes_are_exact_nearest_given_bitsandbytes_offset(name):
    """Same offset in, same nested absmax out; codes equal bitsandbytes' except where its CPU
    build's coarse lookup table misses the nearest level (its CUDA path is exact): there ours
    must be strictly nearer."""
    x, qtype, bs, _, bnb, state, _ = load(name)
    absmax = jq.quantize(x, qtype, bs).scale
    centred = absmax - jnp.float32(state["nested_offset"])
    nested = jq.quantize(centred, "dynamic8", 256)
    np.testing.assert_array_equal(np.asarray(nested.scale), bnb["weight.nested_absmax"])
    ours, theirs = np.asarray(nested.codes), bnb["weight.absmax"]
    differ = np.flatnonzero(ours != theirs)
    assert differ.size <= 0.01 * ours.size
    table = codebooks.DYNAMIC8_SIGNED
    scaled = np.asarray(centred)[differ] * (np.float32(1) / np.asarray(nested.scale)[differ // 256])
    assert np.all(np.abs(scaled - table[ours[differ]]) < np.abs(scaled - table[theirs[differ]]))


@pytest.mark.parametrize("name", CASES)
def test_dequantize_of_bitsandbytes_dict_is_exact(name):
    x, qtype, _, _, bnb, state, bnb_dequantized = load(name)
    q = jq.from_bnb(bnb)
    ref = exact_reference(bnb, state, qtype)
    np.testing.assert_array_equal(np.asarray(jq.dequantize(q, jnp.float32)), ref)
    ours = np.asarray(jq.dequantize(q).astype(jnp.float32))
    np.testing.assert_array_equal(ours, np.asarray(jnp.asarray(ref).astype(x.dtype).astype(jnp.float32)))
    if x.dtype == jnp.float32:  # bitsandbytes' own output (its bf16 CPU kernel has known bugs)
        # reshape: bitsandbytes returns (1, n) for a 1-D input (its issue #2047), jaxquant (n,)
        np.testing.assert_array_equal(ours, bnb_dequantized.reshape(ours.shape))


@pytest.mark.parametrize("name", [c for c in CASES if "_2d" in c or "dq" in c])
def test_to_bnb_round_trips_through_from_bnb(name):
    x, qtype, bs, dq, *_ = load(name)
    q = jq.quantize(x, qtype, bs, double_quant=dq)
    q2 = jq.from_bnb(jq.to_bnb(q))
    np.testing.assert_array_equal(jq.dequantize(q2), jq.dequantize(q))
