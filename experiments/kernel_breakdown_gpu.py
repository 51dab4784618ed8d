"""Where a small-batch qmatmul call's time goes: each GPU kernel of one call (the Mosaic kernel and
XLA's glue around it: the x permutation, the split-K sum), read with CUPTI; and the floor for
streaming the same bytes (an XLA reduction over the code words).

    PYTHONPATH=. SHAPES=4096x14336 TOKENS=1,16 VARIANTS="k256 s2 d32 x1" python3 experiments/kernel_breakdown_gpu.py
"""

import collections
import os
import statistics

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler
from gpu_timing import fixed

import jaxquant as jq
from jaxquant._src.kernels import qmatmul_mgpu as K

VARIANTS = [v for v in os.environ.get("VARIANTS", "").split(";") if v]
TOKENS = [int(t) for t in os.environ.get("TOKENS", "1,16").split(",")]
SHAPES = [tuple(map(int, s.split("x"))) for s in
          os.environ.get("SHAPES", "4096x14336,14336x4096,4096x4096").split(",")]


def kernels_us(f, sets, iterations=10):
    """{kernel name: median us per call} over one jitted call cycling through ``sets``."""
    run_all = jax.jit(lambda sets: [f(*a) for a in sets])
    jax.block_until_ready(run_all(sets))
    _, per_iteration = profiler.measure(run_all, aggregate=False, iterations=iterations)(sets)
    times = collections.defaultdict(list)
    for timings in per_iteration:
        total = collections.Counter()
        for name, ms in timings:
            total[name[:40]] += ms
        for name, ms in total.items():
            times[name].append(ms)
    return {name: statistics.median(ms) / len(sets) * 1e3 for name, ms in times.items()}


def show(label, times):
    parts = " | ".join(f"{name} {us:5.1f}" for name, us in sorted(times.items(), key=lambda t: -t[1]))
    print(f"  {label:<16} total {sum(times.values()):5.1f} = {parts}", flush=True)


print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
for k, n in SHAPES:
    ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * 0.02 for i in range(4)]
    qs = [jq.quantize(w, "nf4", 64, axis=0, double_quant=True, check_finite=False) for w in ws]
    words = [jax.lax.bitcast_convert_type(q.codes.reshape(n, k // 8, 4), jnp.int32) for q in qs]
    nbytes = qs[0].codes.size * qs[0].codes.dtype.itemsize
    floor = kernels_us(lambda w: jnp.bitwise_xor.reduce(w, axis=1), [(w,) for w in words])
    print(f"K={k} N={n}: streaming the {nbytes / 1e6:.1f} MB of codes (XLA xor-reduce): "
          f"{sum(floor.values()):.1f} us = {nbytes / sum(floor.values()) / 1e6:.2f} TB/s", flush=True)
    for m in TOKENS:
        xs = [jax.random.normal(jax.random.key(50 + i), (m, k), jnp.bfloat16) for i in range(4)]
        print(f" M={m}", flush=True)
        show("bf16 dot", kernels_us(lambda x, w: x @ w, list(zip(xs, ws))))
        show("default", kernels_us(lambda x, q: K.qmatmul(x, q), list(zip(xs, qs))))
        for v in VARIANTS:
            show(v, kernels_us(fixed(v), list(zip(xs, qs))))
