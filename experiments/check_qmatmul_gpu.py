"""Kernel vs XLA path on the GPU: qtypes, double quant, awkward token counts, batch dims.

    PYTHONPATH=. python3 experiments/check_qmatmul_gpu.py
Fresh random weights (normal and heavy-tailed) and inputs per case; relative error of the kernel
against the XLA path (both bf16 compute, f32 accumulation), and auto's choice.
"""

import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from jaxquant._src.kernels import qmatmul_mgpu as K

rng = np.random.default_rng(7)
worst = 0.0
for qtype, dq, lead, k, n in [("nf4", True, (1,), 4096, 512), ("nf4", False, (3,), 1024, 192),
                              ("fp4", True, (17,), 2048, 320), ("int4", False, (2, 5), 512, 128),
                              ("nf4", True, (32,), 14336, 256), ("nf4", True, (2, 16), 768, 64),
                              ("nf4", True, (100,), 4096, 256), ("fp4", False, (2, 64), 1024, 128),
                              # many tokens: token tiles, the warp-specialized sizes, in-place output
                              ("nf4", True, (130,), 4096, 14336), ("fp4", True, (300,), 4096, 14336),
                              ("nf4", True, (2, 512), 4096, 4096), ("int4", False, (1024,), 14336, 4096),
                              ("nf4", False, (200,), 1024, 192),
                              # persistent CTAs (4 and 7 tiles each; the last token tile padding)
                              ("nf4", True, (1024,), 4096, 14336),
                              ("int4", False, (2, 1000), 4096, 14336),
                              # past 128 tokens on a narrow output: 128-token tiles, split-K
                              ("nf4", True, (300,), 2048, 1024),
                              # SmolLM2's K = 576: 64-element steps (the shared-memory decode)
                              ("nf4", True, (1,), 576, 1536), ("fp4", True, (40,), 576, 192)]:
    for heavy in (False, True):
        w = rng.standard_normal((k, n)).astype(np.float32) * 0.02
        if heavy:
            w *= np.where(rng.random((k, n)) < 0.01, 25.0, 1.0).astype(np.float32)
        q = jq.quantize(jnp.asarray(w, jnp.bfloat16), qtype, 64, axis=0, double_quant=dq)
        x = jnp.asarray(rng.standard_normal((*lead, k)), jnp.bfloat16)
        ref = jq.qmatmul(x, q, implementation="xla").astype(jnp.float32)
        out = jq.qmatmul(x, q, implementation="pallas").astype(jnp.float32)
        auto = jq.qmatmul(x, q).astype(jnp.float32)
        rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        worst = max(worst, rel)
        same_auto = bool(jnp.array_equal(auto, out))
        sizes = K._check_supported(x, q, jnp.bfloat16)
        tokens, _ = K._token_tiling(int(np.prod(lead)), sizes)
        _, splits, ctas = K._launch_grid(int(np.prod(lead)), k, n, sizes)
        print(f"{qtype:<5} dq={dq!s:<5} heavy={heavy!s:<5} x{lead}  K={k:<6} N={n:<5} rel err {rel:.1e}  "
              f"auto=kernel: {same_auto}  (warpgroups {sizes.compute_wgs}, token tile {tokens}, "
              f"tile_k {sizes.tile_k}, table copies {sizes.table_copies}, split-K {splits}, "
              f"persistent CTAs {ctas or '-'})", flush=True)
# the shared-memory decode at every step length (its code loads follow the 32/64/128-byte
# swizzle of the step's rows) and in fp16
for tile_k in (64, 128, 256):
    for dtype in (jnp.bfloat16, jnp.float16):
        for m in (1, 17):
            w = rng.standard_normal((2048, 384)).astype(np.float32) * 0.02
            q = jq.quantize(jnp.asarray(w, dtype), "nf4", 64, axis=0, double_quant=True)
            x = jnp.asarray(rng.standard_normal((m, 2048)), dtype)
            ref = jq.qmatmul(x, q, implementation="xla", compute_dtype=dtype).astype(jnp.float32)
            sizes = K.BlockSizes(tile_k=tile_k, max_concurrent_steps=2, table_copies=32)
            out = K.qmatmul(x, q, compute_dtype=dtype, block_sizes=sizes).astype(jnp.float32)
            rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
            worst = max(worst, rel)
            print(f"table decode tile_k {tile_k:<3} {jnp.dtype(dtype).name:<8} M={m:<3} "
                  f"rel err {rel:.1e}", flush=True)
assert worst < 5e-3, worst
print(f"worst relative error {worst:.1e} (bf16 operands, f32 accumulation)")
