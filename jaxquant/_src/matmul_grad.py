"""The transposed product ``g @ dequantize(q)^T`` in K-chunks: qmatmul's backward to x.

Terms: ``q`` quantizes ``W[K, N]`` along K, stored as rows ``W^T (N, K)`` (codes ``(N, K/2)`` for
4 bits, one constant per ``block_size`` run of a row). A *chunk* is ``kc`` consecutive columns of
those rows (``kc`` a multiple of the block size, so a chunk holds whole blocks): its codes are
``codes[:, k0/2 : (k0+kc)/2]`` and its constants ``constants[:, k0/bs : (k0+kc)/bs]``, so it is
itself a QArray of ``W^T[:, k0:k0+kc]`` quantized along its last axis.

``gx[..., k0:k0+kc] = g @ W^T[:, k0:k0+kc]``: each chunk of the output is one dot with one
dequantized chunk, written into place, so a ``lax.scan`` over chunks holds one chunk of the
weight in the compute dtype at a time instead of the whole ``(N, K)`` (no float32 accumulator
either: each output element is one dot). With ``chunks=1`` it is the plain dequantize-then-dot
(``matmul_xla.qmatmul_xla_grad_x``). ``qmatmul``'s backward to x is this product, cut into
``default_chunks``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src.dequantize import dequantize
from jaxquant._src.matmul_xla import qmatmul_xla_grad_x
from jaxquant._src.qarray import QArray

# A chunk of at most this many weight elements (4 Mi: 8 MiB in bfloat16, a 4096 x 14336 weight in
# 16 chunks of 256 x 14336). On the CPU, 4096 x 2048 NF4+DQ, g (1024, 2048) bf16: 1 chunk 32 MiB
# temp, 140 ms; 8 chunks 4.5 MiB, 50 ms; qmatmul's whole-weight backward 32 MiB, 64 ms (same
# numbers bit for bit). To be re-measured on the GPU, where a chunk's dot must stay gemm-sized.
CHUNK_ELEMENTS = 4 * 1024 * 1024


def default_chunks(q: QArray) -> int:
    """The fewest chunks within ``CHUNK_ELEMENTS`` that cut K into whole blocks (even-length for
    4 bits); else the most such chunks; 1 (the whole weight) where K has no such cut."""
    k, n = q.shape
    blocks = k // q.block_size if q.block_size and k and k % q.block_size == 0 else 1
    valid = [c for c in range(1, blocks + 1)
             if blocks % c == 0 and (q.bits != 4 or (k // c) % 2 == 0)]
    fitting = [c for c in valid if (k // c) * n <= CHUNK_ELEMENTS]
    return fitting[0] if fitting else max(valid, default=1)


def _chunk(q: QArray, constants: jax.Array, i, kc: int) -> QArray:
    """Columns ``[i*kc, (i+1)*kc)`` of the stored rows, as a QArray of shape ``(N, kc)``, axis 1."""
    per_code = 2 if q.bits == 4 else 1
    nb = kc // q.block_size
    n = q.shape[1]
    codes = jax.lax.dynamic_slice(q.codes, (0, i * (kc // per_code)), (n, kc // per_code))
    scale = jax.lax.dynamic_slice(constants, (0, i * nb), (n, nb))
    zp = None if q.zero_point is None else jax.lax.dynamic_slice(q.zero_point, (0, i * nb), (n, nb))
    return dataclasses.replace(q, codes=codes, scale=scale, zero_point=zp, offset=None,
                               shape=(n, kc), axis=1)


def matmul_transposed(g: jax.Array, q: QArray, compute_dtype=jnp.bfloat16,
                      chunks: int | None = None) -> jax.Array:
    """``g @ dequantize(q, compute_dtype).T`` for ``q = quantize(W[K, N], axis=0)``, g ``[..., N]``,
    decoding one K-chunk of W at a time; float32 accumulation, result in g's dtype.

    Raises:
      ValueError: ``chunks`` does not cut K into whole, even-length runs of blocks.

    Example:
      >>> import jax, jax.numpy as jnp, jaxquant as jq
      >>> q = jq.quantize(jax.random.normal(jax.random.key(0), (256, 128)), "nf4", 64, axis=0)
      >>> matmul_transposed(jnp.ones((3, 128)), q, chunks=2).shape
      (3, 256)
    """
    k, n = q.shape
    chunks = default_chunks(q) if chunks is None else chunks
    kc = k // chunks if chunks > 0 else 0
    if chunks != 1 and (chunks <= 0 or kc * chunks != k or kc % q.block_size or (q.bits == 4 and kc % 2)):
        raise ValueError(f"chunks must cut K={k} into runs of whole blocks (block_size="
                         f"{q.block_size}) of even length, got chunks={chunks}")
    compute = np.dtype(compute_dtype)
    # Tie the decode to g: without it XLA computes every layer's backward decode as soon as the
    # codes are there, holding all weights in full precision at once (6 layers of 1024 x 1024 in a
    # jitted training step: 24 MiB of temp instead of 4.5).
    g, q = jax.lax.optimization_barrier((g, q))
    if chunks == 1:  # the whole weight: any K, partial blocks included
        return qmatmul_xla_grad_x(g, q, compute)
    lead = g.shape[:-1]
    g2 = g.reshape(-1, n).astype(compute)
    # the constants are small (one float32 per block); the codes are what the chunks slice
    constants = dequantize(q.scale, jnp.float32) if isinstance(q.scale, QArray) else q.scale
    dims = (((1,), (0,)), ((), ()))

    def step(out, i):
        # tie the chunk's decode to the running output: XLA may not hoist the decodes out of the
        # loop (that would hold the whole weight again)
        out, i = jax.lax.optimization_barrier((out, i))
        w_c = dequantize(_chunk(q, constants, i, kc), compute)  # (N, kc)
        part = jax.lax.dot_general(g2, w_c, dims, preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_slice(out, part.astype(g.dtype), (0, i * kc)), None

    # the output buffer, tied to g too: a constant initial carry is materialized when the program
    # starts, so every layer's (tokens, K) buffer would be alive from the first layer's forward
    # (Llama-3-8B, 1024 tokens: +71 MB per layer of temp; on the H200 the 32 layers' buffers were
    # most of a QLoRA step's peak)
    out, g2 = jax.lax.optimization_barrier((jnp.zeros((g2.shape[0], k), g.dtype), g2))
    out, _ = jax.lax.scan(step, out, jnp.arange(chunks))
    return out.reshape(*lead, k)
