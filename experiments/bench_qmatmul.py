"""qmatmul on one GPU, side by side: jaxquant's auto (the Pallas kernel where it applies), its
XLA path, the bf16 dot in XLA and in torch, and, when importable, bitsandbytes and qwix.

    python3 experiments/bench_qmatmul.py [--quick] [--tokens 1,16,128,2048]
    (device: install the carried wheels first, e.g. pip install --no-deps --target .whl_cmp/site
    .whl_cmp/*.whl and PYTHONPATH=.:.whl_cmp/site; a column is left out if its library is not
    importable)
NF4 + double quant, block 64, bf16, at Llama-3-8B shapes; also FP4 and int4 at 4096x14336.
bitsandbytes 0.50.2: ``matmul_4bit`` on ``quantize_4bit(..., compress_statistics=True)``; qwix
0.1.8: weight-only PTQ of an ``nn.Dense`` (tile 64; nf4 and int4), on the same weights.
Timing as ANCHORS.md: each measured call cycles through 4 distinct weight sets (more bytes than
the L2). JAX: CUPTI kernel time of one jitted call over the sets. torch (bf16 and bitsandbytes):
the calls over the sets captured once in a CUDA graph, graph replays timed with CUDA events, so
Python launch overhead is not counted. Correctness first: every case compares auto with the
XLA path on the device (and bitsandbytes with it, for information); the run fails if auto is
off by more than 5e-3 (relative Frobenius norm). Prints a table with ratios and writes
experiments/results/bench_qmatmul_<device>.json with the device, versions and commit.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", ".5")  # leave torch room

import jax
import jax.numpy as jnp
import numpy as np
from gpu_timing import commit, per_call_us

import jaxquant as jq
from jaxquant._src.kernels import qmatmul_mgpu

SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096)]
TOKENS = [1, 16, 128, 512, 2048]
RESULTS = pathlib.Path(__file__).parent / "results"


def torch_graph_us(calls, replays=20, repeats=5):
    """Microseconds per call of the zero-argument ``calls`` (one per weight set), captured in
    one CUDA graph and replayed: the median of ``repeats`` timings of ``replays`` replays."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (workspaces, lazy init) outside the capture
        for _ in range(2):
            [c() for c in calls]
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        [c() for c in calls]
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / replays / len(calls))
    return statistics.median(times)


def to_torch(a):
    import torch

    return torch.from_numpy(np.asarray(a.astype(jnp.float32))).cuda().bfloat16()


def torch_columns(ws, xs, qtype, ref):
    """{torch_bf16_us, bnb_us, bnb_rel_err_vs_xla}; an entry is None where torch or
    bitsandbytes is not importable or the qtype is not bitsandbytes'."""
    out = dict(torch_bf16_us=None, bnb_us=None, bnb_rel_err_vs_xla=None)
    try:
        import torch
    except ImportError:
        return out
    with torch.inference_mode():
        wt, xt = [to_torch(w) for w in ws], [to_torch(x) for x in xs]
        out["torch_bf16_us"] = torch_graph_us([lambda x=x, w=w: x @ w for x, w in zip(xt, wt)])
        try:
            import bitsandbytes as bnb
        except ImportError:
            return out
        if qtype not in ("nf4", "fp4"):
            return out
        packed = [bnb.functional.quantize_4bit(w.t().contiguous(), blocksize=64, quant_type=qtype,
                                               compress_statistics=True) for w in wt]
        calls = [lambda x=x, p=p, st=st: bnb.matmul_4bit(x, p.t(), quant_state=st)
                 for x, (p, st) in zip(xt, packed)]
        y = calls[0]().float().cpu().numpy()
        out["bnb_rel_err_vs_xla"] = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
        out["bnb_us"] = torch_graph_us(calls)
    return out


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
    dense = nn.Dense(ws[0].shape[1], use_bias=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    rules = [qwix.QtRule(module_path=".*", weight_qtype=weight_qtype, tile_size=64)]
    model = qwix.quantize_model(dense, qwix.PtqProvider(rules))
    abstract = jax.eval_shape(model.init, jax.random.key(0), xs[0])["params"]
    params = [qwix.quantize_params({"kernel": w}, abstract) for w in ws]
    return per_call_us(lambda x, p: model.apply({"params": p}, x), list(zip(xs, params)))


def version(name):
    try:
        return __import__(name).__version__
    except ImportError:
        return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="4096x14336 only, NF4 only")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    args = p.parse_args()
    dev = jax.devices()[0]
    tokens = [int(t) for t in args.tokens.split(",")]
    shapes = SHAPES[:1] if args.quick else SHAPES
    cases = [(k, n, "nf4", m) for k, n in shapes for m in tokens]
    if not args.quick:
        cases += [(4096, 14336, qtype, m) for qtype in ("fp4", "int4") for m in (1, 16)]
    print(f"{dev.device_kind}, jax {jax.__version__}, torch {version('torch')}, bitsandbytes "
          f"{version('bitsandbytes')}, qwix {version('qwix')}, commit {commit()}", flush=True)
    rows, weights = [], {}  # only the current shape's weight sets stay alive
    for k, n, qtype, m in cases:
        if (k, n, qtype) not in weights:
            ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * 0.02
                  for i in range(4)]
            weights = {(k, n, qtype): (ws, [jq.quantize(w, qtype, 64, axis=0, double_quant=True,
                                                        check_finite=False) for w in ws])}
        ws, qs = weights[(k, n, qtype)]
        xs = [jax.random.normal(jax.random.key(100 + i), (m, k), jnp.bfloat16) for i in range(4)]
        ref = np.asarray(jq.qmatmul(xs[0], qs[0], implementation="xla").astype(jnp.float32))
        out = np.asarray(jq.qmatmul(xs[0], qs[0]).astype(jnp.float32))
        row = dict(k=k, n=n, m=m, qtype=qtype,
                   rel_err_vs_xla=float(np.linalg.norm(out - ref) / np.linalg.norm(ref)),
                   auto_uses=("kernel" if qmatmul_mgpu.can_use(xs[0], qs[0], jnp.bfloat16)
                              else "xla"))
        row["bf16_dot_us"] = per_call_us(lambda x, w: x @ w, list(zip(xs, ws)))
        row["xla_path_us"] = per_call_us(lambda x, q: jq.qmatmul(x, q, implementation="xla"),
                                         list(zip(xs, qs)))
        row["auto_us"] = per_call_us(lambda x, q: jq.qmatmul(x, q), list(zip(xs, qs)))
        row.update(torch_columns(ws, xs, qtype, ref))
        row["qwix_us"] = qwix_us(ws, xs, qtype)
        for col in ("bf16_dot", "torch_bf16", "xla_path", "bnb", "qwix"):
            us = row[f"{col}_us"]
            row[f"auto_vs_{col}"] = us / row["auto_us"] if us else None
        rows.append(row)
        others = "".join(f"  {col} {row[f'{col}_us']:6.1f} (x{row[f'auto_vs_{col}']:.2f})"
                         for col in ("torch_bf16", "bnb", "qwix") if row[f"{col}_us"])
        print(f"{k:>5}x{n:<5} {qtype} M={m:<4} auto {row['auto_us']:6.1f} us ({row['auto_uses']}, "
              f"err {row['rel_err_vs_xla']:.1e})  bf16 {row['bf16_dot_us']:6.1f} "
              f"(x{row['auto_vs_bf16_dot']:.2f})  xla path {row['xla_path_us']:6.1f} "
              f"(x{row['auto_vs_xla_path']:.2f}){others}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench_qmatmul_{dev.device_kind.replace(' ', '_')}.json"
    path.write_text(json.dumps(dict(
        device=dev.device_kind, jax=jax.__version__, torch=version("torch"),
        bitsandbytes=version("bitsandbytes"), qwix=version("qwix"), commit=commit(),
        timing="JAX: CUPTI; torch: CUDA-graph replay, CUDA events; 4 rotating weight sets",
        rows=rows), indent=2))
    print(f"(x: how many times faster auto is; written to {path})")
    worst = max(r["rel_err_vs_xla"] for r in rows)
    assert worst < 5e-3, f"auto is off the XLA path by {worst:.1e}"


if __name__ == "__main__":
    main()
