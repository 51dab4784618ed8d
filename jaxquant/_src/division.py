"""Correctly rounded float32 division on every backend.

bitsandbytes scales a block by ``x * (1 / absmax)`` in IEEE float32, and a code depends on the
last bit of that reciprocal whenever ``x / absmax`` lands on a midpoint between two levels (for
FP4 and int4 that happens thousands of times in a 4096x14336 bf16 weight, since the ratio of two
bf16 numbers is often a simple fraction). XLA CPU divides exactly; XLA GPU lowers float32
division to PTX ``div.full.f32`` (within 2 ulp, ``-nvptx-prec-divf32=1`` in XLA's NVPTX
backend), so the GPU's FP4 codes differed from the CPU's in 40,722 of 29.4M bytes
on an H100. ``divide`` computes the IEEE quotient with integer long division of
the significands off the CPU, so every backend gives the same bits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_MANTISSA = np.int32(0x7FFFFF)
_HIDDEN = np.int32(0x800000)


def _bits(v) -> jax.Array:
    return lax.bitcast_convert_type(jnp.asarray(v, jnp.float32), jnp.int32)


def _fields(bits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(biased exponent, 24-bit significand with the hidden bit) of float32 bit patterns."""
    return lax.shift_right_logical(bits, np.int32(23)) & np.int32(0xFF), (bits & _MANTISSA) | _HIDDEN


def long_divide(n, d) -> jax.Array:
    """IEEE round-to-nearest-even ``n / d`` in float32 (broadcasting), from integer operations.

    Exact for normal finite non-zero operands whose quotient is a normal number; zeros,
    subnormals, infinities, NaNs and quotients outside the normal range take the backend's own
    division with subnormal operands and results flushed to (signed) zero, as XLA:CPU does:
    exact in those cases (0, inf, NaN, 0 for a subnormal quotient). The GPU keeps subnormals
    and its division is within 2 ulp, so without the flush it gave other bits there.
    """
    n, d = jnp.asarray(n, jnp.float32), jnp.asarray(d, jnp.float32)
    nb, db = _bits(n), _bits(d)
    (n_exp, n_sig), (d_exp, d_sig) = _fields(nb), _fields(db)
    # q = floor(n_sig * 2^24 / d_sig), 24 or 25 bits (n_sig < 2 d_sig), one bit per step
    q = jnp.where(n_sig >= d_sig, np.int32(1), np.int32(0))
    r = jnp.where(n_sig >= d_sig, n_sig - d_sig, n_sig)
    for _ in range(24):
        r = lax.shift_left(r, np.int32(1))
        q = lax.shift_left(q, np.int32(1))
        q = jnp.where(r >= d_sig, q | np.int32(1), q)
        r = jnp.where(r >= d_sig, r - d_sig, r)
    wide = q >= np.int32(1 << 24)  # significand ratio >= 1: one bit more than the mantissa holds
    significand = jnp.where(wide, lax.shift_right_logical(q, np.int32(1)), q)
    # the discarded fraction against one half, both scaled by 2 d_sig: round to nearest, ties even
    discarded = jnp.where(wide, jnp.where((q & np.int32(1)) == 1, d_sig + r, r), lax.shift_left(r, np.int32(1)))
    up = jnp.where(discarded > d_sig, np.int32(1),
                   jnp.where(discarded == d_sig, significand & np.int32(1), np.int32(0)))
    exponent = n_exp - d_exp + jnp.where(wide, np.int32(127), np.int32(126))  # biased, of significand/2^23
    # significand + up may reach 2^24: the carry goes into the exponent field (up to inf)
    magnitude = lax.shift_left(exponent, np.int32(23)) + (significand + up - _HIDDEN)
    quotient = lax.bitcast_convert_type(magnitude | ((nb ^ db) & np.int32(-(2**31))), jnp.float32)
    in_range = jnp.minimum(jnp.minimum(jnp.minimum(n_exp - 1, 254 - n_exp), jnp.minimum(d_exp - 1, 254 - d_exp)),
                           jnp.minimum(exponent - 1, 254 - exponent))
    return jnp.where(in_range >= 0, quotient, _flush(_flush(n) / _flush(d)))


def _flush(v: jax.Array) -> jax.Array:
    """Subnormals to zero of the same sign (what XLA:CPU does to every float32 operation)."""
    bits = _bits(v)
    subnormal = (bits & np.int32(0x7F800000)) == 0
    return jnp.where(subnormal, lax.bitcast_convert_type(bits & np.int32(-(2**31)), jnp.float32), v)


def reciprocal(a, estimate=None) -> jax.Array:
    """IEEE ``1 / a`` in float32 from an ``estimate`` within a few ulps (the backend's own
    division by default), fixed up with exact integer arithmetic: ~35 operations instead of
    long division's ~110, for use inside a kernel. For ``a`` a normal float32 with a normal
    reciprocal; elsewhere (0, subnormal, inf, NaN, |a| >= 2**126) the estimate is returned.

    With significand ``M`` of ``a``, the reciprocal's significand is ``Q = 2**47 / M``. For a
    candidate ``q`` near ``Q`` the remainder ``2**47 - q * M`` is small, so int32 arithmetic
    wrapping modulo 2**32 (where 2**47 is 0) computes it exactly; a few steps move ``q`` to
    ``floor(Q)`` and the remainder rounds it to nearest.
    """
    ab = _bits(a)
    estimate = np.float32(1) / a if estimate is None else estimate
    (exp, sig), (est_exp, est_sig) = _fields(ab), _fields(_bits(estimate))
    target = 253 - exp  # the reciprocal's biased exponent (a's significand > 1)
    q = jnp.where(est_exp == target, est_sig,
                  jnp.where(est_exp > target, lax.shift_left(est_sig, np.int32(1)),
                            lax.shift_right_logical(est_sig, np.int32(1))))
    rem = np.int32(0) - q * sig  # 2**47 - q * M, exact while |q - Q| < 2**31 / M
    for _ in range(4):  # to floor(Q): 0 <= rem < M
        q = jnp.where(rem < 0, q - 1, q)
        rem = jnp.where(rem < 0, rem + sig, rem)
        q = jnp.where(rem >= sig, q + 1, q)
        rem = jnp.where(rem >= sig, rem - sig, rem)
    twice = lax.shift_left(rem, np.int32(1))
    q = q + jnp.where(twice > sig, np.int32(1), jnp.where(twice == sig, q & np.int32(1), np.int32(0)))
    power_of_two = (ab & _MANTISSA) == 0
    magnitude = jnp.where(power_of_two, lax.shift_left(254 - exp, np.int32(23)),
                          lax.shift_left(target, np.int32(23)) + (q - _HIDDEN))  # q = 2**24 carries
    exact = lax.bitcast_convert_type(magnitude | (ab & np.int32(-(2**31))), jnp.float32)
    # usable: a normal with a normal reciprocal, and the estimate within one binade of it
    usable = jnp.minimum(jnp.minimum(exp - 1, 252 - exp), jnp.minimum(est_exp - target + 1, target + 1 - est_exp))
    return jnp.where(usable >= 0, exact, estimate)


def exact_divide(n, d) -> jax.Array:
    """``long_divide``, materialized: fused into a per-element consumer, XLA emitted its ~110
    operations once per use of the quotient (16 s to compile dynamic8's 255 compares on CPU)."""
    return lax.optimization_barrier(long_divide(n, d))


def _cpu_divide(n, d) -> jax.Array:
    """XLA:CPU's own division, which is IEEE. The barrier hides that ``d`` is a broadcast: XLA
    rewrites ``n / broadcast(d)`` as ``n * broadcast(1 / d)``, up to 1 ulp off, and a partial
    last block whose ratio sits on a midpoint then took the next code (bitsandbytes divides)."""
    return n / lax.optimization_barrier(d)


def divide(n, d) -> jax.Array:
    """``n / d`` in float32, correctly rounded on every backend: XLA CPU's own division is, the
    long division runs elsewhere. Meant for per-block constants (~110 integer operations each)."""
    n, d = jnp.broadcast_arrays(jnp.asarray(n, jnp.float32), jnp.asarray(d, jnp.float32))
    return lax.platform_dependent(n, d, cpu=_cpu_divide, default=exact_divide)
