"""Per-kernel CUPTI breakdown of the qmatmul kernel path, and a few tuning variants.

    PYTHONPATH=. python3 experiments/profile_qmatmul_gpu.py
"""

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler

import jaxquant as jq
from jaxquant._src.kernels import qmatmul_mgpu as K

k, n, m = 4096, 14336, 1
ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * 0.02 for i in range(4)]
xs = [jax.random.normal(jax.random.key(9 + i), (m, k), jnp.bfloat16) for i in range(4)]
variants = {
    "default (dq)": (True, K.BlockSizes()),
    "no dq": (False, K.BlockSizes()),
    "tile_k 512": (True, K.BlockSizes(tile_k=512)),
    "tile_k 128": (True, K.BlockSizes(tile_k=128)),
    "stages 2": (True, K.BlockSizes(max_concurrent_steps=2)),
    "splits 1": (True, K.BlockSizes(k_splits=1)),
    "splits 8": (True, K.BlockSizes(k_splits=8)),
}
for name, (dq, bs) in variants.items():
    qs = [jq.quantize(w, "nf4", 64, axis=0, double_quant=dq, check_finite=False) for w in ws]
    run = jax.jit(lambda sets: [K.qmatmul(x, q, block_sizes=bs) for x, q in sets])
    try:
        jax.block_until_ready(run(list(zip(xs, qs))))
        _, per_kernel = profiler.measure(run, aggregate=False)(list(zip(xs, qs)))
    except Exception as e:  # a variant that does not compile is a finding too
        print(f"{name:<14} failed: {type(e).__name__}: {str(e)[:120]}")
        continue
    agg = {}
    for kname, t in per_kernel:
        agg[kname] = agg.get(kname, 0) + t * 1e3 / len(xs)
    total = sum(agg.values())
    top = "; ".join(f"{kn[:34]} {t:.1f}" for kn, t in sorted(agg.items(), key=lambda kv: -kv[1])[:5])
    print(f"{name:<14} {total:7.1f} us | {top}", flush=True)
