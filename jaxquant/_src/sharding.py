"""Shardings for QArrays: place codes and constants consistently with the logical array's spec.

A QArray quantized along axis k stores rows ``moveaxis(x, k, -1)``: its codes, constants and
zero points have the logical array's other dimensions first, then the (packed) block axis. So a
``PartitionSpec`` of the logical array (e.g. ``P(None, "model")`` for a kernel ``W[K, N]``
sharded along its outputs) maps to the same spec on those leading dimensions; the block axis
itself stays unsharded. Double-quantized constants have flat nested codes (bitsandbytes'
layout): they are split along with the rows when exactly the leading row dimension is sharded,
and their per-256 constants and offset, a few bytes, are replicated.
"""

from __future__ import annotations

import dataclasses

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxquant._src.qarray import QArray


def qarray_sharding(q: QArray, mesh: Mesh, spec: P) -> QArray:
    """A QArray-shaped tree of ``NamedSharding`` for ``q``, from the logical array's ``spec``.

    Example:
      >>> # W[K, N] sharded along N over mesh axis "model":
      >>> # q = jax.device_put(q, jq.qarray_sharding(q, mesh, P(None, "model")))

    Raises:
      ValueError: ``spec`` shards the block axis, or ``q`` has ``axis=None`` with a sharded spec.
    """
    entries = tuple(spec) + (None,) * (q.ndim - len(tuple(spec)))
    if q.axis is None:
        if any(e is not None for e in entries):
            raise ValueError(f"qarray_sharding: {q!r} has flat blocks (axis=None); quantize along an "
                             f"axis to shard it, got spec {spec}")
        rows = P()
    else:
        if entries[q.axis] is not None:
            raise ValueError(f"qarray_sharding: spec {spec} shards axis {q.axis}, the block axis of "
                             f"{q!r}; shard another axis")
        rest = [e for i, e in enumerate(entries) if i != q.axis]
        rows = P(*rest, None)
    replicated = NamedSharding(mesh, P())

    def constants(scale):
        if not isinstance(scale, QArray):
            return NamedSharding(mesh, rows)
        flat = P(rows[0]) if rows and rows[0] is not None and all(e is None for e in rows[1:]) else P()
        return dataclasses.replace(scale, codes=NamedSharding(mesh, flat), scale=replicated,
                                   zero_point=None, offset=replicated)

    return dataclasses.replace(
        q, codes=NamedSharding(mesh, rows), scale=constants(q.scale),
        zero_point=None if q.zero_point is None else NamedSharding(mesh, rows),
        offset=None if q.offset is None else replicated)
