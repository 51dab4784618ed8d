"""Inputs that corner a quantizer, shared by the tests and the GPU experiments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src import codebooks


def awkward_bf16(rng: np.random.Generator, shape) -> jax.Array:
    """Normal values (at least 256 of them) with an all-zero block of 64, a block of tiny values,
    a heavy-tailed block, and a block whose values sit on the NF4 and FP4 midpoints times 4 (its
    absmax is 4, so they scale back onto the midpoints), in bfloat16."""
    x = rng.standard_normal(shape).astype(np.float32).reshape(-1)
    x[:64] = 0
    x[64:128] *= 1e-30
    x[128:192] *= np.where(rng.random(64) < 0.1, 40.0, 1.0)
    mids = np.concatenate([codebooks.get_qtype(t).midpoints for t in ("nf4", "fp4")])
    x[192:192 + len(mids)] = mids * 4.0
    x[192 + 63] = 4.0
    return jnp.asarray(x.reshape(shape), jnp.bfloat16)
