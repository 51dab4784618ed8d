"""The qmatmul kernel past 64 tokens: step length and pipeline stages at 64-128 tokens (session
4); token tiles, two warpgroups and the transposed in-place output up to 2048 tokens (session 7).

    PYTHONPATH=. SHAPES=4096x14336 TOKENS=128,2048 VARIANTS="k64 s4 x1 w2" python3 experiments/kernel_tokens_gpu.py
Each variant (tile_k, stages) bypasses the kernel's own fitting, is checked against the XLA path on
fresh inputs, then timed with CUPTI over 4 rotating weight sets (NF4 + DQ, block 64, bf16, whole
call); the XLA path and the bf16 dot are timed in the same run.
"""

import os

import jax
import jax.numpy as jnp
from gpu_timing import fixed, per_call_us

import jaxquant as jq
from jaxquant._src.kernels import qmatmul_mgpu as K

# variants as in gpu_timing.block_sizes, e.g. VARIANTS="k128 s2 x1;k128 s4 w2;k128 s2 pload"
DEFAULT_VARIANTS = "k128 s2;k128 s3;k256 s2;k64 s4;k64 s6"
VARIANTS = [v for v in os.environ.get("VARIANTS", DEFAULT_VARIANTS).split(";") if v.strip()]
TOKENS = [int(t) for t in os.environ.get("TOKENS", "64,96,128").split(",")]
SHAPES = [tuple(map(int, s.split("x"))) for s in
          os.environ.get("SHAPES", "4096x4096,4096x14336,14336x4096").split(",")]
# ONLY_VARIANTS=1: no XLA path and no default block sizes (experiments/kernel_variants_safe.sh
# runs one variant per process, so that one that hangs the GPU costs only its time limit)
ONLY_VARIANTS = os.environ.get("ONLY_VARIANTS") == "1"


def rel_err(out, ref):
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
for k, n in SHAPES:
    ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * 0.02 for i in range(4)]
    qs = [jq.quantize(w, "nf4", 64, axis=0, double_quant=True, check_finite=False) for w in ws]
    for m in TOKENS:
        xs = [jax.random.normal(jax.random.key(50 + i), (m, k), jnp.bfloat16) for i in range(4)]
        ref = jq.qmatmul(xs[0], qs[0], implementation="xla")
        bf16 = per_call_us(lambda x, w: x @ w, list(zip(xs, ws)))
        line = f"K={k:<5} N={n:<5} M={m:<3} bf16 {bf16:6.1f}"
        variants = [(v, fixed(v)) for v in VARIANTS]
        if not ONLY_VARIANTS:
            xla = per_call_us(lambda x, q: jq.qmatmul(x, q, implementation="xla"),
                              list(zip(xs, qs)))
            line += f" | xla {xla:6.1f} ({bf16 / xla:.2f}x)"
            variants.insert(0, ("default", lambda x, q: K.qmatmul(x, q)))
        for name, f in variants:
            try:
                err = rel_err(jax.jit(f)(xs[0], qs[0]), ref)
                if err > 1e-2 and " p" not in name:
                    raise AssertionError(f"wrong result: relative error {err:.1e}")
                us = per_call_us(f, list(zip(xs, qs)))
                line += f" | {name} {us:5.1f} ({bf16 / us:.2f}x)"
            except Exception as e:  # a variant that fails to compile is a finding
                line += f" | {name} failed: {type(e).__name__}: {str(e)[:60]}"
        print(line, flush=True)
