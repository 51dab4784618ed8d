"""``dequantize``: ``table[codes] * scale`` per block in float32, cast once to the output dtype.

Double-quantized constants are decoded first (``block_scale``); a 4-bit array can also be
decoded as its even and odd halves, never interleaved, for matmuls (``dequantize_halves``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src import codebooks, layout
from jaxquant._src.layout import from_rows, to_blocks, unpack_rows
from jaxquant._src.qarray import QArray, blocked_shape, validate


def block_scale(q: QArray) -> jax.Array:
    """``q``'s float32 block constants ``(*rest, nb)``, double-quantized ones decoded."""
    return dequantize_array(q.scale, np.dtype(np.float32)) if isinstance(q.scale, QArray) else q.scale


def interleave_16bit(even: jax.Array, odd: jax.Array) -> jax.Array:
    """Two ``(..., L/2)`` 16-bit arrays -> ``(..., L)`` alternating even/odd elements: each pair is
    packed into one 32-bit word and bitcast back (little-endian: the low half is element 0), an
    elementwise pass; XLA GPU's strided interleave of 16-bit values was ~80 us slower on an H100
    at 4096x14336 (BUILD_NOTES, "The XLA path")."""
    bits = lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16).astype(jnp.uint32)
    pairs = jax.lax.bitcast_convert_type(bits(even) | bits(odd) << 16, even.dtype)  # (..., L/2, 2)
    return pairs.reshape(*even.shape[:-1], 2 * even.shape[-1])


def dequantize_rows(q: QArray, dtype) -> jax.Array:
    """Dequantize to the blocked layout ``(*rest, L)`` (``moveaxis(x, axis, -1)``), unmoved."""
    if np.dtype(dtype).itemsize == 2 and (halves := dequantize_halves(q, dtype)) is not None:
        return interleave_16bit(*halves)  # same numbers, one elementwise pass on a GPU
    qt = codebooks.get_qtype(q.qtype)
    _, length = blocked_shape(q.shape, q.axis)
    raw = unpack_rows(q.codes, length) if qt.bits == 4 else q.codes
    out = _apply_constants(to_blocks(raw, q.block_size), q)
    return out.reshape(*out.shape[:-2], out.shape[-2] * out.shape[-1])[..., :length].astype(dtype)


def _apply_constants(raw: jax.Array, q: QArray) -> jax.Array:
    """Raw codes ``(*rest, nb, per_block)`` -> float32 values: table, zero point, scale, offset."""
    values = jnp.asarray(codebooks.get_qtype(q.qtype).values)[raw.astype(jnp.int32)]
    scale = block_scale(q)[..., None]
    if q.zero_point is not None:
        out = (values - q.zero_point[..., None].astype(jnp.float32)) * scale
        # A code may land half a step past the block's min or max; at the end of the original
        # dtype's range that would overflow to +-inf, so it stops at the largest finite value.
        top = np.float32(jnp.finfo(q.dtype).max)
        out = jnp.clip(out, -top, top)
    else:
        out = values * scale
    if q.offset is not None:
        # bitsandbytes rounds the product before adding the offset; the barrier stops XLA from
        # contracting the two into one fused multiply-add (a different last bit).
        out = jax.lax.optimization_barrier(out) + q.offset
    return out


def dequantize_halves(q: QArray, dtype) -> tuple[jax.Array, jax.Array] | None:
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
def dequantize_array(q: QArray, dtype) -> jax.Array:
    """``dequantize`` for a validated ``q`` and a numpy ``dtype``, jitted."""
    return from_rows(dequantize_rows(q, dtype), q.shape, q.axis)


def dequantize(q: QArray, dtype=None) -> jax.Array:
    """Undo ``quantize``: ``v[codes] * scale`` per block in float32, cast once to ``dtype``.

    The output is a fresh array. On the CPU, first-touch page faults on a large fresh array cost
    more than the decoding (4096x14336 float32 on 2 cores: 57,345 faults, ~78 ms, against ~28 ms
    into memory already mapped). To dequantize many arrays in turn, reuse one buffer with
    ``dequantize_into``; or give the whole process transparent huge pages by starting it with
    ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (113 faults).

    Args:
      q: a QArray (validated here).
      dtype: output dtype; defaults to the dtype ``q`` was quantized from.

    Example:
      >>> import jax, jaxquant as jq
      >>> w = jax.random.normal(jax.random.key(0), (256, 128))
      >>> w2 = jq.dequantize(jq.quantize(w, "nf4", block_size=64))
      >>> w2.shape, w2.dtype
      ((256, 128), dtype('float32'))
    """
    validate(q)
    dtype = np.dtype(q.dtype if dtype is None else dtype)
    if layout.stack_ndim(q):  # stacked layers: one layer at a time (layout.py)
        return layout.map_layers(dequantize_array, q, dtype)
    return dequantize_array(q, dtype)


@functools.partial(jax.jit, donate_argnums=(1,))
def _dequantize_into(q: QArray, out: jax.Array) -> jax.Array:
    # a full-size update of the donated buffer: XLA writes the values in place
    return jax.lax.dynamic_update_slice(out, dequantize_array(q, out.dtype), (0,) * out.ndim)


def dequantize_into(q: QArray, out: jax.Array) -> jax.Array:
    """``dequantize(q, out.dtype)`` written into ``out``'s buffer, which is donated.

    The fast path on the CPU for dequantizing many arrays one after another (streaming layers,
    re-materializing weights): a fresh output is new memory that the OS maps page by page on
    first write, and those page faults cost more than the decoding (4096x14336 float32 on 2
    cores: ~78 ms into a fresh buffer, ~28 ms into a reused one). ``out`` must not be used after
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
    raw = unpack_rows(q.codes, length) if qt.bits == 4 else q.codes
    if qt.is_integer:
        raw = jnp.asarray(qt.values.astype(np.int8))[raw.astype(jnp.int32)]
    return from_rows(raw, q.shape, q.axis)
