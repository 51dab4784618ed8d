"""The XLA path for many tokens (M >= 128): ways to dequantize-then-dot, on the GPU.

    PYTHONPATH=. python3 experiments/xla_path_variants_gpu.py
Variants (NF4 + DQ, block 64, bf16; each checked against the current XLA path first, then timed
with CUPTI over 4 rotating weight sets, whole call):
- current: what `qmatmul(implementation="xla")` does (from 1024 tokens: the halves packed
  into one (N, K) weight by 32-bit words, written out, one gemm);
- halves: even/odd k halves, two dots, XLA fusing the dequantize into its gemms (below 1024);
- packed: the halves packed into one (N, K) weight, written out, one gemm with a bf16 result
  (what `current` does from 512 tokens, here at every M);
- rows+barrier: W^T (N, K) dequantized by the strided interleave (float32 rows, then cast), one
  gemm (the session-3 measurements before the packing used 16-bit rows: 10-20 us faster).
"""


import jax
import jax.numpy as jnp
import numpy as np
from gpu_timing import per_call_us

import jaxquant as jq
from jaxquant._src.dequantize import dequantize_halves, dequantize_rows, interleave_16bit

DIMS = (((1,), (1,)), ((), ()))


def halves(x, q):
    even, odd = dequantize_halves(q, np.dtype(jnp.bfloat16))
    y = (jax.lax.dot_general(x[:, 0::2], even, DIMS, preferred_element_type=jnp.float32)
         + jax.lax.dot_general(x[:, 1::2], odd, DIMS, preferred_element_type=jnp.float32))
    return y.astype(x.dtype)


def packed(x, q):
    halves_ = dequantize_halves(q, np.dtype(jnp.bfloat16))
    w_t = jax.lax.optimization_barrier(interleave_16bit(*halves_))
    return jax.lax.dot_general(x, w_t, DIMS, preferred_element_type=jnp.bfloat16)


def rows_barrier(x, q):
    # float32 rows take the strided interleave (16-bit ones are packed by 32-bit words now)
    w_t = jax.lax.optimization_barrier(dequantize_rows(q, np.dtype(np.float32)).astype(x.dtype))
    return jax.lax.dot_general(x, w_t, DIMS, preferred_element_type=jnp.float32).astype(x.dtype)


VARIANTS = {"current": lambda x, q: jq.qmatmul(x, q, implementation="xla"),
            "halves": halves, "packed": packed, "rows+barrier": rows_barrier}


M = (1, 16, 128, 512, 1024, 2048)
for k, n in [(4096, 4096), (4096, 14336), (14336, 4096)]:
    ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * 0.02 for i in range(4)]
    qs = [jq.quantize(w, "nf4", 64, axis=0, double_quant=True, check_finite=False) for w in ws]
    for m in M:
        xs = [jax.random.normal(jax.random.key(50 + i), (m, k), jnp.bfloat16) for i in range(4)]
        ref = jq.qmatmul(xs[0], qs[0], implementation="xla").astype(jnp.float32)
        bf16 = per_call_us(lambda x, w: x @ w, list(zip(xs, ws)))
        line = f"K={k:<5} N={n:<5} M={m:<4} bf16 {bf16:6.1f} us"
        for name, f in VARIANTS.items():
            out = jax.jit(f)(xs[0], qs[0]).astype(jnp.float32)
            rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
            assert rel < 1e-2, (name, rel)
            us = per_call_us(f, list(zip(xs, qs)))
            line += f" | {name} {us:6.1f} (x{bf16 / us:.2f})"
        print(line, flush=True)
