"""division.long_divide (the off-CPU float32 division) against IEEE division, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant._src import division


def assert_ieee(n, d):
    n, d = np.asarray(n, np.float32), np.asarray(d, np.float32)
    got = np.asarray(jax.jit(division.long_divide)(n, d))
    flush = lambda v: np.where(np.abs(v) < np.finfo(np.float32).tiny, np.copysign(np.float32(0), v), v)
    with np.errstate(all="ignore"):
        want = flush(flush(n) / flush(d))  # XLA flushes subnormal operands and results to zero
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    bad = np.flatnonzero(~same)
    assert bad.size == 0, f"{bad.size} quotients differ, first {n[bad[:3]]} / {d[bad[:3]]}: {got[bad[:3]]} vs {want[bad[:3]]}"


def test_random_quotients_over_the_whole_exponent_range(rng):
    m = 200_000
    assert_ieee(rng.standard_normal(m) * 10.0 ** rng.uniform(-37, 37, m),
                rng.standard_normal(m) * 10.0 ** rng.uniform(-37, 37, m))


def test_reciprocals_and_bf16_ratios(rng):
    """1 / absmax and ratios of two bf16 numbers: the quantizer's cases, where a last-bit error
    moves an FP4 or int4 code (x / absmax is often a simple fraction like 5/6)."""
    m = 200_000
    bf16 = lambda v: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32)
    assert_ieee(np.ones(m), np.abs(rng.standard_normal(m)) + 1e-3)
    assert_ieee(bf16(rng.standard_normal(m)), bf16(rng.standard_normal(m)))


@pytest.mark.parametrize("d", [1.0, 2.0, 0.5, 3.0, 7.0, 2.0**-126, 1.5 * 2.0**100])
def test_equal_significands_powers_of_two_and_rounding_carries(d, rng):
    significands = (rng.integers(0, 2**23, 50_000) | 0x3F800000).astype(np.uint32).view(np.float32)
    edge = np.array([1.0, np.nextafter(np.float32(2), np.float32(0)), np.nextafter(np.float32(1), np.float32(2))],
                    np.float32)
    n = np.concatenate([significands, edge, significands * np.float32(d)])
    assert_ieee(n, np.full(n.shape, d, np.float32))


def test_zeros_infinities_nans_subnormals_and_overflow():
    e = np.array([0, -0.0, np.inf, -np.inf, np.nan, 1e-39, -3.0, 1.0, np.finfo(np.float32).max,
                  np.finfo(np.float32).tiny, 1e-30, 1e30], np.float32)
    n, d = np.meshgrid(e, e)
    assert_ieee(n.ravel(), d.ravel())


@pytest.mark.parametrize("ulps", [-3, -1, 0, 1, 2, 3])
def test_reciprocal_corrects_estimates_a_few_ulps_off(ulps, rng):
    """The kernel's reciprocal: exact from an estimate up to 3 ulps off (div.full is within 2),
    over normal a with normal reciprocals, powers of two and significands of all ones included."""
    m = 100_000
    a = np.abs(rng.standard_normal(m) * 10.0 ** rng.uniform(-37, 37, m)).astype(np.float32)
    a = np.concatenate([a, -a[:100], np.float32(2.0) ** np.arange(-126, 126, dtype=np.float32),
                        (np.float32(2) - np.float32(2.0**-23)) * np.float32(2.0) ** np.arange(-126, 125,
                                                                                           dtype=np.float32)])
    a = a[(np.abs(a) >= np.finfo(np.float32).tiny) & (np.abs(a) < 2.0**126)]
    want = np.float32(1) / a
    estimate = want.copy()
    for _ in range(abs(ulps)):
        estimate = np.nextafter(estimate, np.float32(np.sign(ulps) * np.inf))
    got = np.asarray(jax.jit(division.reciprocal)(a, estimate))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_reciprocal_returns_the_estimate_outside_its_range():
    a = np.array([0, np.inf, np.nan, 2.0**126, -(2.0**127)], np.float32)
    estimate = np.array([1, 2, 3, 4, 5], np.float32)
    np.testing.assert_array_equal(np.asarray(division.reciprocal(a, estimate)), estimate)
