"""Blockwise quantize / dequantize: symmetric absmax, affine, and double quantization.

Terms: a *row* is a run of ``L`` elements the blocks are cut from (``qarray.blocked_shape``); a
*block* is ``block_size`` consecutive elements of a row, the last one possibly partial; each block
gets one constant. Table types (nf4, fp4, dynamic8) follow bitsandbytes' CPU/default path bit for
bit: ``absmax`` in float32, ``x * (1 / absmax)`` clamped to [-1, 1] (a partial last block divides,
as bitsandbytes does), then the nearest table level (ties to the lower level). Integer types round
``x * (1 / scale)`` half to even. Affine blocks stretch ``[min(x, 0), max(x, 0)]`` over the full
signed code range; including 0 keeps the zero point an in-range integer and 0.0 exact. Every
division is IEEE float32 on every backend (``division.divide``; XLA GPU's own is within 2 ulp), so
the CPU, GPU and kernel paths give the same bytes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src import codebooks, cpu_pages, division, layout
from jaxquant._src.kernels import platform, quantize_mgpu
from jaxquant._src.qarray import QArray, blocked_shape, validate

_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize one array (hashable: a static argument of the jitted core)."""

    qtype: str = "nf4"
    block_size: int | None = 64
    axis: int | None = None
    zero_point: bool = False
    double_quant: bool = False
    nested_block_size: int = 256

    def validated(self, ndim: int) -> "QuantConfig":
        """The config with ``axis`` made non-negative; ValueError for what is not allowed."""
        qt = codebooks.get_qtype(self.qtype)
        for name in ("block_size", "nested_block_size"):
            value = getattr(self, name)
            if value is None and name == "block_size":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive int (or block_size=None for one block "
                                 f"per row), got {name}={value!r}")
        if self.zero_point and not qt.is_integer:
            raise ValueError(f"zero_point=True needs an integer qtype ('int4' or 'int8'), got "
                             f"qtype={self.qtype!r}: table types are symmetric by construction")
        axis = layout.normalize_axis(self.axis, ndim)  # a tuple: contiguous axes, merged
        bs = None if self.block_size is None else int(self.block_size)
        return dataclasses.replace(self, axis=axis, block_size=bs,
                                   nested_block_size=int(self.nested_block_size))


def _check_dtype(x) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(f"quantize needs a float32, bfloat16 or float16 array, got dtype={dtype}")


def _to_rows(x: jax.Array, axis: int | None) -> jax.Array:
    """``x`` as ``(*rest, L)``: flattened for axis=None, the block axis moved last otherwise."""
    if isinstance(axis, tuple):
        shape, axis = layout.merge(x.shape, axis)
        x = x.reshape(shape)
    return x.reshape(x.size) if axis is None else jnp.moveaxis(x, axis, -1)


def _from_rows(rows: jax.Array, shape: tuple[int, ...], axis: int | None) -> jax.Array:
    if axis is None:
        return rows.reshape(shape)
    if isinstance(axis, tuple):
        return _from_rows(rows, *layout.merge(shape, axis)).reshape(shape)
    moved = (*shape[:axis], *shape[axis + 1:], shape[axis])
    return jnp.moveaxis(rows.reshape(moved), -1, axis)


def _to_blocks(rows: jax.Array, block_size: int, fill=0) -> jax.Array:
    """``(*rest, L)`` -> ``(*rest, nb, block_size)``, padding the last block with ``fill``."""
    length = rows.shape[-1]
    nb = -(-length // block_size)
    pad = nb * block_size - length
    if pad:
        rows = jnp.pad(rows, [(0, 0)] * (rows.ndim - 1) + [(0, pad)], constant_values=fill)
    return rows.reshape(*rows.shape[:-1], nb, block_size)


def _nearest_code(scaled: jax.Array, qt: codebooks.QType) -> jax.Array:
    """Raw code of the nearest level of ``qt``: #midpoints strictly below, mapped to code order."""
    if len(qt.values) <= 16:
        if qt.cell_lookup is None:
            return _code_by_sum(scaled, qt)
        # Same codes two ways: compares are fastest on CPU, a table lookup on GPU (109 -> 77 us
        # for 4096x14336 on an H100: 15 compares per element made that kernel instruction-bound).
        return jax.lax.platform_dependent(scaled, cpu=functools.partial(_code_by_sum, qt=qt),
                                          default=functools.partial(_code_by_cells, qt=qt))
    mids, order = qt.midpoints, qt.sorted_order
    sorted_index = jax.lax.platform_dependent(scaled, cpu=functools.partial(_count_by_search, qt=qt),
                                              default=functools.partial(_count_by_bit_cells, qt=qt))
    if np.array_equal(order, np.arange(len(order))):
        return sorted_index
    return jnp.asarray(order)[sorted_index]


def _count_by_search(scaled: jax.Array, qt: codebooks.QType) -> jax.Array:
    """Midpoints strictly below each value (NaN above all), by a binary search."""
    mids = jnp.asarray(qt.midpoints)
    return jnp.searchsorted(mids, scaled, side="left", method="scan_unrolled").astype(jnp.int32)


def _count_by_bit_cells(scaled: jax.Array, qt: codebooks.QType) -> jax.Array:
    """``_count_by_search``'s counts from one cell gather and <= 4 compares per value
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


def _code_by_sum(scaled: jax.Array, qt: codebooks.QType) -> jax.Array:
    # code = order[#(v > m_i)] as a sum of steps order[i+1] - order[i], in uint8: the steps wrap
    # mod 256 but the sum lands in [0, 16). No gather, and uint8 vectorizes on CPU (2x).
    steps = (np.diff(qt.sorted_order) % 256).astype(np.uint8)
    code = jnp.full(scaled.shape, qt.sorted_order[0], jnp.uint8)
    for m, step in zip(qt.midpoints, steps):
        above = (scaled > m).astype(jnp.uint8)
        code = code + (above if step == 1 else above * step)
    return code


def _code_by_cells(scaled: jax.Array, qt: codebooks.QType) -> jax.Array:
    # One compare against the only midpoint in the value's cell (codebooks.QType.cell_lookup).
    cells, cell_midpoint, cell_code = qt.cell_lookup
    j = jnp.floor((scaled + 1) * np.float32(cells / 2) + np.float32(0.5)).astype(jnp.int32)
    j = jnp.clip(j, 0, cells)
    above = (scaled > jnp.asarray(cell_midpoint)[j]).astype(jnp.int32)
    return jnp.asarray(cell_code)[2 * j + above]


def _scale_by_reciprocal(blocks: jax.Array, absmax: jax.Array, length: int, block_size: int, axis=-1):
    """``clip(x * (1 / absmax), -1, 1)``; a partial last block divides (bitsandbytes' default path;
    only the rows layout, ``axis=-1``, has one)."""
    safe = jnp.expand_dims(_floor(absmax), axis)
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


def _pack_rows(codes: jax.Array, fill: int) -> jax.Array:
    """int codes ``(*rest, L)`` in [0, 16) -> uint8 ``(*rest, ceil(L/2))``, even index high nibble."""
    codes = codes.astype(jnp.uint8)
    if codes.shape[-1] % 2:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)], constant_values=fill)
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)  # not [0::2]: 2x on CPU
    return (pairs[..., 0] << 4) | pairs[..., 1]


def _unpack_rows(packed: jax.Array, length: int) -> jax.Array:
    """uint8 ``(*rest, ceil(L/2))`` -> uint8 codes ``(*rest, L)``."""
    # one broadcast shift, not a stack of two halves: XLA GPU made the stack a concatenate
    # fusion 3x slower than this elementwise one (139 us for 4096x14336 on an H100)
    shifts = jnp.asarray([4, 0], jnp.uint8).reshape((1,) * packed.ndim + (2,))
    pairs = (packed[..., None] >> shifts) & jnp.uint8(0xF)
    return pairs.reshape(*packed.shape[:-1], 2 * packed.shape[-1])[..., :length]


def _block_absmax(blocks: jax.Array, axis: int):
    """(the absmax that scales the codes, the stored constant: NaN for a non-finite block)."""
    if axis != -1:  # the in-place path, never on the CPU: one reduction
        absmax = stored = jnp.abs(blocks).max(axis)
    else:
        # max(max, -min) rather than max(abs): XLA CPU materializes abs(x) (10x slower on large x)
        absmax = jnp.maximum(blocks.max(-1), -blocks.min(-1))
        # On CPU the stored constant is reduced again from a barrier'd view of the input, so XLA
        # keeps two fusions: a cheap reduction for it and one pass for the codes. Sharing the
        # reduction made XLA CPU emit one multi-output fusion 1.7x slower (205 vs 120 ms on
        # 4096x14336). On GPU the barrier would materialize a float32 copy of the input.
        apart = jax.lax.platform_dependent(blocks, cpu=jax.lax.optimization_barrier, default=lambda b: b)
        stored = jnp.maximum(apart.max(-1), -apart.min(-1))
    return absmax, jnp.where(jnp.isfinite(stored), stored, jnp.nan)


def _quantize_blocks(blocks: jax.Array, length: int, block_size: int, cfg: QuantConfig, axis=-1):
    """float32 ``(*rest, nb, bs)`` -> (raw int32 codes, scale, zero_point or None); with ``axis``,
    the block's elements lie along that axis instead (whole blocks only)."""
    qt = codebooks.get_qtype(cfg.qtype)
    per_block = functools.partial(jnp.expand_dims, axis=axis)  # a block constant, broadcast
    if cfg.zero_point:
        lo = jnp.minimum(blocks.min(axis), 0)
        hi = jnp.maximum(blocks.max(axis), 0)
        scale = (hi - lo) * _reciprocal_constant(2**qt.bits - 1)
        bad = ~(jnp.isfinite(lo) & jnp.isfinite(hi))
        inv = division.divide(1, _floor(scale))
        zero_point = qt.qmin - jnp.round(lo * inv)
        zero_point = jnp.clip(jnp.where(bad, 0, zero_point), qt.qmin, qt.qmax)
        code = jnp.clip(jnp.round(blocks * per_block(inv)) + per_block(zero_point), qt.qmin, qt.qmax)
        scale = jnp.where(bad, jnp.nan, scale)
        return code.astype(jnp.int32), scale, zero_point.astype(jnp.int8)
    absmax, stored = _block_absmax(blocks, axis)
    if qt.is_integer:
        scale = absmax * _reciprocal_constant(qt.qmax)
        code = jnp.clip(jnp.round(blocks * per_block(division.divide(1, _floor(scale)))), -qt.qmax, qt.qmax)
        return code.astype(jnp.int32), stored * _reciprocal_constant(qt.qmax), None
    return _nearest_code(_scale_by_reciprocal(blocks, absmax, length, block_size, axis), qt), stored, None


def _quantize_in_place(x: jax.Array, cfg: QuantConfig, block_size: int):
    """Blocks along a middle axis, reduced where they lie; only the packed codes and constants
    are moved to the QArray's (block axis last) layout. Whole blocks of even length only.

    Moving the input first (what the rows path does) made XLA GPU write a transposed float32
    copy: 357 us for a 4096x14336 bf16 weight along axis 0 on an H100 (BUILD_NOTES, session 4)."""
    qt = codebooks.get_qtype(cfg.qtype)
    a, length = cfg.axis, x.shape[cfg.axis]
    pre, post = x.shape[:a], x.shape[a + 1:]
    blocks = x.astype(jnp.float32).reshape(*pre, length // block_size, block_size, *post)
    code, scale, zero_point = _quantize_blocks(blocks, length, block_size, cfg, axis=a + 1)
    raw = (code.astype(jnp.int32) & (2**qt.bits - 1)).reshape(*pre, length, *post)
    if qt.bits == 4:  # even index in the high nibble, as _pack_rows
        # a weighted sum over the pair axis: one pass. Two slices OR'd made XLA GPU compute the
        # codes in two fusions, 472 us for NF4 along axis 0 of 4096x14336 (now 168 us; H100)
        pairs = raw.reshape(*pre, length // 2, 2, *post)
        weights = jnp.asarray([16, 1], jnp.int32).reshape((1,) * (len(pre) + 1) + (2,) + (1,) * len(post))
        raw = (pairs * weights).sum(a + 1)
    raw = raw.astype(jnp.uint8)
    last = lambda t: None if t is None else jnp.moveaxis(t, a, -1)
    return last(raw), last(scale), last(zero_point)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _quantize(x: jax.Array, cfg: QuantConfig) -> QArray:
    if isinstance(cfg.axis, tuple):  # merged axes: stored as the merged array's (layout.py)
        shape, axis = layout.merge(x.shape, cfg.axis)
        q = _quantize(x.reshape(shape), dataclasses.replace(cfg, axis=axis))
        return dataclasses.replace(q, shape=tuple(x.shape), axis=cfg.axis)
    qt = codebooks.get_qtype(cfg.qtype)
    rest, length = blocked_shape(x.shape, cfg.axis)
    block_size = cfg.block_size or max(length, 1)

    def xla_path(x):
        blocks = _to_blocks(_to_rows(x, cfg.axis).astype(jnp.float32), block_size)
        code, scale, zero_point = _quantize_blocks(blocks, length, block_size, cfg)
        raw = (code & (2**qt.bits - 1)).astype(jnp.uint8).reshape(*rest, code.shape[-2] * block_size)[..., :length]
        codes = _pack_rows(raw, qt.zero_code) if qt.bits == 4 else raw.astype(jnp.uint8)
        return codes, scale, zero_point

    def kernel_path(x):  # one pass on Hopper; blocks never straddle rows here
        codes, scale = quantize_mgpu.quantize_blocks(x, cfg.qtype)
        return codes.reshape(*rest, -1), scale.reshape(*rest, -1), None

    if (cfg.axis is None or cfg.axis == x.ndim - 1 and length % block_size == 0) and \
            quantize_mgpu.can_use(x, cfg.qtype, block_size, cfg.zero_point):
        codes, scale, zero_point = platform.kernel_or_xla("cuda", kernel_path, xla_path, x)
    elif cfg.axis is not None and cfg.axis != x.ndim - 1 and length % block_size == 0 \
            and length % 2 == 0 and x.size:
        # off the CPU, where XLA's transposed copy of the input cost more than the quantizing
        in_place = functools.partial(_quantize_in_place, cfg=cfg, block_size=block_size)
        codes, scale, zero_point = jax.lax.platform_dependent(x, cpu=xla_path, default=in_place)
    else:
        codes, scale, zero_point = xla_path(x)
    if cfg.double_quant:
        scale = _quantize_nested(scale, cfg.nested_block_size)
    return QArray(codes, scale, zero_point, None, shape=tuple(x.shape), dtype=np.dtype(x.dtype),
                  qtype=cfg.qtype, block_size=block_size, axis=cfg.axis)


def _quantize_nested(constants: jax.Array, block_size: int) -> QArray:
    """bitsandbytes' double quantization: subtract the mean, then dynamic8 blocks of ``block_size``."""
    offset = constants.mean() if constants.size else jnp.float32(0)
    nested = _quantize(constants - offset, QuantConfig("dynamic8", block_size, None))
    return dataclasses.replace(nested, offset=offset.astype(jnp.float32))


def _nonfinite_report(x: jax.Array) -> str:
    bad = ~np.isfinite(np.asarray(x, dtype=np.float32))
    where = [tuple(int(i) for i in idx) for idx in np.argwhere(bad)[:5]]
    return (f"quantize got {int(bad.sum())} non-finite value(s) (NaN or Inf) of {bad.size}, first at "
            f"index {where}; clean the input or pass check_finite=False (under jit the constant of a "
            f"block holding one becomes NaN and the block dequantizes to NaN)")


def quantize(x, qtype: str = "nf4", block_size: int | None = 64, axis: int | None = None,
             double_quant: bool = False, *, zero_point: bool = False, nested_block_size: int = 256,
             check_finite: bool = True) -> QArray:
    """Quantize ``x`` blockwise to ``qtype``.

    Args:
      x: float32, bfloat16 or float16 array of any shape (float64 numpy input becomes float32).
      qtype: ``"nf4"``, ``"fp4"`` (bitsandbytes' tables), ``"int4"``, ``"int8"`` (uniform grids) or
        ``"dynamic8"`` (bitsandbytes' signed 8-bit dynamic map).
      block_size: elements per block (any positive int); None for one block per row (per-tensor
        with ``axis=None``, per-channel with ``axis=k``).
      axis: None: blocks are consecutive runs of the row-major flattening (bitsandbytes). k: blocks
        run along axis k (for a matmul weight ``W[K, N]``, ``axis=0``, the contraction axis).
      double_quant: quantize the float32 block constants again (mean offset, dynamic8, blocks of
        ``nested_block_size``) as QLoRA does (arXiv 2305.14314).
      zero_point: affine quantization (int4/int8 only): ``x ≈ (code - zero_point) * scale``.
      check_finite: raise on NaN/Inf in a concrete ``x`` (costs one host sync). Under ``jax.jit``
        nothing is raised: such a block's constant becomes NaN and it dequantizes to NaN.

    Returns:
      A ``QArray``; ``dequantize`` undoes it (see ``QArray`` for the invariant).

    Raises:
      TypeError: ``x`` is not a float array. ValueError: bad qtype, block size or axis,
      ``zero_point=True`` with a table type, or non-finite values.

    Example:
      >>> import jax, jaxquant as jq
      >>> w = jax.random.normal(jax.random.key(0), (256, 128))
      >>> q = jq.quantize(w, "nf4", block_size=64, axis=0, double_quant=True)
      >>> round(jq.bits_per_param(q), 3)
      4.128
    """
    if not isinstance(x, jax.Array):
        x = np.asarray(x)
    _check_dtype(x)
    if not isinstance(x, jax.Array) and x.dtype == np.float64:
        x = x.astype(np.float32)
    x = jnp.asarray(x)
    cfg = QuantConfig(qtype, block_size, axis, zero_point, double_quant, nested_block_size)
    cfg = cfg.validated(x.ndim)
    q = _quantize(x, cfg)
    if check_finite and not isinstance(x, jax.core.Tracer):
        constants = q.scale.offset if q.double_quant else q.scale
        if not bool(jnp.isfinite(constants).all()):
            raise ValueError(_nonfinite_report(x))
    return q


def _constants(q: QArray) -> jax.Array:
    return _dequantize(q.scale, np.dtype(np.float32)) if isinstance(q.scale, QArray) else q.scale


def _interleave_16bit(even: jax.Array, odd: jax.Array) -> jax.Array:
    """Two ``(..., L/2)`` 16-bit arrays -> ``(..., L)`` alternating even/odd elements: each pair is
    packed into one 32-bit word and bitcast back (little-endian: the low half is element 0), an
    elementwise pass; XLA GPU's strided interleave of 16-bit values was ~80 us slower on an H100
    at 4096x14336 (BUILD_NOTES, "The XLA path")."""
    bits = lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16).astype(jnp.uint32)
    pairs = jax.lax.bitcast_convert_type(bits(even) | bits(odd) << 16, even.dtype)  # (..., L/2, 2)
    return pairs.reshape(*even.shape[:-1], 2 * even.shape[-1])


def _dequantize_rows(q: QArray, dtype) -> jax.Array:
    """Dequantize to the blocked layout ``(*rest, L)`` (``moveaxis(x, axis, -1)``), unmoved."""
    if np.dtype(dtype).itemsize == 2 and (halves := _dequantize_halves(q, dtype)) is not None:
        return _interleave_16bit(*halves)  # same numbers, one elementwise pass on a GPU
    qt = codebooks.get_qtype(q.qtype)
    _, length = blocked_shape(q.shape, q.axis)
    raw = _unpack_rows(q.codes, length) if qt.bits == 4 else q.codes
    out = _apply_constants(_to_blocks(raw, q.block_size), q)
    return out.reshape(*out.shape[:-2], out.shape[-2] * out.shape[-1])[..., :length].astype(dtype)


def _apply_constants(raw: jax.Array, q: QArray) -> jax.Array:
    """Raw codes ``(*rest, nb, per_block)`` -> float32 values: table, zero point, scale, offset."""
    values = jnp.asarray(codebooks.get_qtype(q.qtype).values)[raw.astype(jnp.int32)]
    scale = _constants(q)[..., None]
    if q.zero_point is not None:
        out = (values - q.zero_point[..., None].astype(jnp.float32)) * scale
    else:
        out = values * scale
    if q.offset is not None:
        # bitsandbytes rounds the product before adding the offset; the barrier stops XLA from
        # contracting the two into one fused multiply-add (a different last bit).
        out = jax.lax.optimization_barrier(out) + q.offset
    return out


def _dequantize_halves(q: QArray, dtype) -> tuple[jax.Array, jax.Array] | None:
    """A 4-bit ``q`` as its even-k and odd-k halves ``(*rest, L/2)`` each, never interleaved.

    For matmuls: ``x @ W == x[..., 0::2] @ even + x[..., 1::2] @ odd``, and interleaving the
    nibbles back costs more than the dot on a GPU. None where blocks are partial or odd.
    """
    _, length = blocked_shape(q.shape, q.axis)
    if q.bits != 4 or length % q.block_size or q.block_size % 2 or q.offset is not None:
        return None

    def half(raw):
        blocks = raw.reshape(*raw.shape[:-1], length // q.block_size, q.block_size // 2)
        out = _apply_constants(blocks, q)
        return out.reshape(*out.shape[:-2], length // 2).astype(dtype)

    return half(q.codes >> 4), half(q.codes & 0xF)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize(q: QArray, dtype) -> jax.Array:
    return _from_rows(_dequantize_rows(q, dtype), q.shape, q.axis)


def dequantize(q: QArray, dtype=None) -> jax.Array:
    """Undo ``quantize``: ``v[codes] * scale`` per block in float32, cast once to ``dtype``.

    On the CPU, an output of 4 MB or more (outside ``jit``) is written into memory advised to be
    transparent huge pages (``cpu_pages``; ``JAXQUANT_HUGE_PAGES=0`` turns it off): its page
    faults, not the decode, were most of the time (4096x14336 float32: 57,345 faults, ~85 ms
    fresh vs ~40 ms).

    Args:
      q: a QArray (validated here).
      dtype: output dtype; defaults to the dtype ``q`` was quantized from.
    """
    validate(q)
    dtype = np.dtype(q.dtype if dtype is None else dtype)
    if layout.stack_ndim(q):  # stacked layers: one layer at a time (layout.py)
        return layout.map_layers(_dequantize, q, dtype)
    device = _single_device(q.codes)
    if device is not None and (buffer := cpu_pages.fresh_buffer(q.shape, dtype, device)) is not None:
        # a large CPU output: written into huge pages (cpu_pages.py), ~2.5x faster than fresh
        # small pages on the 2-core VM
        return _dequantize_into(q, buffer)
    return _dequantize(q, dtype)


def _single_device(codes) -> jax.Device | None:
    """The one device holding concrete ``codes`` (None under tracing or when sharded)."""
    if not isinstance(codes, jax.Array) or isinstance(codes, jax.core.Tracer):
        return None
    devices = codes.devices()
    return next(iter(devices)) if len(devices) == 1 else None


@functools.partial(jax.jit, donate_argnums=(1,))
def _dequantize_into(q: QArray, out: jax.Array) -> jax.Array:
    # a full-size update of the donated buffer: XLA writes the values in place
    return jax.lax.dynamic_update_slice(out, _dequantize(q, out.dtype), (0,) * out.ndim)


def dequantize_into(q: QArray, out: jax.Array) -> jax.Array:
    """``dequantize(q, out.dtype)`` written into ``out``'s buffer, which is donated.

    For dequantizing many arrays one after another (streaming layers, re-materializing weights):
    a fresh output buffer is new memory that the OS maps page by page on first write, and on the
    2-core CPU those page faults cost more than the dequantizing (4096x14336 float32: 66-93 ms
    into a fresh buffer, 23 ms into a reused one; BUILD_NOTES). ``out`` must not be used after
    the call (JAX deletes donated arrays); use the returned array, which holds ``out``'s memory
    where the backend can alias it.

    Example:
      >>> import jax, jax.numpy as jnp, jaxquant as jq
      >>> layers = [jq.quantize(jax.random.normal(jax.random.key(i), (256, 512))) for i in range(3)]
      >>> buffer = jnp.zeros((256, 512), jnp.float32)
      >>> for q in layers:
      ...     buffer = jq.dequantize_into(q, buffer)  # reuses the same memory each time

    Raises:
      TypeError: ``out`` is not a float array. ValueError: ``out.shape`` is not ``q.shape``.
    """
    validate(q)
    if not isinstance(out, jax.Array) or not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"dequantize_into: out must be a float jax.Array, got "
                        f"{getattr(out, 'dtype', type(out).__name__)}")
    if tuple(out.shape) != tuple(q.shape):
        raise ValueError(f"dequantize_into: out has shape {tuple(out.shape)}, the QArray {tuple(q.shape)}")
    return _dequantize_into(q, out)


def unpack_codes(q: QArray) -> jax.Array:
    """The codes in ``q``'s logical layout (shape ``q.shape``), before packing.

    Integer qtypes give signed int8 codes (``x ≈ (code - zero_point) * scale``); table qtypes give
    uint8 indices into their table.
    """
    validate(q)
    if layout.stack_ndim(q):
        return layout.map_layers(unpack_codes, q)
    qt = codebooks.get_qtype(q.qtype)
    _, length = blocked_shape(q.shape, q.axis)
    raw = _unpack_rows(q.codes, length) if qt.bits == 4 else q.codes
    if qt.is_integer:
        raw = jnp.asarray(qt.values.astype(np.int8))[raw.astype(jnp.int32)]
    return _from_rows(raw, q.shape, q.axis)
