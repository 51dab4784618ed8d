"""The XLA qmatmul: dequantize, then ``lax.dot_general``. The reference every kernel is tested
against, and the fallback on every backend for whatever no kernel handles.

``q`` is ``W[K, N]`` quantized along K (``quantize(W, axis=0)``): its codes are stored ``(N, K/2)``,
so the weight is dequantized in that layout, ``W^T (N, K)``, and contracted on its K axis: the same
numbers as ``x @ dequantize(q)`` without transposing the dequantized weight in memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src.kernels.qmatmul_tuning import MATERIALIZE_FROM_TOKENS
from jaxquant._src.qarray import QArray
from jaxquant._src.dequantize import dequantize_halves, dequantize_rows


def qmatmul_xla(x: jax.Array, q: QArray, compute_dtype=jnp.bfloat16) -> jax.Array:
    """``x @ dequantize(q)``: W dequantized to ``compute_dtype``, a dot with float32 accumulation,
    the result in x's dtype. Inputs are checked by the caller (``qmatmul``)."""
    # Tie the weight to x: XLA may not hoist every layer's dequantize to the top of a model
    # (that would hold all weights in full precision at once, measured in tests/test_flax.py).
    out_dtype = x.dtype
    x, q = jax.lax.optimization_barrier((x, q))
    x = x.astype(compute_dtype)
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    materialize = int(np.prod(x.shape[:-1])) >= MATERIALIZE_FROM_TOKENS
    halves = dequantize_halves(q, np.dtype(compute_dtype))
    if halves is not None and not materialize:  # 4-bit: even and odd k apart, no interleave
        y = (jax.lax.dot_general(x[..., 0::2], halves[0], dims, preferred_element_type=jnp.float32)
             + jax.lax.dot_general(x[..., 1::2], halves[1], dims, preferred_element_type=jnp.float32))
    else:
        w_t = dequantize_rows(q, np.dtype(compute_dtype))
        result = jnp.float32
        if materialize:  # a plain gemm on the written-out weight
            w_t = jax.lax.optimization_barrier(w_t)
            # still accumulated in float32 (cuBLAS/XLA upcast 16-bit dots), but written in the
            # output dtype: a float32 result and a convert pass cost 55 us at M=2048 x 14336
            result = out_dtype if np.dtype(out_dtype) == np.dtype(compute_dtype) else result
        y = jax.lax.dot_general(x, w_t, dims, preferred_element_type=result)
    return y.astype(out_dtype)


def qmatmul_xla_grad_x(g: jax.Array, q: QArray, compute_dtype=jnp.bfloat16) -> jax.Array:
    """``g @ dequantize(q).T``, the gradient of ``x @ dequantize(q)`` with respect to x: the
    weight dequantized once in ``compute_dtype``, float32 accumulation, the result in g's dtype."""
    w_t = dequantize_rows(q, np.dtype(compute_dtype))  # (N, K)
    gx = jax.lax.dot_general(g.astype(compute_dtype), w_t, (((g.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return gx.astype(g.dtype)
