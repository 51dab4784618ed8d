"""qmatmul on one GPU: the Pallas kernel vs the XLA bf16 dot and XLA dequantize-then-dot.

NF4 + double quant, block 64, bf16; also FP4 and int4 at 4096x14336. When importable, also qwix
0.1.8 (weight-only PTQ of an `nn.Dense`, tile 64; nf4 and int4) and bitsandbytes 0.50.2
(`matmul_4bit` on `quantize_4bit(..., compress_statistics=True)`, the torch on the device; nf4
and fp4), timed on the same weights (bitsandbytes with CUDA events over the same rotation).

    PYTHONPATH=. python3 experiments/bench_qmatmul.py [--quick]
    (device: carry the qwix and bitsandbytes wheels and install them with --no-deps --target)
Prints microseconds and ratios, and writes experiments/results/bench_qmatmul_<device>.json with
the device, JAX version and commit. Kernel time is read with CUPTI; each measured call cycles
through distinct weight sets (more bytes than the 50 MB L2), as ANCHORS.md was measured.
Correctness: every kernel result is compared with the XLA path on the device first.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", ".5")  # leave torch room for bitsandbytes

import jax
import jax.numpy as jnp
import numpy as np
from gpu_timing import per_call_us

import jaxquant as jq
from jaxquant._src.kernels import qmatmul_mgpu

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
TOKENS = [1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048]
RESULTS = pathlib.Path(__file__).parent / "results"


def qwix_us(ws, xs, qtype):
    """qwix's weight-only PTQ ``nn.Dense`` (it dequantizes through XLA), or None."""
    try:
        import flax.linen as nn
        import qwix
    except ImportError:
        return None
    weight_qtype = {"nf4": "nf4", "int4": jnp.int4}.get(qtype)
    if weight_qtype is None:
        return None
    n = ws[0].shape[1]
    dense = nn.Dense(n, use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    rules = [qwix.QtRule(module_path=".*", weight_qtype=weight_qtype, tile_size=64)]
    model = qwix.quantize_model(dense, qwix.PtqProvider(rules))
    abstract = jax.eval_shape(model.init, jax.random.key(0), xs[0])["params"]
    params = [qwix.quantize_params({"kernel": w}, abstract) for w in ws]
    return per_call_us(lambda x, p: model.apply({"params": p}, x), list(zip(xs, params)))


def bnb_us(ws, xs, qtype, iterations=20):
    """bitsandbytes' ``matmul_4bit`` (NF4/FP4, double-quantized absmax), or None."""
    try:
        import bitsandbytes as bnb
        import torch
    except ImportError:
        return None
    if qtype not in ("nf4", "fp4"):
        return None
    to_torch = lambda a: torch.from_numpy(np.asarray(a.astype(jnp.float32))).cuda().bfloat16()
    packed = [bnb.functional.quantize_4bit(to_torch(w).t().contiguous(), blocksize=64,
                                           quant_type=qtype, compress_statistics=True) for w in ws]
    xt = [to_torch(x) for x in xs]
    run = lambda: [bnb.matmul_4bit(x, p.t(), quant_state=st) for x, (p, st) in zip(xt, packed)]
    with torch.inference_mode():
        run()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            run()
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iterations / len(ws)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="one shape")
    args = p.parse_args()
    dev = jax.devices()[0]
    rows = []
    shapes = SHAPES[:1] if args.quick else SHAPES
    cases = [(k, n, "nf4", m) for k, n in shapes for m in TOKENS]
    if not args.quick:
        cases += [(4096, 14336, qtype, m) for qtype in ("fp4", "int4") for m in (1, 16)]
    weights = {}  # only the current shape's weight sets stay alive
    for k, n, qtype, m in cases:
        if (k, n, qtype) not in weights:
            ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * 0.02 for i in range(4)]
            weights = {(k, n, qtype): (ws, [jq.quantize(w, qtype, 64, axis=0, double_quant=True,
                                                        check_finite=False) for w in ws])}
        ws, qs = weights[(k, n, qtype)]
        xs = [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.bfloat16) for i in range(4)]
        ref = jq.qmatmul(xs[0], qs[0], implementation="xla").astype(jnp.float32)
        out = jq.qmatmul(xs[0], qs[0]).astype(jnp.float32)
        rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
        used = "kernel" if qmatmul_mgpu.can_use(xs[0], qs[0], jnp.bfloat16) else "xla"
        row = dict(k=k, n=n, m=m, qtype=qtype, rel_err_vs_xla=rel, auto_uses=used)
        row["bf16_dot_us"] = per_call_us(lambda x, w: x @ w, list(zip(xs, ws)))
        row["xla_nf4_us"] = per_call_us(lambda x, q: jq.qmatmul(x, q, implementation="xla"), list(zip(xs, qs)))
        row["kernel_us"] = per_call_us(lambda x, q: jq.qmatmul(x, q), list(zip(xs, qs)))
        row["speedup_vs_bf16"] = row["bf16_dot_us"] / row["kernel_us"]
        row["speedup_vs_xla_nf4"] = row["xla_nf4_us"] / row["kernel_us"]
        for lib, timer in (("qwix", qwix_us), ("bnb", bnb_us)):
            us = timer(ws, xs, qtype)
            row[f"{lib}_us"] = us
            row[f"speedup_vs_{lib}"] = us / row["kernel_us"] if us else None
        nbytes = jq.nbytes(qs[0]) + xs[0].nbytes + m * n * 2
        row["hbm_tb_s"] = nbytes / row["kernel_us"] / 1e6
        rows.append(row)
        print(f"K={k:<6} N={n:<6} {qtype:<4} M={m:<4} err={rel:.1e} bf16 {row['bf16_dot_us']:7.1f} us  "
              f"xla {row['xla_nf4_us']:7.1f}  auto {row['kernel_us']:7.1f}  "
              f"x{row['speedup_vs_bf16']:.2f} vs bf16  x{row['speedup_vs_xla_nf4']:.2f} vs xla  "
              f"{row['hbm_tb_s']:.2f} TB/s  auto={used}" + "".join(
                  f"  {lib} {row[f'{lib}_us']:.1f} (x{row[f'speedup_vs_{lib}']:.2f})"
                  for lib in ("qwix", "bnb") if row[f"{lib}_us"]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    name = dev.device_kind.replace(" ", "_")
    (RESULTS / f"bench_qmatmul_{name}.json").write_text(json.dumps(dict(
        device=dev.device_kind, jax=jax.__version__, commit=os.environ.get("JAXQUANT_COMMIT", "?"),
        rows=rows), indent=2))


if __name__ == "__main__":
    main()
