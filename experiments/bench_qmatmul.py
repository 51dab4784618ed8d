"""qmatmul on one GPU: the Pallas kernel vs the XLA bf16 dot and XLA dequantize-then-dot.

NF4 + double quant, block 64, bf16; also FP4 and int4 at 4096x14336. qwix and bitsandbytes are
not installed on the device (torch alone exceeds what a device call carries): no columns.

    PYTHONPATH=. python3 experiments/bench_qmatmul.py [--quick]
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
import statistics

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler

import jaxquant as jq
from jaxquant._src.kernels import qmatmul_mgpu

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
TOKENS = [1, 4, 16, 32, 64, 128, 512, 2048]
RESULTS = pathlib.Path(__file__).parent / "results"


def per_call_us(f, sets, iterations=10):
    run_all = jax.jit(lambda sets: [f(*a) for a in sets])
    jax.block_until_ready(run_all(sets))
    _, times_ms = profiler.measure(run_all, iterations=iterations)(sets)
    return statistics.median(times_ms) / len(sets) * 1e3


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
        nbytes = jq.nbytes(qs[0]) + xs[0].nbytes + m * n * 2
        row["hbm_tb_s"] = nbytes / row["kernel_us"] / 1e6
        rows.append(row)
        print(f"K={k:<6} N={n:<6} {qtype:<4} M={m:<4} err={rel:.1e} bf16 {row['bf16_dot_us']:7.1f} us  "
              f"xla {row['xla_nf4_us']:7.1f}  auto {row['kernel_us']:7.1f}  "
              f"x{row['speedup_vs_bf16']:.2f} vs bf16  x{row['speedup_vs_xla_nf4']:.2f} vs xla  "
              f"{row['hbm_tb_s']:.2f} TB/s  auto={used}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    name = dev.device_kind.replace(" ", "_")
    (RESULTS / f"bench_qmatmul_{name}.json").write_text(json.dumps(dict(
        device=dev.device_kind, jax=jax.__version__, commit=os.environ.get("JAXQUANT_COMMIT", "?"),
        rows=rows), indent=2))


if __name__ == "__main__":
    main()
