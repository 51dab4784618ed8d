"""Bad values never become a wrong number: NaN/Inf anywhere, magnitudes at float32's ends,
subnormals. Each input either round-trips within its qtype's error bound or is refused (a
concrete input) / gives NaN exactly where it should (under jit)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxquant as jq
from jaxquant._src import codebooks

TINY = float(np.finfo(np.float32).tiny)
MAX = float(np.finfo(np.float32).max)
KINDS = [("nf4", False), ("fp4", False), ("dynamic8", False), ("int4", False), ("int4", True),
         ("int8", False), ("int8", True)]


def half_step(qtype: str, zero_point: bool) -> float:
    """Largest |x - dequantize(quantize(x))| per unit of a block's scale reference: absmax for
    symmetric types, max - min for affine ones."""
    qt = codebooks.QTYPES[qtype]
    if qt.is_integer:
        return 0.5 / ((2**qt.bits - 1) if zero_point else qt.qmax)
    return float(np.diff(np.sort(qt.values)).max()) / 2


def assert_within_bound(x: np.ndarray, qtype: str, zero_point: bool, block_size: int):
    """Block by block (axis=None): the error is at most half a step of the block's scale, a few
    float32 roundings of its magnitude, and half the smallest normal (a clamped tiny scale)."""
    q = jq.quantize(x, qtype, block_size, zero_point=zero_point)
    got = np.asarray(jq.dequantize(q, jnp.float32), np.float64).reshape(-1)
    flat = x.astype(np.float64).reshape(-1)
    for start in range(0, flat.size, block_size):
        block, back = flat[start:start + block_size], got[start:start + block_size]
        span = (max(block.max(), 0) - min(block.min(), 0)) if zero_point else np.abs(block).max()
        bound = half_step(qtype, zero_point) * span + 4e-7 * np.abs(block).max() + TINY
        err = np.abs(back - block).max()
        assert np.isfinite(back).all() and err <= bound, (qtype, zero_point, block, back, err, bound)


# One array, rows >= 64 (where XLA:CPU's max reduction drops NaN), partial last blocks along
# every axis; NaN in the first block, +inf in the last (partial) one, -inf in the middle.
BAD = {(0, 0): np.nan, (129, 96): np.inf, (70, 50): -np.inf}


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("qtype,zero_point", KINDS)
@pytest.mark.parametrize("axis", [None, 0, -1])
def test_non_finite_is_refused_concretely_and_nan_under_jit(qtype, zero_point, double_quant, axis):
    x = np.random.default_rng(0).standard_normal((130, 97)).astype(np.float32)
    for index, value in BAD.items():
        x[index] = value
    kw = dict(qtype=qtype, block_size=64, axis=axis, double_quant=double_quant, zero_point=zero_point)
    with pytest.raises(ValueError, match="3 non-finite"):
        jq.quantize(x, **kw)
    back = np.asarray(jq.dequantize(jax.jit(lambda a: jq.quantize(a, **kw))(x), jnp.float32))
    nan = np.isnan(back)
    assert all(nan[index] for index in BAD), "a block holding NaN/Inf must dequantize to NaN"
    # Only those blocks (with double quant: the blocks sharing a nested block of 256 constants).
    assert nan.sum() <= len(BAD) * 64 * (256 if double_quant else 1)
    assert np.isfinite(back[~nan]).all()


@pytest.mark.parametrize("qtype,zero_point", KINDS)
@pytest.mark.parametrize("values", [
    [2e38, -1e38, 5e37, 1.0],  # absmax above 2^126: 1/absmax is subnormal
    [MAX, -MAX, MAX / 3, 0.0],  # float32's largest
    [MAX, 1.0, -2.0, 3.0],
    [1e-37, -5e-38, 3e-38, 0.0],  # int8 scale absmax/127 below the smallest normal
    [TINY, -TINY, 2 * TINY, 0.0],  # the smallest normals
    [3e38, -3e38, 1.0, 0.0],  # an affine span past float32's range
], ids=["huge", "max", "max_and_ones", "tiny", "min_normal", "span"])
def test_extreme_magnitudes_round_trip_within_the_bound(qtype, zero_point, values):
    x = np.asarray(values * 16, np.float32)  # one block of 64
    assert_within_bound(x, qtype, zero_point, 64)


@pytest.mark.parametrize("qtype,zero_point", KINDS)
def test_subnormal_input_gives_zero_or_a_tiny_error(qtype, zero_point):
    """XLA:CPU flushes subnormals to zero: a subnormal value comes back as 0 (error < the
    smallest normal), never as something large."""
    x = np.asarray([1e-40, -3e-42, 1e-39, 0.0] * 16, np.float32)
    back = np.asarray(jq.dequantize(jq.quantize(x, qtype, 64, zero_point=zero_point), jnp.float32))
    assert np.isfinite(back).all() and np.abs(back - x).max() < TINY


@pytest.mark.parametrize("qtype,zero_point", KINDS)
def test_bfloat16_extremes_round_trip(qtype, zero_point):
    big = float(jnp.finfo(jnp.bfloat16).max)
    x = jnp.asarray([big, -big / 2, 1.0, 0.0] * 16, jnp.bfloat16)
    back = np.asarray(jq.dequantize(jq.quantize(x, qtype, 64, zero_point=zero_point), jnp.float32))
    assert np.isfinite(back).all()
    span = big * 1.5 if zero_point else big
    assert np.abs(back - np.asarray(x, np.float32)).max() <= half_step(qtype, zero_point) * span * 1.01


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(finite_f32, min_size=1, max_size=96), st.sampled_from(KINDS),
       st.sampled_from([1, 7, 32, 64]))
def test_any_finite_input_round_trips_within_the_bound(values, kind, block_size):
    """Hypothesis over finite float32 values of every exponent: never a silent violation."""
    qtype, zero_point = kind
    assert_within_bound(np.asarray(values, np.float32), qtype, zero_point, block_size)
def test_quantize_tree_refuses_non_finite_leaves():
    w = np.random.default_rng(1).standard_normal((128, 256)).astype(np.float32)
    w[100, 3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        jq.quantize_tree({"dense": {"kernel": jnp.asarray(w)}},
                         jq.Policy(rules=(jq.Rule(r"kernel$", "nf4", 64),)))


