"""Per-kernel CUPTI breakdown of the XLA qmatmul path (dequantize, then dot) on a GPU.

    PYTHONPATH=. python3 experiments/profile_xla_path_gpu.py
"""

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler

import jaxquant as jq

k, n = 4096, 14336
ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * 0.02 for i in range(4)]
for m in (1, 128, 2048):
    xs = [jax.random.normal(jax.random.key(9 + i), (m, k), jnp.bfloat16) for i in range(4)]
    for name, dq in (("nf4+dq", True), ("nf4", False)):
        qs = [jq.quantize(w, "nf4", 64, axis=0, double_quant=dq, check_finite=False) for w in ws]
        for what, f in (("qmatmul xla", lambda x, q: jq.qmatmul(x, q, implementation="xla")),
                        ("dequantize", lambda x, q: jq.dequantize(q))):
            run = jax.jit(lambda sets: [f(x, q) for x, q in sets])
            jax.block_until_ready(run(list(zip(xs, qs))))
            _, per_kernel = profiler.measure(run, aggregate=False)(list(zip(xs, qs)))
            agg = {}
            for kname, t in per_kernel:
                agg[kname] = agg.get(kname, 0) + t * 1e3 / 4
            top = "; ".join(f"{kn[:30]} {t:.1f}" for kn, t in sorted(agg.items(), key=lambda kv: -kv[1])[:4])
            print(f"M={m:<4} {name:<7} {what:<12} {sum(agg.values()):7.1f} us | {top}", flush=True)

if __name__ == "__main__":
    import os
    import sys
    if len(sys.argv) > 1:  # also write the optimized HLO of the M=2048 path there
        x = jax.random.normal(jax.random.key(9), (2048, k), jnp.bfloat16)
        q = jq.quantize(ws[0], "nf4", 64, axis=0, double_quant=True, check_finite=False)
        f = jax.jit(lambda x, q: jq.qmatmul(x, q, implementation="xla"))
        with open(os.path.join(sys.argv[1], "xla_path_m2048.hlo.txt"), "w") as out:
            out.write(f.lower(x, q).compile().as_text())
