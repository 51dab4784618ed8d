"""Run the qmatmul kernel a few times (4096x14336, NF4 + DQ; M=1 unless TOKENS=..., block sizes
as in kernel_tokens_gpu.py from VARIANT="k128 s2 x1 w2 t256") for Nsight Compute.

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats \\
        --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \\
        -k regex:mosaic -c 1 python3 experiments/ncu_qmatmul_once.py
"""

import os

import jax
import jax.numpy as jnp

import jaxquant as jq
from gpu_timing import block_sizes
from jaxquant._src.kernels import qmatmul_mgpu as K

w = jax.random.normal(jax.random.key(0), (4096, 14336), jnp.bfloat16) * 0.02
q = jq.quantize(w, "nf4", 64, axis=0, double_quant=True, check_finite=False)
x = jax.random.normal(jax.random.key(1), (int(os.environ.get("TOKENS", 1)), 4096), jnp.bfloat16)
variant = os.environ.get("VARIANT", "")
bs = block_sizes(variant)
if variant:  # exactly these block sizes, the kernel's own fitting bypassed
    K._fit_tile_k, K._fit_stages = (lambda k, b, bs, m: bs), (lambda bs, m: bs)
f = jax.jit(lambda x, q: K.qmatmul(x, q, block_sizes=bs))
for _ in range(3):
    jax.block_until_ready(f(x, q))
