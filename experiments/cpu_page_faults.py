"""Where CPU dequantize time goes: page faults on the fresh output, for jaxquant and bitsandbytes.

    .venv/bin/python experiments/cpu_page_faults.py --bnb-python /tmp/bnbenv/bin/python

NF4 + double quant, block 64, 4096x14336 float32 (235 MB out). Each library runs in its own
process: jaxquant as it is (`dequantize` writes large CPU outputs into huge pages, cpu_pages.py),
with that switched off (`JAXQUANT_HUGE_PAGES=0`: small pages) and with huge pages for all of
XLA's allocations (glibc's `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`); bitsandbytes with its
default small pages and with PyTorch's `THP_MEM_ALLOC_ENABLE=1` (environment variables that must
be set before the process starts). Reported
per call (median of 7): wall time, user and system CPU time (2 threads each) and minor page
faults. jaxquant is also timed into a reused buffer (`dequantize_into`), which faults on nothing.
Writes results/cpu_page_faults.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

RESULTS = pathlib.Path(__file__).parent / "results"

MEASURE = r"""
import json, resource, statistics, sys, time

def measure(f, sync, calls=7):
    rows = []
    for _ in range(calls + 1):
        r0 = resource.getrusage(resource.RUSAGE_SELF); t = time.perf_counter()
        y = f(); sync(y)
        wall = time.perf_counter() - t; r1 = resource.getrusage(resource.RUSAGE_SELF)
        rows.append((wall, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime,
                     r1.ru_minflt - r0.ru_minflt))
        del y
    rows = rows[1:]  # the first call compiles / warms up
    med = lambda i: statistics.median(r[i] for r in rows)
    return {"wall_ms": 1e3 * med(0), "user_ms": 1e3 * med(1), "sys_ms": 1e3 * med(2),
            "faults": med(3)}
"""

JAXQUANT = MEASURE + r"""
import jax, jax.numpy as jnp, jaxquant as jq
w = jax.random.normal(jax.random.key(0), (4096, 14336), jnp.float32)
q = jq.quantize(w, "nf4", 64, double_quant=True); jax.block_until_ready(q)
out = {"fresh": measure(lambda: jq.dequantize(q, jnp.float32), jax.block_until_ready)}
buffer = [jnp.zeros(q.shape, jnp.float32)]
def into():
    buffer[0] = jq.dequantize_into(q, buffer[0]); return buffer[0]
out["reused buffer"] = measure(into, jax.block_until_ready)
print(json.dumps(out))
"""

BITSANDBYTES = MEASURE + r"""
import torch, bitsandbytes.functional as F
torch.manual_seed(0)
w = torch.randn(4096, 14336)
packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
print(json.dumps({"fresh": measure(lambda: F.dequantize_4bit(packed, state), lambda y: None)}))
"""


def run(python: str, code: str, env: dict) -> dict:
    done = subprocess.run([python, "-c", code], env={**os.environ, **env}, capture_output=True,
                          text=True, check=True, cwd=pathlib.Path(__file__).parent.parent)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bnb-python", help="a Python with torch + bitsandbytes 0.50.2")
    args = p.parse_args()
    runs = {
        "jaxquant": (sys.executable, JAXQUANT, {}),
        "jaxquant, small pages": (sys.executable, JAXQUANT, {"JAXQUANT_HUGE_PAGES": "0"}),
        "jaxquant, glibc huge pages": (sys.executable, JAXQUANT,
                                       {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),
    }
    if args.bnb_python:
        runs["bitsandbytes, small pages"] = (args.bnb_python, BITSANDBYTES, {})
        runs["bitsandbytes, huge pages"] = (args.bnb_python, BITSANDBYTES, {"THP_MEM_ALLOC_ENABLE": "1"})
    results = {}
    print(f"{'run':28s} {'output':14s} {'wall ms':>8s} {'user ms':>8s} {'sys ms':>8s} {'faults':>8s}")
    for name, (python, code, env) in runs.items():
        results[name] = run(python, code, env)
        for output, r in results[name].items():
            print(f"{name:28s} {output:14s} {r['wall_ms']:8.1f} {r['user_ms']:8.1f} "
                  f"{r['sys_ms']:8.1f} {r['faults']:8.0f}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cpu_page_faults.json").write_text(json.dumps(
        {"shape": [4096, 14336], "qtype": "nf4 + double quant, block 64, float32 out",
         "cpus": os.cpu_count(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
