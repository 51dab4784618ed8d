"""Smoke test of the warp-specialized qmatmul variant (compute_wgs > 1) on the GPU, one case per
process (a hang costs only its own timeout):  python3 experiments/ws_smoke_gpu.py K N M VARIANT"""
import statistics
import sys

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler

import jaxquant as jq
from jaxquant._src.kernels import qmatmul_mgpu as K

k, n, m = map(int, sys.argv[1:4])
fields = dict(k="tile_k", s="max_concurrent_steps", x="k_splits", w="compute_wgs")
bs = K.BlockSizes(**{fields[f[0]]: int(f[1:]) for f in sys.argv[4].split()})
ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * 0.02 for i in range(4)]
qs = [jq.quantize(w, "nf4", 64, axis=0, double_quant=True, check_finite=False) for w in ws]
xs = [jax.random.normal(jax.random.key(50 + i), (m, k), jnp.bfloat16) for i in range(4)]
out = K.qmatmul(xs[0], qs[0], block_sizes=bs).astype(jnp.float32)
ref = jq.qmatmul(xs[0], qs[0], implementation="xla").astype(jnp.float32)
err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def timed(f, sets):
    run = jax.jit(lambda sets: [f(*a) for a in sets])
    jax.block_until_ready(run(sets))
    _, ms = profiler.measure(run, iterations=10)(sets)
    return statistics.median(ms) / len(sets) * 1e3


t = timed(lambda x, q: K.qmatmul(x, q, block_sizes=bs), list(zip(xs, qs)))
d = timed(lambda x, q: K.qmatmul(x, q), list(zip(xs, qs)))
b = timed(lambda x, w: x @ w, list(zip(xs, ws)))
print(f"K={k} N={n} M={m} [{sys.argv[4]}] err {err:.1e} | {t:.1f} us | default {d:.1f} | bf16 {b:.1f}")
