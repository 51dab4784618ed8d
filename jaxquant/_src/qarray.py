"""``QArray``: a blockwise-quantized array as a JAX pytree."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src import codebooks, layout


def blocked_shape(shape: tuple[int, ...], axis: int | None) -> tuple[tuple[int, ...], int]:
    """``(rest, L)``: the array viewed as rows of length ``L`` whose runs of ``block_size`` are blocks.

    ``axis=None`` is bitsandbytes' view, the whole row-major flattening as one row (``rest=()``);
    ``axis=k`` moves axis k last, so each row is one line of elements along axis k; a tuple of
    contiguous axes is merged into one such axis (``layout.py``).
    """
    return layout.rows_shape(shape, axis)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
    """A blockwise-quantized array: codes, one constant per block, and static metadata.

    View the array as rows of length ``L`` (``blocked_shape``): for ``axis=None`` the row-major
    flattening of ``x``, for ``axis=k`` the lines of ``moveaxis(x, k, -1)``. Each row is cut into
    ``nb = ceil(L / block_size)`` blocks (the last one may be partial) and, with ``v`` the code
    table of ``qtype`` (``codebooks.QTYPES``), for element ``j`` of block ``b`` of a row::

        symmetric:  x[j] ≈ v[codes[j]] * scale[b]                      (scale = absmax for nf4/fp4/
                                                                         dynamic8, absmax/qmax for int)
        affine:     x[j] ≈ (v[codes[j]] - zero_point[b]) * scale[b]     (int4/int8, zero_point=True)
        nested:     the same, plus ``offset`` (double quantization's mean)

    ``scale`` is a float32 array of shape ``(*rest, nb)`` or, with double quantization, a nested
    ``QArray`` of that shape (dynamic8, blocks of 256, with an ``offset``) — QLoRA's "double
    quantization" (arXiv 2305.14314, §3). 4-bit codes are packed two per byte along the row, the
    element with the even index in the high nibble; an odd row ends in the code of 0.0. So
    ``codes`` is uint8 ``(*rest, ceil(L / 2))`` for 4-bit types and ``(*rest, L)`` for 8-bit ones.

    The dataclass is a pytree: ``codes``, ``scale``, ``zero_point`` and ``offset`` are leaves (or
    None); ``shape``, ``dtype``, ``qtype``, ``block_size`` and ``axis`` are static, so a change of
    block size retraces. Build one with ``jaxquant.quantize``; ``validate`` checks the invariant.

    ``axis`` may be a tuple of contiguous axes: they are merged into one block axis, stored
    exactly as the array reshaped to merge them would be (``layout.py``; an attention output
    kernel ``(heads, head_dim, features)`` along ``(0, 1)``).

    Stacked layers: the leaves may carry the same extra leading dimensions (the nested offset has
    exactly those), the metadata describing one layer. Quantize each layer and stack the QArrays
    leaf by leaf (``jax.tree.map(lambda *a: jnp.stack(a), *qs)``, or ``quantize_tree`` with a
    ``Layout(stack=1)``): ``lax.scan`` / ``nn.scan`` / ``nnx.scan`` then hand each step one
    layer's QArray; ``dequantize`` maps over the layers.
    """

    codes: jax.Array
    scale: Any  # jax.Array | QArray
    zero_point: jax.Array | None = None
    offset: jax.Array | None = None
    shape: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))
    dtype: Any = dataclasses.field(default=np.dtype(np.float32), metadata=dict(static=True))
    qtype: str = dataclasses.field(default="nf4", metadata=dict(static=True))
    block_size: int = dataclasses.field(default=64, metadata=dict(static=True))
    axis: int | tuple[int, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def bits(self) -> int:
        return codebooks.get_qtype(self.qtype).bits

    @property
    def double_quant(self) -> bool:
        return isinstance(self.scale, QArray)

    def __repr__(self) -> str:
        extra = ", zero_point=True" if self.zero_point is not None else ""
        extra += ", double_quant=True" if self.double_quant else ""
        return (f"QArray(shape={self.shape}, dtype={np.dtype(self.dtype).name}, qtype={self.qtype!r}, "
                f"block_size={self.block_size}, axis={self.axis}{extra})")


def _axis_ok(axis, ndim: int) -> bool:
    """None, an axis in range, or a normalized tuple of >= 2 contiguous axes (layout.py)."""
    try:
        return layout.normalize_axis(axis, ndim) == axis
    except ValueError:
        return False


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(f"inconsistent QArray: {message}")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_array(a) -> bool:
    return hasattr(a, "shape") and hasattr(a, "dtype")


def validate(q: QArray) -> QArray:
    """Check ``q``'s leaves against its metadata (shapes and dtypes only, so tracers pass).

    What it cannot see: a ``block_size`` or ``qtype`` changed to another value that gives the same
    leaf shapes (e.g. nf4 <-> fp4, or block 64 -> 65 on a row of 4096, both 64 blocks).

    Raises:
      TypeError: ``q`` is not a QArray.
      ValueError: naming the first leaf or field that breaks the invariant of ``QArray``.
    Returns:
      ``q`` unchanged.
    """
    if not isinstance(q, QArray):
        raise TypeError(f"expected a jaxquant.QArray, got {type(q).__name__}")
    qt = codebooks.get_qtype(q.qtype)
    _expect(isinstance(q.shape, tuple) and all(_is_int(d) and d >= 0 for d in q.shape),
            f"shape={q.shape!r} is not a tuple of non-negative ints")
    _expect(_is_int(q.block_size) and q.block_size > 0, f"block_size={q.block_size!r}")
    try:
        floating = jnp.issubdtype(np.dtype(q.dtype), jnp.floating)
    except TypeError:
        floating = False
    _expect(floating, f"dtype={q.dtype!r} is not floating")
    _expect(_axis_ok(q.axis, len(q.shape)), f"axis={q.axis!r} for shape={q.shape}")
    for field in ("codes", "scale"):
        _expect(_is_array(getattr(q, field)), f"{field} is {type(getattr(q, field)).__name__}, not an array")
    for field in ("zero_point", "offset"):
        _expect(getattr(q, field) is None or _is_array(getattr(q, field)),
                f"{field} is {type(getattr(q, field)).__name__}, not an array or None")
    rest, length = blocked_shape(q.shape, q.axis)
    row_codes = -(-length // 2) if qt.bits == 4 else length
    nb = -(-length // q.block_size)
    # leading stack dimensions (layout.py): the same on every leaf, the metadata is one layer's
    stack = tuple(q.codes.shape[:max(len(q.codes.shape) - len(rest) - 1, 0)])
    _expect(tuple(q.codes.shape) == (*stack, *rest, row_codes) and q.codes.dtype == jnp.uint8,
            f"codes {q.codes.dtype}{tuple(q.codes.shape)}, expected uint8{(*rest, row_codes)} "
            f"for shape={q.shape} axis={q.axis} qtype={q.qtype}")
    if isinstance(q.scale, QArray):
        validate(q.scale)
        # quantize's double quantization: flat dynamic8 blocks of float32 constants, one level deep,
        # its offset one scalar per layer of a stack
        _expect(q.scale.shape == (*rest, nb) and q.scale.offset is not None
                and tuple(q.scale.offset.shape) == stack
                and q.scale.qtype == "dynamic8" and q.scale.axis is None and q.scale.zero_point is None
                and not isinstance(q.scale.scale, QArray) and np.dtype(q.scale.dtype) == np.float32,
                f"nested scale {q.scale!r}, expected a float32 dynamic8 QArray of shape {(*rest, nb)}, "
                f"axis=None, with an offset of shape {stack}")
    else:
        _expect(tuple(q.scale.shape) == (*stack, *rest, nb) and q.scale.dtype == jnp.float32,
                f"scale {q.scale.dtype}{tuple(q.scale.shape)}, expected float32{(*stack, *rest, nb)}")
    if q.zero_point is not None:
        _expect(qt.is_integer, f"zero_point given for table qtype {q.qtype!r}")
        _expect(tuple(q.zero_point.shape) == (*stack, *rest, nb) and q.zero_point.dtype == jnp.int8,
                f"zero_point {q.zero_point.dtype}{tuple(q.zero_point.shape)}, expected "
                f"int8{(*stack, *rest, nb)}")
    if q.offset is not None:
        _expect(tuple(q.offset.shape) == stack and q.offset.dtype == jnp.float32,
                f"offset {q.offset.dtype}{tuple(q.offset.shape)}, expected float32{stack}")
    return q
