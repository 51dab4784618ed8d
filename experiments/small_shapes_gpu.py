"""qmatmul at small-model shapes on the GPU: bf16 dot vs the XLA path vs the kernel, 1 and 16 tokens.

    PYTHONPATH=. python3 experiments/small_shapes_gpu.py
SmolLM2-135M (576/1536 wide) and Llama-3.2-1B (2048/8192) matmul shapes, NF4 + DQ. CUPTI whole-call
time; enough distinct weight sets to exceed the 50 MB L2 (as in a decode step, where each layer's
weights come from HBM). Is `auto`'s choice of the kernel right at these sizes?
"""

import jax
import jax.numpy as jnp
from gpu_timing import per_call_us

import jaxquant as jq

print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
print(f"{'K x N':<12} {'M':>3} {'bf16':>7} {'xla':>7} {'kernel':>7}  kernel/xla")
for k, n in [(576, 192), (576, 576), (576, 1536), (1536, 576), (2048, 512), (2048, 2048), (2048, 8192),
             (8192, 2048)]:
    sets = max(4, -(-120_000_000 // (k * n * 2)))  # > 120 MB of bf16 weights in rotation
    ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * 0.02 for i in range(sets)]
    qs = [jq.quantize(w, "nf4", 64, axis=0, double_quant=True, check_finite=False) for w in ws]
    for m in (1, 16):
        xs = [jax.random.normal(jax.random.key(1000 + i), (m, k), jnp.bfloat16) for i in range(sets)]
        bf16 = per_call_us(lambda x, w: x @ w, list(zip(xs, ws)))
        xla = per_call_us(lambda x, q: jq.qmatmul(x, q, implementation="xla"), list(zip(xs, qs)))
        kernel = per_call_us(lambda x, q: jq.qmatmul(x, q, implementation="pallas"), list(zip(xs, qs)))
        print(f"{k}x{n:<7} {m:>3} {bf16:7.2f} {xla:7.2f} {kernel:7.2f}  {kernel / xla:.2f}", flush=True)
