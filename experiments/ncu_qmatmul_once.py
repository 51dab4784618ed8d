"""Run the qmatmul kernel a few times (4096x14336, M=1, NF4 + DQ) for Nsight Compute.

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats \\
        --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \\
        -k regex:mosaic -c 1 python3 experiments/ncu_qmatmul_once.py
"""

import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant._src.kernels import qmatmul_mgpu as K

w = jax.random.normal(jax.random.key(0), (4096, 14336), jnp.bfloat16) * 0.02
q = jq.quantize(w, "nf4", 64, axis=0, double_quant=True, check_finite=False)
x = jax.random.normal(jax.random.key(1), (1, 4096), jnp.bfloat16)
f = jax.jit(lambda x, q: K.qmatmul(x, q))
for _ in range(3):
    jax.block_until_ready(f(x, q))
