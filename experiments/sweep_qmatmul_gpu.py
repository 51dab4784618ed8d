"""Sweep the Hopper qmatmul kernel's block sizes on the GPU, next to the bf16 dot, the XLA path
and what auto picks.

    python3 experiments/sweep_qmatmul_gpu.py --shapes 4096x14336 --tokens 1,16 \\
        --variants "k256 s2 d32 c200;k128 s3 x1 w2 t128 d32"
    python3 experiments/sweep_qmatmul_gpu.py --shapes 576x1536,2048x8192 --tokens 1,16
    python3 experiments/sweep_qmatmul_gpu.py --isolate 120 --variants "..."   # one per process
Variants are ``gpu_timing.block_sizes`` strings, run exactly as given (``--fit``: fitted to
shared memory by the kernel, as auto's presets are). Each is checked against the XLA path on
fresh inputs first, then timed with CUPTI over 4 rotating weight sets (NF4 + DQ, block 64, bf16,
whole call). ``--isolate SECONDS`` runs each variant in its own process under that limit (printing only), so
one that hangs the GPU (four compute warpgroups did) costs only its limit. Prints a line per shape
and token count and writes experiments/results/sweep_qmatmul_<device>.json (device, JAX version,
commit). Under Nsight Compute, ``--iterations 1 --tokens 1 --shapes 4096x14336`` keeps it short.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
from gpu_timing import block_sizes, commit, per_call_us

import jaxquant as jq
from jaxquant._src.kernels import qmatmul_mgpu

RESULTS = pathlib.Path(__file__).parent / "results"


def rel_err(out, ref):
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def sweep(shapes, tokens, variants, fit, baselines, iterations):
    rows = []
    for k, n in shapes:
        ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * 0.02 for i in range(4)]
        qs = [jq.quantize(w, "nf4", 64, axis=0, double_quant=True, check_finite=False) for w in ws]
        for m in tokens:
            xs = [jax.random.normal(jax.random.key(50 + i), (m, k), jnp.bfloat16) for i in range(4)]
            ref = jq.qmatmul(xs[0], qs[0], implementation="xla")
            row, line = dict(k=k, n=n, m=m), f"K={k:<5} N={n:<5} M={m:<4}"
            timed = []
            if baselines:
                timed += [("bf16", lambda x, w: x @ w, ws),
                          ("xla", lambda x, q: jq.qmatmul(x, q, implementation="xla"), qs),
                          ("auto", lambda x, q: jq.qmatmul(x, q), qs),
                          ("kernel", lambda x, q: qmatmul_mgpu.qmatmul(x, q), qs)]
            for v in variants:
                bs = block_sizes(v, exact=not fit)
                run = lambda x, q, bs=bs: qmatmul_mgpu.qmatmul(x, q, block_sizes=bs)
                timed.append((v, run, qs))
            for name, f, weights in timed:
                try:
                    if name != "bf16":
                        err = rel_err(jax.jit(f)(xs[0], weights[0]), ref)
                        if err > 1e-2:
                            raise AssertionError(f"wrong result: relative error {err:.1e}")
                    row[name] = per_call_us(f, list(zip(xs, weights)), iterations)
                    ratio = f" ({row['bf16'] / row[name]:.2f}x)" if "bf16" in row else ""
                    line += f" | {name} {row[name]:6.1f}{ratio}"
                except Exception as e:  # a variant that fails to compile is a finding
                    row[name] = f"{type(e).__name__}: {str(e)[:200]}"
                    line += f" | {name} failed: {type(e).__name__}: {str(e)[:60]}"
            print(line, flush=True)
            rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096", help="KxN,...")
    p.add_argument("--tokens", default="1,16,64,128", help="M,...")
    p.add_argument("--variants", default="", help="block size variants, ';'-separated")
    p.add_argument("--fit", action="store_true", help="let the kernel fit steps and stages")
    p.add_argument("--no-baselines", action="store_true", help="only the variants")
    p.add_argument("--isolate", type=int, default=0, help="seconds per variant, own process")
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--no-json", action="store_true", help="print only")
    args = p.parse_args()
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, commit {commit()}", flush=True)
    if args.isolate:
        base = ["--shapes", args.shapes, "--tokens", args.tokens, "--iterations",
                str(args.iterations), "--no-json"] + (["--fit"] if args.fit else [])
        runs = [["--variants", ""]] + [["--variants", v, "--no-baselines"] for v in variants]
        for extra in runs:
            try:
                subprocess.run([sys.executable, __file__, *base, *extra], timeout=args.isolate)
            except subprocess.TimeoutExpired:
                print(f"variant {extra[1]!r} ran past {args.isolate} s (a hang?)", flush=True)
        return
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    rows = sweep(shapes, tokens, variants, args.fit, not args.no_baselines, args.iterations)
    if args.no_json:
        return
    dev = jax.devices()[0]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"sweep_qmatmul_{dev.device_kind.replace(' ', '_')}.json").write_text(json.dumps(
        dict(device=dev.device_kind, jax=jax.__version__, commit=commit(), fit=args.fit,
             rows=rows), indent=2))


if __name__ == "__main__":
    main()
