"""Where greedy decoding's GPU time goes: every kernel of one `generate` call (Llama shapes,
random weights, NF4 + DQ through auto, batch 1), read with CUPTI and summed by kernel name, next
to the call's wall time. Run it against two trees to see which kernels a change moved.

    PYTHONPATH=. python3 experiments/generate_kernels_gpu.py [llama-8b]
"""

import collections
import functools
import sys
import time

import jax
import jax.numpy as jnp
from generate_speed import SHAPES, random_params
from jax.experimental.mosaic.gpu import profiler

import jaxquant as jq
from jaxquant.models import llama

shape = sys.argv[1] if len(sys.argv) > 1 else "llama-8b"
config, dtype, steps = SHAPES[shape], jnp.bfloat16, 64
prompt = jnp.arange(16, dtype=jnp.int32)[None] + 1000
model = llama.Llama(config, dtype=dtype)
tree = jq.quantize_tree(random_params(model, prompt, dtype))
gen = jax.jit(functools.partial(
    llama.generate, lambda p, t, c, s: jq.flax.apply(model, p, t, c, s, check=False),
    steps=steps, config=config, dtype=dtype))
jax.block_until_ready(gen(tree, prompt))
t = time.perf_counter()
jax.block_until_ready(gen(tree, prompt))
wall_ms = (time.perf_counter() - t) * 1e3
_, kernels = profiler.measure(gen, aggregate=False)(tree, prompt)
by_name, count = collections.Counter(), collections.Counter()
for name, ms in kernels:
    key = "mosaic qmatmul" if "mosaic" in name else name.split(".")[0][:40]
    by_name[key] += ms
    count[key] += 1
total = sum(by_name.values())
print(f"{jax.__version__} {shape}: wall {wall_ms:.1f} ms for {steps} tokens "
      f"({steps / wall_ms * 1e3:.1f} tok/s), kernels {total:.1f} ms in {len(kernels)} launches")
for key, ms in by_name.most_common(15):
    print(f"  {key:<42} {ms:8.2f} ms  {count[key]:6d} x  {ms / count[key] * 1e3:7.2f} us")
