"""Shardings for QArrays: place codes and constants consistently with the logical array's spec,
and quantize a sharded array where its shards lie.

A QArray quantized along axis k stores rows ``moveaxis(x, k, -1)``: its codes, constants and
zero points have the logical array's other dimensions first, then the (packed) block axis. So a
``PartitionSpec`` of the logical array maps to the same mesh axes on those dimensions:

* column-parallel, a kernel ``W[K, N]`` with ``P(None, "model")``: the rows (N) are split, every
  block stays whole on one device;
* row-parallel, ``P("model", None)``: the block axis (K) is split, which needs every shard of it
  to hold whole blocks (``K / devices`` a multiple of ``block_size``, and even for 4-bit codes
  packed two per byte); otherwise ``ValueError``. With one block per row (per-channel constants,
  LLM.int8's) the codes split and the constants are replicated along the block axis.

Stacked layers (leading stack dimensions) take the spec's leading entries; a tuple block axis
(merged axes) may be split only along its first, outermost axis, so each shard stays a run of
whole rows of the merged matrix. Double-quantized constants have flat nested codes (bitsandbytes'
layout): they are split along with the rows when exactly the leading row dimension is split and
the block axis is not, and are replicated otherwise (1 byte per block); their per-256 constants
and offset, a few bytes, are replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxquant._src import codebooks, layout
from jaxquant._src.qarray import QArray


def _devices_along(mesh: Mesh, entry) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[name] for name in names)


def _check_entries(q: QArray, mesh: Mesh, spec: P, entries: tuple, dims: tuple) -> None:
    """Every split dimension names axes of ``mesh`` and divides evenly over them: checked here so
    the error names the QArray (JAX would raise a KeyError, or only once the shardings are used),
    and so a merged block axis is only split where its first axis is (its length dividing is not
    enough: half a head per device)."""
    for i, (entry, dim) in enumerate(zip(entries, dims)):
        if entry is None:
            continue
        missing = [n for n in (entry if isinstance(entry, tuple) else (entry,)) if n not in mesh.shape]
        if missing:
            raise ValueError(f"qarray_sharding: spec {spec} names mesh axis {missing[0]!r}, which the "
                             f"mesh (axes {tuple(mesh.axis_names)}) lacks")
        devices = _devices_along(mesh, entry)
        if dim % devices:
            raise ValueError(f"qarray_sharding: spec {spec} splits dimension {i} (size {dim}) of {q!r} "
                             f"over {devices} devices, which do not divide it")


def _block_entry(q: QArray, mesh: Mesh, spec: P, entries: tuple):
    """``(codes, constants)``: the mesh axes the block axis of the codes and of the per-block
    constants are split over (None: whole), checked to cut whole blocks."""
    axes = layout.axes_of(q.axis)
    inner = [a for a in axes[1:] if entries[a] is not None]
    if inner:
        raise ValueError(f"qarray_sharding: spec {spec} shards axis {inner[0]} inside the merged block "
                         f"axes {q.axis} of {q!r}; shard only the first of them, {axes[0]}")
    entry = entries[axes[0]]
    if entry is None:
        return None, None
    _, length = layout.rows_shape(q.shape, q.axis)
    devices = _devices_along(mesh, entry)
    part = length // devices
    packed = codebooks.get_qtype(q.qtype).bits == 4
    # one block per row (per-channel, e.g. LLM.int8's row scales): the codes split, its single
    # constant is replicated along the block axis, so row-parallel layers can still be sharded
    whole_row = length <= q.block_size
    if length % devices or (part % q.block_size and not whole_row) or (packed and part % 2):
        raise ValueError(
            f"qarray_sharding: spec {spec} splits the block axis {q.axis} of {q!r} (length {length}) "
            f"over {devices} devices: each shard must hold whole blocks of {q.block_size}"
            f"{' and an even number of packed 4-bit codes' if packed else ''}, got {length / devices:g} "
            f"elements; pick a{'n even' if packed else ''} block size dividing "
            f"{length // devices if length % devices == 0 else 'the shard'} or shard another axis")
    return entry, None if whole_row else entry


def qarray_sharding(q: QArray, mesh: Mesh, spec: P) -> QArray:
    """A QArray-shaped tree of ``NamedSharding`` for ``q``, from the logical array's ``spec``
    (for stacked layers, the spec of the whole stacked array).

    Example:
      >>> import jax, numpy as np, jaxquant as jq
      >>> from jax.sharding import Mesh, PartitionSpec as P
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
      >>> q = jq.quantize(np.ones((256, 128), np.float32), "nf4", 64, axis=0)  # W[K, N]
      >>> jq.qarray_sharding(q, mesh, P(None, "model")).codes.spec   # column-parallel: N split
      P('model', None)
      >>> jq.qarray_sharding(q, mesh, P("model", None)).codes.spec   # row-parallel: K split
      P(None, 'model')

    Raises:
      ValueError: ``q`` has ``axis=None`` with a sharded spec, the spec splits the block axis into
        shards that are not whole blocks, splits an inner axis of a merged block axis, splits a
        dimension unevenly, names an axis the mesh lacks, or has more entries than the array has
        dimensions. TypeError: ``spec`` is not a ``PartitionSpec``.
    """
    if not isinstance(spec, P):
        raise TypeError(f"qarray_sharding: spec must be a jax.sharding.PartitionSpec, got {spec!r}")
    stack = layout.stack_ndim(q)
    spec_entries = tuple(spec)
    if len(spec_entries) > stack + q.ndim:
        raise ValueError(f"qarray_sharding: spec {spec} has more entries than {q!r} has dimensions "
                         f"({stack} stacked + {q.ndim})")
    entries = spec_entries + (None,) * (stack + q.ndim - len(spec_entries))
    _check_entries(q, mesh, spec, entries, (*layout.stack_shape(q), *q.shape))
    lead, entries = entries[:stack], entries[stack:]
    if q.axis is None:
        if any(e is not None for e in entries):
            raise ValueError(f"qarray_sharding: {q!r} has flat blocks (axis=None); quantize along an "
                             f"axis to shard it, got spec {spec}")
        rest, block, per_block = [], None, None
    else:
        block, per_block = _block_entry(q, mesh, spec, entries)
        rest = [e for i, e in enumerate(entries) if i not in layout.axes_of(q.axis)]
    rows = NamedSharding(mesh, P(*lead, *rest, block))
    blocks = NamedSharding(mesh, P(*lead, *rest, per_block))  # scale, zero point: one per block
    small = NamedSharding(mesh, P(*lead))

    def constants(scale):
        if not isinstance(scale, QArray):
            return blocks
        by_rows = block is None and rest and rest[0] is not None and all(e is None for e in rest[1:])
        flat = P(*lead, rest[0]) if by_rows else P(*lead)
        return dataclasses.replace(scale, codes=NamedSharding(mesh, flat), scale=small,
                                   zero_point=None, offset=small)

    return dataclasses.replace(
        q, codes=rows, scale=constants(q.scale), zero_point=None if q.zero_point is None else blocks,
        offset=None if q.offset is None else small)


def is_sharded(x) -> bool:
    """Whether ``x`` (an array or a ``ShapeDtypeStruct``) is split over a mesh by a NamedSharding."""
    if isinstance(x, jax.core.Tracer):
        return False
    sharding = getattr(x, "sharding", None)
    return isinstance(sharding, NamedSharding) and not sharding.is_fully_replicated


@functools.lru_cache(maxsize=256)
def _in_shards(quantize: Callable[[jax.Array], QArray], shape: tuple, dtype, sharding: NamedSharding):
    """The jitted ``quantize`` for one shape and sharding, cached: a fresh ``jax.jit`` per leaf
    would compile every layer of a model again (0.6 s each on CPU for equal shapes)."""
    abstract = jax.eval_shape(quantize, jax.ShapeDtypeStruct(shape, dtype))
    return jax.jit(quantize, out_shardings=qarray_sharding(abstract, sharding.mesh, sharding.spec))


def check_in_shards(quantize: Callable[[jax.Array], QArray], x) -> None:
    """Raise the ``ValueError`` of ``quantize_in_shards(quantize, x)`` without quantizing."""
    _in_shards(quantize, tuple(x.shape), np.dtype(x.dtype), x.sharding)


def quantize_in_shards(quantize: Callable[[jax.Array], QArray], x):
    """``quantize(x)`` compiled with ``x``'s sharding in and the matching ``qarray_sharding`` out:
    XLA runs it where the shards lie, each device quantizing its own (no gather of ``x``; with
    double quantization only the float32 block constants travel, for the mean). An abstract
    ``x`` (a ``ShapeDtypeStruct`` with a sharding) gives the abstract, sharded QArray.
    ``quantize`` is a cache key: pass the same function object for the same quantization."""
    run = _in_shards(quantize, tuple(x.shape), np.dtype(x.dtype), x.sharding)
    return jax.eval_shape(run, x) if isinstance(x, jax.ShapeDtypeStruct) else run(x)
