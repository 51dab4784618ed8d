"""Quantize / dequantize throughput: jaxquant vs bitsandbytes (CPU), and bandwidth on a GPU.

One run on one device prints a table and writes experiments/results/bench_quantize_<platform>.json
with the device, JAX version and commit.

    .venv/bin/python experiments/bench_quantize.py --bnb-python /tmp/bnbenv/bin/python   # CPU
    python3 experiments/bench_quantize.py                                                 # GPU

On CPU the shapes are float32 (ANCHORS.md's bitsandbytes CPU figures), and dequantize is timed
twice: into a fresh buffer (`jq.dequantize`) and into a reused, donated one (`jq.dequantize_into`;
bitsandbytes' CPU build raises NotImplementedError for `dequantize_4bit(..., out=)`, so it is timed
into fresh memory only). bitsandbytes runs in its own interpreter (it needs torch, which installs on Python 3.11 here) in a subprocess of this run.
On a GPU the input is bfloat16, and throughput is bytes read + written over time, against a
device-to-device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
from gpu_timing import per_call_us

import jaxquant as jq

SHAPES = [(4096, 4096), (4096, 14336)]
RESULTS = pathlib.Path(__file__).parent / "results"

BNB_SNIPPET = r"""
import json, sys, time, torch, bitsandbytes.functional as F
torch.manual_seed(0)
out = {}
for k, n in json.loads(sys.argv[1]):
    x = torch.randn(k, n)
    def q(): return F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, state = q()
    def d(): return F.dequantize_4bit(packed, state)
    for name, f in (("quantize", q), ("dequantize", d)):
        f(); ts = []
        for _ in range(5):
            t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
        out[f"{name} {k}x{n}"] = sorted(ts)[len(ts) // 2]
print(json.dumps(out))
"""


def commit() -> str:
    """JAXQUANT_COMMIT if set (the device's copy of the tree has a stale git HEAD), else git's."""
    if os.environ.get("JAXQUANT_COMMIT"):
        return os.environ["JAXQUANT_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=pathlib.Path(__file__).parent).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def median_seconds(f, *args, reps=7):
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def into_seconds(q, reps=7):
    """Median time of jq.dequantize_into(q, buffer), the buffer handed back each call (reused)."""
    buffer = jq.dequantize_into(q, jnp.zeros(q.shape, q.dtype))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        buffer = jax.block_until_ready(jq.dequantize_into(q, buffer))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def gpu_seconds(f, args_list):
    """Kernel time per call read with CUPTI, cycling distinct inputs so that they never sit in L2."""
    return per_call_us(f, args_list) / 1e6


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bnb-python", help="a Python with torch + bitsandbytes 0.50.2 (CPU comparison)")
    args = p.parse_args()
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    quant = jax.jit(lambda x: jq.quantize(x, "nf4", 64, double_quant=True, check_finite=False))
    deq = jq.dequantize  # as users call it: a fresh output each call
    rows = []
    for k, n in SHAPES:
        sets = [jax.random.normal(jax.random.key(i), (k, n), dtype) for i in range(4 if on_gpu else 1)]
        qs = [quant(x) for x in sets]
        # correctness on the device: dequantize(quantize(x)) within NF4's error, codes = reference
        err = float(jnp.abs(deq(qs[0]).astype(jnp.float32) - sets[0].astype(jnp.float32)).mean())
        assert 0.06 < err < 0.09, err
        if on_gpu:  # the same codes as the CPU computes
            on_cpu = jax.device_put(np.asarray(sets[0]), jax.devices("cpu")[0])
            ref_codes = np.asarray(jq.quantize(on_cpu, "nf4", 64, double_quant=True).codes)
            assert np.array_equal(np.asarray(qs[0].codes), ref_codes), "GPU codes differ from CPU"
        timer = (lambda f, xs: gpu_seconds(f, [(x,) for x in xs])) if on_gpu else (lambda f, xs: median_seconds(f, xs[0]))
        tq, td = timer(quant, sets), timer(deq, qs)
        in_bytes, q_bytes = sets[0].nbytes, jq.nbytes(qs[0])
        row = dict(shape=f"{k}x{n}", dtype=np.dtype(dtype).name, quantize_s=tq, dequantize_s=td,
                   quantize_mparam_s=k * n / tq / 1e6, dequantize_mparam_s=k * n / td / 1e6,
                   quantize_tb_s=(in_bytes + q_bytes) / tq / 1e12,
                   dequantize_tb_s=(in_bytes + q_bytes) / td / 1e12, mean_abs_err=err)
        if on_gpu:
            copy = jax.jit(lambda x: x + jnp.asarray(1, x.dtype))  # read + write, one pass
            tc = gpu_seconds(copy, [(x,) for x in sets])
            row["copy_tb_s"] = 2 * in_bytes / tc / 1e12
            row["quantize_vs_copy"] = row["quantize_tb_s"] / row["copy_tb_s"]
        else:  # into a reused buffer: no page faults on fresh memory (bitsandbytes' CPU build has no out=)
            row["dequantize_into_s"] = into_seconds(qs[0])
            row["dequantize_into_mparam_s"] = k * n / row["dequantize_into_s"] / 1e6
        rows.append(row)
    bnb = {}
    if args.bnb_python:
        out = subprocess.check_output([args.bnb_python, "-c", BNB_SNIPPET, json.dumps(SHAPES)], text=True,
                                      stderr=subprocess.DEVNULL)
        bnb = json.loads(out.strip().splitlines()[-1])
        for r in rows:
            r["bnb_quantize_s"], r["bnb_dequantize_s"] = bnb[f"quantize {r['shape']}"], bnb[f"dequantize {r['shape']}"]
            r["quantize_speedup_vs_bnb"] = r["bnb_quantize_s"] / r["quantize_s"]
            r["dequantize_speedup_vs_bnb"] = r["bnb_dequantize_s"] / r["dequantize_s"]
            r["dequantize_into_speedup_vs_bnb"] = r["bnb_dequantize_s"] / r["dequantize_into_s"]
    print(f"device: {dev.device_kind} ({dev.platform}), JAX {jax.__version__}, commit {commit()}")
    print("NF4 + double quant, block 64, input", np.dtype(dtype).name)
    head = f"{'shape':<11} {'quant Mp/s':>10} {'dequant Mp/s':>12} {'quant TB/s':>10} {'deq TB/s':>9}"
    head += f" {'into Mp/s':>9}" if not on_gpu else ""
    head += f" {'q vs bnb':>9} {'dq vs bnb':>9} {'into vs bnb':>11}" if bnb else ""
    head += f" {'copy TB/s':>9} {'q/copy':>7}" if on_gpu else ""
    print(head)
    for r in rows:
        line = (f"{r['shape']:<11} {r['quantize_mparam_s']:>10.0f} {r['dequantize_mparam_s']:>12.0f} "
                f"{r['quantize_tb_s']:>10.3f} {r['dequantize_tb_s']:>9.3f}")
        if not on_gpu:
            line += f" {r['dequantize_into_mparam_s']:>9.0f}"
        if bnb:
            line += (f" {r['quantize_speedup_vs_bnb']:>8.2f}x {r['dequantize_speedup_vs_bnb']:>8.2f}x"
                     f" {r['dequantize_into_speedup_vs_bnb']:>10.2f}x")
        if on_gpu:
            line += f" {r['copy_tb_s']:>9.3f} {r['quantize_vs_copy']:>7.2f}"
        print(line)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench_quantize_{dev.platform}.json"
    out.write_text(json.dumps(dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                                   commit=commit(), rows=rows), indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
