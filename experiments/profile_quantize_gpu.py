"""Per-kernel CUPTI breakdown of jaxquant's quantizer on a GPU (what XLA emits, and its cost).

    PYTHONPATH=. python3 experiments/profile_quantize_gpu.py
"""

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler

import jaxquant as jq

K, N = 4096, 14336
xs = [jax.random.normal(jax.random.key(i), (K, N), jnp.bfloat16) for i in range(4)]
in_bytes = xs[0].nbytes

variants = {
    "nf4 (no dq)": lambda x: jq.quantize(x, "nf4", 64, check_finite=False),
    "nf4 + dq": lambda x: jq.quantize(x, "nf4", 64, double_quant=True, check_finite=False),
    "nf4 axis=0 + dq": lambda x: jq.quantize(x, "nf4", 64, axis=0, double_quant=True, check_finite=False),
    "codes only": lambda x: jq.quantize(x, "nf4", 64, check_finite=False).codes,
    "absmax only": lambda x: jq.quantize(x, "nf4", 64, check_finite=False).scale,
    "copy x+1": lambda x: x + jnp.asarray(1, x.dtype),
}
for name, f in variants.items():
    run = jax.jit(lambda sets: [f(x) for x in sets])
    out = jax.block_until_ready(run(xs))
    _, per_kernel = profiler.measure(run, aggregate=False)(xs)
    total_ms = sum(t for _, t in per_kernel) / len(xs)
    q_bytes = jq.nbytes(out[0])
    print(f"{name:<18} {total_ms * 1e3:8.1f} us/call  {(in_bytes + q_bytes) / total_ms / 1e9:6.3f} TB/s")
    seen = {}
    for kname, t in per_kernel:
        seen[kname] = seen.get(kname, 0) + t / len(xs)
    for kname, t in sorted(seen.items(), key=lambda kv: -kv[1])[:6]:
        print(f"    {t * 1e3:8.1f} us  {kname[:90]}")
