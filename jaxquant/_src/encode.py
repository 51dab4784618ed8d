"""From float32 blocks to codes and block constants (the arithmetic of ``quantize``).

Table types (nf4, fp4, dynamic8) follow bitsandbytes' CPU/default path bit for bit: ``absmax`` in
float32, ``x * (1 / absmax)`` clamped to [-1, 1] (a partial last block divides, as bitsandbytes
does), then the nearest table level (ties to the lower level). Integer types round
``x * (1 / scale)`` half to even. Affine blocks stretch ``[min(x, 0), max(x, 0)]`` over the full
signed code range; including 0 keeps the zero point an in-range integer and 0.0 exact. Every
division is IEEE float32 on every backend (``division.divide``; XLA GPU's own is within 2 ulp), so
the CPU, GPU and kernel paths give the same bytes. The nearest-code search has one formulation
per backend (compares on the CPU, table lookups elsewhere); the tests hold them equal.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src import codebooks, division
from jaxquant._src.config import QuantConfig
from jaxquant._src.layout import pack_rows, to_blocks, to_rows
from jaxquant._src.qarray import blocked_shape


def nearest_code(scaled: jax.Array, qt: codebooks.QType) -> jax.Array:
    """Raw code of the nearest level of ``qt``: #midpoints strictly below, mapped to code order."""
    if len(qt.values) <= 16:
        if qt.cell_lookup is None:
            return code_by_sum(scaled, qt)
        # Same codes two ways: compares are fastest on CPU, a table lookup on GPU (109 -> 77 us
        # for 4096x14336 on an H100: 15 compares per element made that kernel instruction-bound).
        return jax.lax.platform_dependent(scaled, cpu=functools.partial(code_by_sum, qt=qt),
                                          default=functools.partial(code_by_cells, qt=qt))
    mids, order = qt.midpoints, qt.sorted_order
    sorted_index = jax.lax.platform_dependent(scaled, cpu=functools.partial(count_by_search, qt=qt),
                                              default=functools.partial(count_by_bit_cells, qt=qt))
    if np.array_equal(order, np.arange(len(order))):
        return sorted_index
    return jnp.asarray(order)[sorted_index]


def count_by_search(scaled: jax.Array, qt: codebooks.QType) -> jax.Array:
    """Midpoints strictly below each value (NaN above all), by a binary search."""
    mids = jnp.asarray(qt.midpoints)
    return jnp.searchsorted(mids, scaled, side="left", method="scan_unrolled").astype(jnp.int32)


def count_by_bit_cells(scaled: jax.Array, qt: codebooks.QType) -> jax.Array:
    """``count_by_search``'s counts from one cell gather and <= 4 compares per value
    (``codebooks.QType.bit_cells``): one elementwise kernel on a GPU instead of a binary search
    that XLA splits into three."""
    shift, low, high, below, inside = qt.bit_cells
    bits = jax.lax.bitcast_convert_type(scaled, jnp.int32)
    cell = jnp.clip((bits & 0x7FFFFFFF) >> shift, low, high) - low
    cell = cell + jnp.where(bits < 0, np.int32(high - low + 1), np.int32(0))
    count = jnp.asarray(below)[cell]
    for column in inside.T:
        count = count + (scaled > jnp.asarray(column)[cell]).astype(jnp.int32)
    return jnp.where(jnp.isnan(scaled), np.int32(len(qt.midpoints)), count)


def code_by_sum(scaled: jax.Array, qt: codebooks.QType) -> jax.Array:
    # code = order[#(v > m_i)] as a sum of steps order[i+1] - order[i], in uint8: the steps wrap
    # mod 256 but the sum lands in [0, 16). No gather, and uint8 vectorizes on CPU (2x).
    steps = (np.diff(qt.sorted_order) % 256).astype(np.uint8)
    code = jnp.full(scaled.shape, qt.sorted_order[0], jnp.uint8)
    for m, step in zip(qt.midpoints, steps):
        above = (scaled > m).astype(jnp.uint8)
        code = code + (above if step == 1 else above * step)
    return code


def code_by_cells(scaled: jax.Array, qt: codebooks.QType) -> jax.Array:
    # One compare against the only midpoint in the value's cell (codebooks.QType.cell_lookup).
    cells, cell_midpoint, cell_code = qt.cell_lookup
    j = jnp.floor((scaled + 1) * np.float32(cells / 2) + np.float32(0.5)).astype(jnp.int32)
    j = jnp.clip(j, 0, cells)
    above = (scaled > jnp.asarray(cell_midpoint)[j]).astype(jnp.int32)
    return jnp.asarray(cell_code)[2 * j + above]


def _scale_by_reciprocal(blocks: jax.Array, absmax: jax.Array, length: int, block_size: int, axis=-1):
    """``clip(x * (1 / absmax), -1, 1)``; a partial last block divides (bitsandbytes' default path;
    only the rows layout, ``axis=-1``, has one)."""
    # Above 2^126, 1 / absmax is subnormal and XLA:CPU flushes it to 0: such blocks (and only
    # they) are scaled down by 2^-64 first, which is exact and leaves x / absmax unchanged.
    shrink = jnp.where(absmax > np.float32(2.0**100), np.float32(2.0**-64), np.float32(1))
    safe = jnp.expand_dims(_floor(absmax * shrink), axis)
    blocks = blocks * jnp.expand_dims(shrink, axis)
    scaled = blocks * division.divide(1, safe)
    if length % block_size:
        scaled = scaled.at[..., -1, :].set(division.divide(blocks[..., -1, :], safe[..., -1, :]))
    return jnp.clip(scaled, -1, 1)


def _reciprocal_constant(c: int) -> np.float32:
    """float32(1 / c): XLA rewrites a division by a constant into this multiplication on every
    backend, so the quantizer writes it so (the same bits everywhere, and what it always computed)."""
    return np.float32(1) / np.float32(c)


def _floor(constant: jax.Array) -> jax.Array:
    """``max(constant, smallest normal float32)``, so that all-zero blocks scale 0 to 0.

    bitsandbytes clamps absmax to >= 1e-38, a subnormal that XLA flushes to zero; the smallest
    normal gives the same codes. A ``max`` rather than a ``where``: with a per-block ``where`` XLA
    CPU fuses the block reduction badly (measured 2-3x slower on 4096x14336).
    """
    return jnp.maximum(constant, np.float32(np.finfo(np.float32).tiny))


def nonfinite_marker(blocks: jax.Array, axis: int) -> jax.Array:
    """0 for a block of finite values, NaN for a block holding NaN or Inf.

    Added to a block's max/min so that a NaN can never turn into an ordinary constant: XLA:CPU's
    vectorized max/min reductions drop NaN once the reduced array has 64 rows or more (JAX 0.11.2:
    ``jnp.max`` of a (64, 64) array holding one NaN is finite), and a GPU's ``max`` returns the
    non-NaN operand. A sum propagates NaN on every backend; ``x * 0`` is NaN exactly for NaN/Inf.
    """
    return (blocks * np.float32(0)).sum(axis)


def _normal_scale(span: jax.Array, step: np.float32) -> jax.Array:
    """``span * step``, a nonzero result raised to the smallest normal float32: XLA:CPU flushes
    subnormals, so a block whose scale would be subnormal (int8: absmax below ~1.5e-36) would
    dequantize to zeros. Such a block has an absolute error of at most half that normal (5.9e-39).
    """
    tiny = np.float32(np.finfo(np.float32).tiny)
    return jnp.where(span == 0, span * step, jnp.maximum(span * step, tiny))


def _block_absmax(blocks: jax.Array, axis: int):
    """(the absmax that scales the codes, the stored constant: NaN for a non-finite block)."""
    if axis != -1:  # the in-place path, never on the CPU: one reduction
        absmax = jnp.abs(blocks).max(axis)
        stored = absmax + nonfinite_marker(blocks, axis)
    else:
        # max(max, -min) rather than max(abs): XLA CPU materializes abs(x) (10x slower on large x)
        absmax = jnp.maximum(blocks.max(-1), -blocks.min(-1))
        # On CPU the stored constant is reduced again from a barrier'd view of the input, so XLA
        # keeps two fusions: a cheap reduction for it and one pass for the codes. Sharing the
        # reduction made XLA CPU emit one multi-output fusion 1.7x slower (205 vs 120 ms on
        # 4096x14336). On GPU the barrier would materialize a float32 copy of the input.
        apart = jax.lax.platform_dependent(blocks, cpu=jax.lax.optimization_barrier, default=lambda b: b)
        stored = jnp.maximum(apart.max(-1), -apart.min(-1)) + nonfinite_marker(apart, -1)
    return absmax, jnp.where(jnp.isfinite(stored), stored, jnp.nan)


def quantize_blocks(blocks: jax.Array, length: int, block_size: int, cfg: QuantConfig, axis=-1):
    """float32 ``(*rest, nb, bs)`` -> (raw int32 codes, scale, zero_point or None); with ``axis``,
    the block's elements lie along that axis instead (whole blocks only)."""
    qt = codebooks.get_qtype(cfg.qtype)
    per_block = functools.partial(jnp.expand_dims, axis=axis)  # a block constant, broadcast
    if cfg.zero_point:
        marker = nonfinite_marker(blocks, axis)
        lo = jnp.minimum(blocks.min(axis), 0) + marker
        hi = jnp.maximum(blocks.max(axis), 0) + marker
        step = _reciprocal_constant(2**qt.bits - 1)
        bad = ~(jnp.isfinite(lo) & jnp.isfinite(hi))
        scale = _normal_scale(hi - lo, step)
        # a block spanning more than float32's range: hi - lo overflows, hi/255 - lo/255 does not
        scale = jnp.where(jnp.isinf(scale) & ~bad, hi * step - lo * step, scale)
        inv = division.divide(1, _floor(scale))
        zero_point = qt.qmin - jnp.round(lo * inv)
        zero_point = jnp.clip(jnp.where(bad, 0, zero_point), qt.qmin, qt.qmax)
        code = jnp.clip(jnp.round(blocks * per_block(inv)) + per_block(zero_point), qt.qmin, qt.qmax)
        scale = jnp.where(bad, jnp.nan, scale)
        return code.astype(jnp.int32), scale, zero_point.astype(jnp.int8)
    absmax, stored = _block_absmax(blocks, axis)
    if qt.is_integer:
        step = _reciprocal_constant(qt.qmax)
        scale = _normal_scale(absmax, step)
        code = jnp.clip(jnp.round(blocks * per_block(division.divide(1, _floor(scale)))), -qt.qmax, qt.qmax)
        return code.astype(jnp.int32), _normal_scale(stored, step), None
    return nearest_code(_scale_by_reciprocal(blocks, absmax, length, block_size, axis), qt), stored, None


def quantize_in_place(x: jax.Array, cfg: QuantConfig, block_size: int):
    """Blocks along a middle axis, reduced where they lie; only the packed codes and constants
    are moved to the QArray's (block axis last) layout. Whole blocks of even length only.

    Moving the input first (what the rows path does) made XLA GPU write a transposed float32
    copy: 357 us for a 4096x14336 bf16 weight along axis 0 on an H100."""
    qt = codebooks.get_qtype(cfg.qtype)
    a, length = cfg.axis, x.shape[cfg.axis]
    pre, post = x.shape[:a], x.shape[a + 1:]
    blocks = x.astype(jnp.float32).reshape(*pre, length // block_size, block_size, *post)
    code, scale, zero_point = quantize_blocks(blocks, length, block_size, cfg, axis=a + 1)
    raw = (code.astype(jnp.int32) & (2**qt.bits - 1)).reshape(*pre, length, *post)
    if qt.bits == 4:  # even index in the high nibble, as pack_rows
        # a weighted sum over the pair axis: one pass. Two slices OR'd made XLA GPU compute the
        # codes in two fusions, 472 us for NF4 along axis 0 of 4096x14336 (now 168 us; H100)
        pairs = raw.reshape(*pre, length // 2, 2, *post)
        weights = jnp.asarray([16, 1], jnp.int32).reshape((1,) * (len(pre) + 1) + (2,) + (1,) * len(post))
        raw = (pairs * weights).sum(a + 1)
    raw = raw.astype(jnp.uint8)
    last = lambda t: None if t is None else jnp.moveaxis(t, a, -1)
    return last(raw), last(scale), last(zero_point)


def quantize_rows(x: jax.Array, cfg: QuantConfig, block_size: int):
    """``x`` as rows of blocks (the layout every backend can take): (packed uint8 codes
    ``(*rest, ceil(L/2))`` or ``(*rest, L)``, scale ``(*rest, nb)``, zero_point or None)."""
    qt = codebooks.get_qtype(cfg.qtype)
    rest, length = blocked_shape(x.shape, cfg.axis)
    blocks = to_blocks(to_rows(x, cfg.axis).astype(jnp.float32), block_size)
    code, scale, zero_point = quantize_blocks(blocks, length, block_size, cfg)
    raw = (code & (2**qt.bits - 1)).astype(jnp.uint8).reshape(*rest, code.shape[-2] * block_size)[..., :length]
    codes = pack_rows(raw, qt.zero_code) if qt.bits == 4 else raw.astype(jnp.uint8)
    return codes, scale, zero_point
