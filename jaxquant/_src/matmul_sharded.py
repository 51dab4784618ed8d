"""A qmatmul kernel per shard: ``custom_partitioning`` around the kernel, so that under a mesh
XLA runs it on each device's shard instead of gathering the weight for one whole-array call.

The sharding rule ties x's K, the codes' packed K and the block constants' block axis to one
factor ``b`` (blocks), so a K split always cuts whole blocks in all three (row-parallel; the
partial products are summed with ``psum``); ``n`` splits the codes' rows and the constants
(column-parallel) and ``m`` x's rows (data-parallel). Double quantization's nested constants are
flat over (N, blocks), which a split of ``b`` does not cut into contiguous pieces: each device
reads them whole (1 byte per block), decodes them and slices its own rows and blocks, so the
kernel sees a plain float32-constant QArray of its shard. A split the rule cannot honour (an
axis used twice, a length it does not divide) is dropped: XLA then gathers that operand.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxquant._src.dequantize import dequantize
from jaxquant._src.qarray import QArray


def applies(q: QArray) -> bool:
    """Whether the rule holds: at least two whole blocks along K (a partial block or a single one
    has no ``b`` factor to split), constants plain or nested once without a zero point."""
    k = q.shape[0]
    nested = q.scale if isinstance(q.scale, QArray) else None
    return (k > 0 and k % q.block_size == 0 and k // q.block_size > 1 and q.block_size % 2 == 0
            and q.offset is None
            and (nested is None or (not isinstance(nested.scale, QArray) and nested.zero_point is None)))


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry if isinstance(entry, tuple) else (entry,))


def _entry(axes: tuple[str, ...]):
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


def _split(spec: P, dim: int, size: int, mesh, taken: set) -> tuple[str, ...]:
    """The mesh axes of ``spec[dim]`` if none is taken and they divide ``size``, else none."""
    axes = _axes(spec[dim] if len(spec) > dim else None)
    parts = math.prod(dict(zip(mesh.axis_names, mesh.devices.shape))[a] for a in axes)
    return axes if axes and not taken & set(axes) and size % parts == 0 else ()


def _leaves(q: QArray) -> list:
    """The QArray's leaves as custom-call operands: codes, constants (or the nested codes, scale
    and offset), zero point."""
    if isinstance(q.scale, QArray):
        nested = q.scale
        scale = [nested.codes, nested.scale] + ([] if nested.offset is None else [nested.offset.reshape(1)])
    else:
        scale = [q.scale]
    return [q.codes] + scale + ([] if q.zero_point is None else [q.zero_point])


def _with_leaves(q: QArray, leaves, shape=None, constants=None) -> QArray:
    """``q`` rebuilt from operands (the inverse of ``_leaves``); with ``constants``, a plain
    float32-constant QArray of ``shape`` instead of the nested ones."""
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
    if constants is not None:
        scale = constants
    return QArray(codes=codes, scale=scale, zero_point=zero_point, shape=shape or q.shape, dtype=q.dtype,
                  qtype=q.qtype, block_size=q.block_size, axis=q.axis)


def _shard_constants(q: QArray, leaves, n_axes, b_axes, k_local: int, n_local: int):
    """This shard's float32 constants from the whole nested ones (decoded, then sliced)."""
    whole = _with_leaves(q, leaves).scale
    constants = dequantize(whole).astype(jnp.float32).reshape(q.shape[1], -1)  # (N, blocks)
    blocks = k_local // q.block_size
    row = jax.lax.axis_index(n_axes) * n_local if n_axes else 0
    col = jax.lax.axis_index(b_axes) * blocks if b_axes else 0
    return jax.lax.dynamic_slice(constants, (row, col), (n_local, blocks))


def partitioned(local, x, q: QArray):
    """``local(x, q, devices=None)`` (a kernel call, ``x[M, K] @ W[K, N]``) partitioned by the
    operands' shardings: each device calls ``local(x, q, devices=<its platform>)`` on its shard; a
    K split ends in a ``psum``. Under ``vmap`` the batch folds into M (a batched weight: the
    unpartitioned call, vectorized)."""
    k, n = q.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    leaves = _leaves(q)
    # the unpartitioned call (for the default backend: a platform-dependent branch does not survive
    # the partitioner); its constants become operands
    body = jax.make_jaxpr(functools.partial(local, devices=jax.default_backend()))(x2, q)
    consts = [jnp.asarray(c) for c in body.consts]

    def whole(x2, *args):
        weight, consts = args[:len(leaves)], args[len(leaves):]
        return jax.core.eval_jaxpr(body.jaxpr, consts, x2, *jax.tree.leaves(_with_leaves(q, weight)))[0]

    call = custom_partitioning(whole)
    nested = isinstance(q.scale, QArray)

    def partition(mesh, arg_shapes, result_shape):
        x_spec, codes_spec = arg_shapes[0].sharding.spec, arg_shapes[1].sharding.spec
        m = _split(x_spec, 0, arg_shapes[0].shape[0], mesh, set())
        nn_ = _split(codes_spec, 0, n, mesh, set(m))
        b = _split(codes_spec, 1, k // q.block_size, mesh, set(m) | set(nn_))
        parts = lambda axes: math.prod(dict(zip(mesh.axis_names, mesh.devices.shape))[a] for a in axes)
        k_local, n_local = k // parts(b), n // parts(nn_)
        platform = mesh.devices.flat[0].platform
        m_e, n_e, b_e = _entry(m), _entry(nn_), _entry(b)

        def lower(x2, *args):
            shard = args[:len(leaves)]
            constants = _shard_constants(q, shard, n_e, b_e, k_local, n_local) if nested else None
            y = local(x2, _with_leaves(q, shard, (k_local, n_local), constants), devices=platform)
            return y if not b else jax.lax.psum(y, b_e)

        weight = NamedSharding(mesh, P(n_e, b_e))
        leaf_shardings = [weight] + ([NamedSharding(mesh, P())] * (len(leaves) - 1 - (q.zero_point is not None))
                                     if nested else [weight]) + ([weight] if q.zero_point is not None else [])
        return (mesh, lower, NamedSharding(mesh, P(m_e, n_e)),
                (NamedSharding(mesh, P(m_e, b_e)), *leaf_shardings, *[NamedSharding(mesh, P())] * len(consts)))

    per_code = 2 if q.bits == 4 else 1
    rules = [f"n (b c{per_code})"] + (["e0", "e1"] + (["e2"] if q.scale.offset is not None else [])
                                      if nested else ["n b"]) + (["n b"] if q.zero_point is not None else [])
    const_rules = [" ".join(f"f{i}_{d}" for d in range(c.ndim)) for i, c in enumerate(consts)]
    replicated = tuple(r for r in rules if r.startswith("e")) + tuple(f for r in const_rules for f in r.split())
    sizes = {"s": q.block_size, f"c{per_code}": q.block_size // per_code}
    if "n b" not in rules:  # b only inside compound dims: its size must be given
        sizes["b"] = k // q.block_size
    call.def_partition(partition=partition, sharding_rule=", ".join(["m (b s)"] + rules + const_rules) + " -> m n",
                       reduction_factors=("b",), need_replication_factors=replicated, **sizes)

    @jax.custom_batching.custom_vmap
    def run(x2, *ops):
        return call(x2, *ops)

    @run.def_vmap
    def _batched(axis_size, in_batched, x2, *ops):
        if not any(in_batched[1:]):  # x only: fold the batch into its rows
            xb = x2 if in_batched[0] else jnp.broadcast_to(x2, (axis_size, *x2.shape))
            weight = _with_leaves(q, ops[:len(leaves)])
            return partitioned(local, xb.reshape(-1, k), weight).reshape(axis_size, -1, n), True
        axes = [0 if b else None for b in in_batched]
        return jax.vmap(whole, in_axes=axes)(x2, *ops), True

    return run(x2, *leaves, *consts).reshape(*lead, n)
