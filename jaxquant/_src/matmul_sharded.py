"""A qmatmul kernel per shard: ``custom_partitioning`` around the kernel, so that under a mesh
XLA runs it on each device's shard instead of gathering the weight for one whole-array call.

The sharding rule ties x's K, the codes' packed K and the block constants' block axis to one
factor ``b`` (blocks), so a K split always cuts whole blocks in all three (row-parallel; the
partial products are summed with ``psum``); ``n`` splits the codes' rows and the constants
(column-parallel) and ``m`` x's rows (data-parallel). Double quantization's nested constants are
flat over (N, blocks), which a split of ``b`` does not cut into contiguous pieces: each device
reads them whole (1 byte per block), decodes them and slices its own rows and blocks, so the
kernel sees a plain float32-constant QArray of its shard.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxquant._src.dequantize import dequantize
from jaxquant._src.qarray import QArray


def applies(x, q: QArray) -> bool:
    """Whether the rule holds: whole blocks along K (a partial last block has no factor), the
    constants plain or nested once."""
    k = q.shape[0]
    nested = isinstance(q.scale, QArray)
    return (x.ndim >= 1 and k > 0 and k % q.block_size == 0 and q.block_size % 2 == 0
            and q.offset is None and (not nested or not isinstance(q.scale.scale, QArray)))


def _entry(spec: P, dim: int):
    return spec[dim] if len(spec) > dim else None


def _operands(q: QArray) -> tuple[list, list[str]]:
    """The QArray's leaves as custom-call operands, each with its part of the sharding rule."""
    per_byte = 2 if q.codes.shape[-1] * 2 <= q.shape[0] + 1 else 1  # 4-bit codes pack two
    ops, rules = [q.codes], [f"n (b c{per_byte})"]
    if isinstance(q.scale, QArray):
        nested = q.scale
        ops += [nested.codes, nested.scale]
        rules += ["e0", "e1"]
        if nested.offset is not None:
            ops.append(jnp.reshape(nested.offset, (1,)))
            rules.append("e2")
    else:
        ops.append(q.scale)
        rules.append("n b")
    if q.zero_point is not None:
        ops.append(q.zero_point)
        rules.append("n b")
    return ops, rules


def _local_qarray(q: QArray, leaves, n_axis, b_axis, k_local: int, n_local: int) -> QArray:
    """This device's shard of ``q`` from its operand shards (nested constants decoded and sliced)."""
    codes, rest = leaves[0], list(leaves[1:])
    if isinstance(q.scale, QArray):
        nested = q.scale
        offset = None
        nested_codes, nested_scale = rest.pop(0), rest.pop(0)
        if nested.offset is not None:
            offset = rest.pop(0)[0]
        whole = QArray(codes=nested_codes, scale=nested_scale, offset=offset, shape=nested.shape,
                       dtype=nested.dtype, qtype=nested.qtype, block_size=nested.block_size, axis=nested.axis)
        constants = dequantize(whole).astype(jnp.float32).reshape(q.shape[1], -1)  # (N, blocks)
        blocks = k_local // q.block_size
        row = jax.lax.axis_index(n_axis) * n_local if n_axis else 0
        col = jax.lax.axis_index(b_axis) * blocks if b_axis else 0
        scale = jax.lax.dynamic_slice(constants, (row, col), (n_local, blocks))
    else:
        scale = rest.pop(0)
    zero_point = rest.pop(0) if q.zero_point is not None else None
    return QArray(codes=codes, scale=scale, zero_point=zero_point, shape=(k_local, n_local), dtype=q.dtype,
                  qtype=q.qtype, block_size=q.block_size, axis=q.axis)


def partitioned(local, x, q: QArray):
    """``local(x, q)`` (a kernel call, ``x[M, K] @ W[K, N]``) partitioned by the operands'
    shardings: each device calls ``local`` on its shard; a K split ends in a ``psum``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    ops, rules = _operands(q)
    per_byte = 2 if "c2" in rules[0] else 1
    body = jax.make_jaxpr(lambda x2, q: local(x2, q))(x2, q)  # the unpartitioned call
    consts = [jnp.asarray(c) for c in body.consts]
    n_ops = 1 + len(ops)

    def whole(*args):
        x2, leaves, consts = args[0], args[1:n_ops], args[n_ops:]
        return jax.core.eval_jaxpr(body.jaxpr, consts, x2, *jax.tree.leaves(_rebuild(q, leaves)))[0]

    call = custom_partitioning(whole)

    def partition(mesh, arg_shapes, result_shape):
        x_spec, codes_spec = arg_shapes[0].sharding.spec, arg_shapes[1].sharding.spec
        m_axis, n_axis, b_axis = _entry(x_spec, 0), _entry(codes_spec, 0), _entry(codes_spec, 1)
        size = dict(zip(mesh.axis_names, mesh.devices.shape))
        parts = lambda axis: 1 if axis is None else math.prod(
            size[a] for a in (axis if isinstance(axis, tuple) else (axis,)))
        k_local, n_local = q.shape[0] // parts(b_axis), q.shape[1] // parts(n_axis)

        def lower(x2, *args):
            lq = _local_qarray(q, args[:n_ops - 1], n_axis, b_axis, k_local, n_local)
            y = local(x2, lq)
            if b_axis is None:
                return y
            return jax.lax.psum(y.astype(jnp.float32), b_axis).astype(y.dtype)

        spec_of = {"n b": P(n_axis, b_axis), rules[0]: P(n_axis, b_axis)}
        arg_specs = [P(m_axis, b_axis)] + [spec_of.get(r, P()) for r in rules] + [P()] * len(consts)
        return (mesh, lower, NamedSharding(mesh, P(m_axis, n_axis)),
                tuple(NamedSharding(mesh, s) for s in arg_specs))

    const_rules = [" ".join(f"f{i}_{d}" for d in range(c.ndim)) for i, c in enumerate(consts)]
    replicated = tuple(r.split()[0] for r in rules if r.startswith("e")) + tuple(
        f for r in const_rules for f in r.split())
    rule = ", ".join(["m (b s)"] + rules + const_rules) + " -> m n"
    sizes = {"s": q.block_size, f"c{per_byte}": q.block_size // per_byte}
    if "n b" not in rules:  # b only inside compound dims: its size must be given
        sizes["b"] = q.shape[0] // q.block_size
    call.def_partition(partition=partition, sharding_rule=rule, reduction_factors=("b",),
                       need_replication_factors=replicated, **sizes)
    return call(x2, *ops, *consts).reshape(*lead, q.shape[1])


def _rebuild(q: QArray, leaves) -> QArray:
    """``q`` with its leaves replaced by the custom call's operands (the inverse of ``_operands``)."""
    leaves = list(leaves)
    codes = leaves.pop(0)
    if isinstance(q.scale, QArray):
        nested = q.scale
        n_codes, n_scale = leaves.pop(0), leaves.pop(0)
        offset = leaves.pop(0)[0] if nested.offset is not None else None
        scale = QArray(codes=n_codes, scale=n_scale, offset=offset, shape=nested.shape, dtype=nested.dtype,
                       qtype=nested.qtype, block_size=nested.block_size, axis=nested.axis)
    else:
        scale = leaves.pop(0)
    zero_point = leaves.pop(0) if q.zero_point is not None else None
    return QArray(codes=codes, scale=scale, zero_point=zero_point, shape=q.shape, dtype=q.dtype,
                  qtype=q.qtype, block_size=q.block_size, axis=q.axis)
