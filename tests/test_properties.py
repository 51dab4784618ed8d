"""Property tests over shapes, block sizes, axes, qtypes and dtypes."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import jaxquant as jq
from jaxquant._src import codebooks
from jaxquant._src.layout import pack_rows, unpack_rows
from jaxquant._src.qarray import blocked_shape

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


@st.composite
def problems(draw, qtypes=tuple(jq.QTYPES), dtypes=tuple(DTYPES)):
    shape = tuple(draw(st.lists(st.integers(1, 40), min_size=1, max_size=3)))
    axis = draw(st.sampled_from([None, *range(len(shape))]))
    block_size = draw(st.sampled_from([1, 3, 7, 16, 32, 64, None]))
    qtype = draw(st.sampled_from(qtypes))
    zero_point = codebooks.QTYPES[qtype].is_integer and draw(st.booleans())
    dtype = draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal(shape) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    if draw(st.booleans()):  # heavy tails: a few outliers
        x = x * np.where(rng.random(shape) < 0.02, 30.0, 1.0)
    return jnp.asarray(x, dtype), qtype, block_size, axis, zero_point


def per_element(constants, q):
    """Broadcast per-block constants of q back to q's logical layout."""
    rest, length = blocked_shape(q.shape, q.axis)
    c = np.repeat(np.asarray(constants, np.float64), q.block_size, axis=-1)[..., :length]
    if q.axis is None:
        return c.reshape(q.shape)
    return np.moveaxis(c.reshape(*rest, length), -1, q.axis)


@given(problems())
def test_codes_in_range(problem):
    x, qtype, block_size, axis, zero_point = problem
    q = jq.quantize(x, qtype, block_size, axis, zero_point=zero_point)
    codes = np.asarray(jq.unpack_codes(q)).astype(int)
    assert codes.shape == x.shape
    qt = codebooks.QTYPES[qtype]
    if qt.is_integer:
        low = qt.qmin if zero_point else -qt.qmax
        assert codes.min() >= low and codes.max() <= qt.qmax
    else:
        assert codes.min() >= 0 and codes.max() < 2**qt.bits


@given(st.lists(st.integers(1, 30), min_size=1, max_size=2), st.integers(0, 2**31))
def test_packing_round_trips(shape, seed):
    codes = np.random.default_rng(seed).integers(0, 16, size=shape)
    packed = pack_rows(jnp.asarray(codes), fill=7)
    assert packed.shape[-1] == -(-shape[-1] // 2)
    np.testing.assert_array_equal(unpack_rows(packed, shape[-1]), codes)


@given(problems())
def test_error_within_the_schemes_bound(problem):
    x, qtype, block_size, axis, zero_point = problem
    q = jq.quantize(x, qtype, block_size, axis, zero_point=zero_point)
    y = np.asarray(jq.dequantize(q, jnp.float32), np.float64)
    xf = np.asarray(x.astype(jnp.float32), np.float64)
    scale = per_element(q.scale, q)
    qt = codebooks.QTYPES[qtype]
    if qt.is_integer:
        bound = 0.5 * scale  # half a grid step, also for the affine grid (0 is on it)
    else:
        gaps = np.diff(np.sort(qt.values.astype(np.float64)))
        bound = 0.5 * gaps.max() * scale
    slack = 1e-6 * np.maximum(np.abs(xf), scale) + 1e-30
    assert np.all(np.abs(y - xf) <= bound + slack)


@given(problems(qtypes=("nf4", "fp4"), dtypes=(jnp.float32,)))  # dynamic8 has no -1 level
def test_requantizing_a_dequantized_array_gives_the_same_codes(problem):
    x, qtype, block_size, axis, _ = problem
    q = jq.quantize(x, qtype, block_size, axis)
    q2 = jq.quantize(jq.dequantize(q), qtype, block_size, axis)
    values = codebooks.QTYPES[qtype].values
    # compare the levels, not the raw codes: FP4's -0 (code 8) comes back as +0 (code 0)
    np.testing.assert_array_equal(values[np.asarray(jq.unpack_codes(q2))],
                                  values[np.asarray(jq.unpack_codes(q))])
    np.testing.assert_array_equal(np.asarray(q2.scale), np.asarray(q.scale))


@given(problems(dtypes=(jnp.float32,)))
def test_double_quant_changes_only_the_constants(problem):
    x, qtype, block_size, axis, zero_point = problem
    plain = jq.quantize(x, qtype, block_size, axis, zero_point=zero_point)
    nested = jq.quantize(x, qtype, block_size, axis, True, zero_point=zero_point)
    np.testing.assert_array_equal(np.asarray(plain.codes), np.asarray(nested.codes))
    absmax = np.asarray(plain.scale)
    rebuilt = np.asarray(jq.dequantize(nested.scale))
    spread = np.abs(absmax - absmax.mean()).max() if absmax.size else 0
    assert np.all(np.abs(rebuilt - absmax) <= 0.02 * spread + 1e-6 * np.abs(absmax).max())
