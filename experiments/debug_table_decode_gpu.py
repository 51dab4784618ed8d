"""Debugging the shared-memory decode on the GPU: one-hot tokens (token i = e_{k_i}) make row i
of the kernel's output the dequantized weight row k_i, so a misplaced or missing weight shows
which k the operand actually held."""

import os

import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from jaxquant._src.kernels import qmatmul_mgpu as K

rng = np.random.default_rng(0)
k, n = 512, 64
w = rng.standard_normal((k, n)).astype(np.float32)
q = jq.quantize(jnp.asarray(w, jnp.bfloat16), "nf4", 64, axis=0, double_quant=False)
dense = np.asarray(jq.dequantize(q), np.float32)  # (k, n)
ks = np.array([0, 1, 2, 3, 8, 9, 16, 17, 63, 64, 65, 127, 255, 256, 300, 511])
x = np.zeros((16, k), np.float32)
x[np.arange(16), ks] = 1
SIZES = [K.BlockSizes(table_copies=32, max_concurrent_steps=2, k_splits=1),
         K.BlockSizes(table_copies=32, max_concurrent_steps=2, k_splits=1, probe="tablefirst"),
         K.BlockSizes(max_concurrent_steps=2, k_splits=1)]
for sizes in SIZES[:int(os.environ.get("CONFIGS", "3"))]:
    out = np.asarray(K.qmatmul(jnp.asarray(x, jnp.bfloat16), q, block_sizes=sizes), np.float32)
    print(sizes, "all zero:", bool((out == 0).all()), "nan:", bool(np.isnan(out).any()))
    for i, kk in enumerate(ks):
        match = [int(j) for j in np.flatnonzero(np.abs(dense - out[i]).max(1) < 1e-2 * np.abs(out[i]).max() + 1e-6)]
        print(f"  token {i} = e_{kk}: out[0:4] {np.round(out[i, :4], 3)} want {np.round(dense[kk, :4], 3)}"
              f"  rows of W it matches: {match[:6]}")
