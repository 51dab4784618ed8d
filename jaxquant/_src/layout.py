"""Where each element of a quantized array lives: rows, blocks, nibble packing, merged axes, stacks.

A *row* is a run of ``L`` elements the blocks are cut from (``qarray.blocked_shape``): the whole
flattened array for ``axis=None``, else the block axis moved last. A *block* is ``block_size``
consecutive elements of a row, the last one possibly partial. 4-bit codes are packed two to a
byte along the row, the even index in the high nibble (bitsandbytes' order).

*Merged axes.* A QArray's ``axis`` may be a tuple of contiguous axes ``(a, ..., b)``: the array is
quantized exactly as ``x.reshape(*shape[:a], prod(shape[a:b+1]), *shape[b+1:])`` would be along
axis ``a``, so its blocks run along the merged contraction of, e.g., an attention output kernel
``(heads, head_dim, features)`` with ``axis=(0, 1)``. A 2-D kernel keeps ``axis=0`` and
bitsandbytes' bytes; a one-axis tuple is stored as that int.

*Stack dimensions.* A QArray's metadata describes one layer; its leaves may carry the same extra
leading dimensions (``stack``) on every leaf, the nested offset included (shape ``stack``). That is
what quantizing each layer of a scanned stack and stacking the results leaf by leaf gives, and what
``lax.scan`` / ``nn.scan`` / ``nnx.scan`` slice back into single layers.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


def to_rows(x: jax.Array, axis) -> jax.Array:
    """``x`` as ``(*rest, L)``: flattened for axis=None, the block axis moved last otherwise."""
    if isinstance(axis, tuple):
        shape, axis = merge(x.shape, axis)
        x = x.reshape(shape)
    return x.reshape(x.size) if axis is None else jnp.moveaxis(x, axis, -1)


def from_rows(rows: jax.Array, shape: tuple[int, ...], axis) -> jax.Array:
    """Undo ``to_rows``: rows ``(*rest, L)`` back to the array of ``shape``."""
    if axis is None:
        return rows.reshape(shape)
    if isinstance(axis, tuple):
        return from_rows(rows, *merge(shape, axis)).reshape(shape)
    moved = (*shape[:axis], *shape[axis + 1:], shape[axis])
    return jnp.moveaxis(rows.reshape(moved), -1, axis)


def to_blocks(rows: jax.Array, block_size: int, fill=0) -> jax.Array:
    """``(*rest, L)`` -> ``(*rest, nb, block_size)``, padding the last block with ``fill``."""
    length = rows.shape[-1]
    nb = -(-length // block_size)
    pad = nb * block_size - length
    if pad:
        rows = jnp.pad(rows, [(0, 0)] * (rows.ndim - 1) + [(0, pad)], constant_values=fill)
    return rows.reshape(*rows.shape[:-1], nb, block_size)


def pack_rows(codes: jax.Array, fill: int) -> jax.Array:
    """int codes ``(*rest, L)`` in [0, 16) -> uint8 ``(*rest, ceil(L/2))``, even index high nibble."""
    codes = codes.astype(jnp.uint8)
    if codes.shape[-1] % 2:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)], constant_values=fill)
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)  # not [0::2]: 2x on CPU
    return (pairs[..., 0] << 4) | pairs[..., 1]


def unpack_rows(packed: jax.Array, length: int) -> jax.Array:
    """uint8 ``(*rest, ceil(L/2))`` -> uint8 codes ``(*rest, L)``."""
    # one broadcast shift, not a stack of two halves: XLA GPU made the stack a concatenate
    # fusion 3x slower than this elementwise one (139 us for 4096x14336 on an H100)
    shifts = jnp.asarray([4, 0], jnp.uint8).reshape((1,) * packed.ndim + (2,))
    pairs = (packed[..., None] >> shifts) & jnp.uint8(0xF)
    return pairs.reshape(*packed.shape[:-1], 2 * packed.shape[-1])[..., :length]


def normalize_axis(axis, ndim: int):
    """``axis`` as None, a non-negative int, or a tuple of >= 2 contiguous increasing axes.

    Raises:
      ValueError: an axis out of range, repeated, or axes that are not contiguous.
    """
    if axis is None:
        return None
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    if not axes or any(isinstance(a, bool) or not isinstance(a, (int, np.integer))
                       or not -ndim <= a < ndim for a in axes):
        raise ValueError(f"axis must be None or an int in [{-ndim}, {ndim}) (or a tuple of such "
                         f"contiguous axes) for a {ndim}-d array, got axis={axis!r}")
    axes = tuple(sorted(int(a) % ndim for a in axes))
    if axes != tuple(range(axes[0], axes[0] + len(axes))):
        raise ValueError(f"axis must be contiguous axes (they are merged into one block axis), got "
                         f"axis={axis!r} for a {ndim}-d array")
    return axes[0] if len(axes) == 1 else axes


def axes_of(axis) -> tuple[int, ...]:
    """The block axes as a tuple (empty for None)."""
    if axis is None:
        return ()
    return tuple(axis) if isinstance(axis, tuple) else (axis,)


def merge(shape: tuple[int, ...], axis) -> tuple[tuple[int, ...], int | None]:
    """``(merged_shape, int_axis)``: the shape with a tuple ``axis`` merged into one axis."""
    if not isinstance(axis, tuple):
        return tuple(shape), axis
    a, b = axis[0], axis[-1]
    return (*shape[:a], math.prod(shape[a:b + 1]), *shape[b + 1:]), a


def merged_view(q):
    """``q`` with a tuple axis described as its merged 2-or-more-d array (same leaves)."""
    if not isinstance(q.axis, tuple):
        return q
    shape, axis = merge(q.shape, q.axis)
    return dataclasses.replace(q, shape=shape, axis=axis)


def rows_shape(shape: tuple[int, ...], axis) -> tuple[tuple[int, ...], int]:
    """``(rest, L)``: the array as rows of length L (see ``qarray.blocked_shape``), axes merged."""
    if axis is None:
        return (), math.prod(shape)
    axes = axes_of(axis)
    rest = tuple(d for i, d in enumerate(shape) if i not in axes)
    return rest, math.prod(shape[i] for i in axes)


def stack_ndim(q) -> int:
    """How many leading stack dimensions ``q``'s leaves carry beyond its one-layer metadata."""
    rest, _ = rows_shape(q.shape, q.axis)
    return len(q.codes.shape) - len(rest) - 1


def stack_shape(q) -> tuple[int, ...]:
    return tuple(q.codes.shape[:stack_ndim(q)])


def map_layers(fn, q, *args):
    """``fn(layer, *args)`` for every layer of a stacked ``q`` (vmapped), or ``fn(q, *args)``."""
    for _ in range(stack_ndim(q)):
        fn = jax.vmap(fn, in_axes=(0,) + (None,) * len(args))
    return fn(q, *args)


def matrix_shape(shape: tuple[int, ...], axis) -> tuple[int, int]:
    """``(K, N)``: a kernel of ``shape`` blocked along ``axis`` as the matrix ``W[K, N]`` its layer
    multiplies by. K is the product of the axes up to and including the last block axis (a
    kernel is quantized along its contraction, which leads: an attention output projection
    ``(heads, head_dim, features)`` along ``(0, 1)``, or along ``head_dim`` alone, gives
    ``K = heads * head_dim``), N the product of the rest; with no block axis, or blocks along
    the last one, K is the first axis.
    """
    axes = axes_of(axis)
    split = axes[-1] + 1 if axes and axes[-1] < len(shape) - 1 else 1
    return math.prod(shape[:split]), math.prod(shape[split:])


def as_matrix(q):
    """A one-layer ``q`` viewed as the 2-D weight ``W[K, N]`` quantized along axis 0: K is the
    (merged) block axis, N the product of the other axes in order (so ``(K, N)`` is
    ``matrix_shape`` when the block axes lead and leave the last axis out). The stored rows are
    already ``(rest..., K)`` wherever the block axes lie, so only shapes change."""
    if q.ndim == 2 and q.axis == 0:
        return q
    if q.axis is None:
        raise ValueError(f"as_matrix needs blocks along an axis, got {q!r}")
    rest, k = rows_shape(q.shape, q.axis)
    n = math.prod(rest)
    scale = q.scale
    if hasattr(scale, "codes"):  # nested codes are flat (axis=None): only the shape changes
        scale = dataclasses.replace(scale, shape=(n, scale.shape[-1]))
    else:
        scale = scale.reshape(n, scale.shape[-1])
    zp = None if q.zero_point is None else q.zero_point.reshape(n, -1)
    return dataclasses.replace(q, codes=q.codes.reshape(n, q.codes.shape[-1]), scale=scale,
                               zero_point=zp, shape=(k, n), axis=0)
