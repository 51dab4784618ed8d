"""Shared by the qmatmul tests: quantized weights and the kernels' float tolerance."""

import jax.numpy as jnp
import numpy as np

import jaxquant as jq


def make(rng, k, n, qtype="nf4", dq=True, heavy=False, bs=64):
    """``quantize(W, axis=0)`` of a bf16 W[K, N]; ``heavy``: 1% of the weights 25x larger."""
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    if heavy:
        w *= np.where(rng.random((k, n)) < 0.01, 25.0, 1.0).astype(np.float32)
    return jq.quantize(jnp.asarray(w, jnp.bfloat16), qtype, bs, axis=0, double_quant=dq)


def abstract_weight(k, n):
    """An NF4 QArray of W[K, N] with zero codes: enough to pick block sizes, nothing to run."""
    return jq.QArray(codes=np.zeros((n, k // 2), np.uint8), scale=np.ones((n, k // 64), np.float32),
                     shape=(k, n), qtype="nf4", block_size=64, axis=0)


def close(out, ref, k):
    """bf16 outputs may differ by one ulp of the largest output (2^-7 of it); the kernel rounds
    each weight twice (table value, then times its scale: 2^-8 relative, random sign, so the
    sum's error is ~2^-8 / 5 of the largest output; allow 5 sigma); f32 sums in another order."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=scale * (2**-7 + 2**-8 + 1e-6 * np.sqrt(k)), rtol=0)
