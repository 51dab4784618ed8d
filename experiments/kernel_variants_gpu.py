"""qmatmul kernel tuning variants on the GPU (v4: steps, stages and split-K retuned for the new x layout).

    PYTHONPATH=. python3 experiments/kernel_variants_gpu.py
Each variant is checked against the XLA path on fresh inputs first, then timed with CUPTI over 4
rotating weight sets (NF4 + DQ, block 64, bf16).
"""

import os

import jax
import jax.numpy as jnp
from gpu_timing import per_call_us

import jaxquant as jq
from jaxquant._src.kernels import qmatmul_mgpu as K

VARIANTS = {"4 stages": K.BlockSizes(max_concurrent_steps=4),
            "3 stages": K.BlockSizes(max_concurrent_steps=3),
            "2 stages": K.BlockSizes(max_concurrent_steps=2),
            "2 stages, 1056 CTAs": K.BlockSizes(max_concurrent_steps=2, target_ctas=1056)}
TOKENS = [int(t) for t in os.environ.get("TOKENS", "1,16").split(",")]


for k, n in [(4096, 4096), (4096, 14336), (14336, 4096)]:
    ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * 0.02 for i in range(4)]
    qs = [jq.quantize(w, "nf4", 64, axis=0, double_quant=True, check_finite=False) for w in ws]
    for m in TOKENS:
        xs = [jax.random.normal(jax.random.key(50 + i), (m, k), jnp.bfloat16) for i in range(4)]
        ref = jq.qmatmul(xs[0], qs[0], implementation="xla").astype(jnp.float32)
        line = f"K={k:<5} N={n:<5} M={m:<2} bf16 {per_call_us(lambda x, w: x @ w, list(zip(xs, ws))):6.1f} us"
        for name, bs in VARIANTS.items():
            try:
                out = K.qmatmul(xs[0], qs[0], block_sizes=bs).astype(jnp.float32)
                rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
                if rel > 1e-2 and not bs.probe:
                    raise AssertionError(f"wrong result: relative error {rel:.1e}")
                us = per_call_us(lambda x, q: K.qmatmul(x, q, block_sizes=bs), list(zip(xs, qs)))
                line += f" | {name} {us:5.1f} ({rel:.0e})"
            except Exception as e:  # a variant that fails to compile is a finding
                line += f" | {name} failed: {type(e).__name__}: {str(e)[:80]}"
        print(line, flush=True)
