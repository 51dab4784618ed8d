"""Two warp-specialized CTAs on one SM hang the GPU (BUILD_NOTES, session 12): the default
configuration of SmolLM2's gate projection (K = 576, N = 1536) at 72 tokens, two compute
warpgroups using 107 KB of shared memory, with the kernel's floor (`WS_MIN_SMEM`, checked
against the XLA path) and, with NO_FLOOR=1, without it (run it under `timeout`: expected to
hang).

    PYTHONPATH=. python3 experiments/ws_smem_floor_gpu.py
    PYTHONPATH=. NO_FLOOR=1 timeout 60 python3 experiments/ws_smem_floor_gpu.py
"""

import os

import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant._src.kernels import qmatmul_mgpu as K

if os.environ.get("NO_FLOOR") == "1":
    K.WS_MIN_SMEM = 0
w = jax.random.normal(jax.random.key(0), (576, 1536), jnp.bfloat16) * 0.02
q = jq.quantize(w, "nf4", 64, axis=0, double_quant=True, check_finite=False)
x = jax.random.normal(jax.random.key(1), (72, 576), jnp.bfloat16)
print("block sizes:", K._check_supported(x, q, jnp.bfloat16), flush=True)
out = jax.block_until_ready(K.qmatmul(x, q)).astype(jnp.float32)
ref = jq.qmatmul(x, q, implementation="xla").astype(jnp.float32)
err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
print(f"floor {K.WS_MIN_SMEM // 1024} KB: ran, relative error vs XLA {err:.1e}", flush=True)
assert err < 1e-2
