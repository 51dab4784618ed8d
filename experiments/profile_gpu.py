"""Where GPU time goes: every GPU kernel of a call, read with CUPTI and summed by name.

    python3 experiments/profile_gpu.py qmatmul [--shapes 4096x14336] [--tokens 1,16,2048] \\
        [--variants "k256 s2 d32 c200"]
    python3 experiments/profile_gpu.py quantize
    python3 experiments/profile_gpu.py decode       # SmolLM2-135M shapes, one decode step
    python3 experiments/profile_gpu.py generate [--shape llama-8b]
- qmatmul: one call (4 rotating weight sets, NF4 + DQ, block 64, bf16) through the bf16 dot, the
  XLA path, the kernel with its own block sizes and with each variant (``gpu_timing.block_sizes``,
  exact), per GPU kernel (the Mosaic kernel and XLA's glue: x's permutation, the split-K sum);
  and the floor for streaming the code bytes (an XLA reduction over them).
- quantize: ``jq.quantize`` of a 4096x14336 bf16 weight (NF4 with and without DQ, along axis 0),
  per kernel, with a one-pass copy for scale; bandwidth = bytes read + written over time.
- decode: one jitted decode step (KV cache, position 16, batch 1, random weights), float and
  NF4 + DQ: kernel count and time by kind, the step's wall time over 200 calls, and greedy
  generation tokens/s (64 tokens in a lax.scan); ``--xla-flags`` reruns it in a subprocess
  with each set of flags (XLA's command buffers widened to custom calls, and off).
- generate: every kernel of a whole ``generate`` call (Llama shapes, random weights, auto),
  summed by name, next to the call's wall time: run it on two trees to see what a change moved.
Prints only (these are for reading; bench_qmatmul.py and generate_speed.py write the numbers).
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from gpu_timing import block_sizes, commit, kernels_us

import jaxquant as jq
from jaxquant._src.kernels import qmatmul_mgpu


def show(label, times):
    parts = " | ".join(f"{name} {us:6.1f}"
                       for name, us in sorted(times.items(), key=lambda t: -t[1]))
    print(f"  {label:<22} total {sum(times.values()):7.1f} us = {parts}", flush=True)


def profile_qmatmul(args):
    variants = [v.strip() for v in args.variants.split(";") if v.strip()]
    for k, n in [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]:
        ws = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) * 0.02 for i in range(4)]
        qs = [jq.quantize(w, "nf4", 64, axis=0, double_quant=True, check_finite=False) for w in ws]
        words = [jax.lax.bitcast_convert_type(q.codes.reshape(n, k // 8, 4), jnp.int32) for q in qs]
        nbytes = qs[0].codes.nbytes
        floor = sum(kernels_us(lambda w: jnp.bitwise_xor.reduce(w, axis=1),
                               [(w,) for w in words]).values())
        print(f"K={k} N={n}: streaming the {nbytes / 1e6:.1f} MB of codes (XLA xor-reduce) "
              f"{floor:.1f} us = {nbytes / floor / 1e6:.2f} TB/s", flush=True)
        for m in [int(t) for t in args.tokens.split(",")]:
            xs = [jax.random.normal(jax.random.key(50 + i), (m, k), jnp.bfloat16) for i in range(4)]
            print(f" M={m}", flush=True)
            show("bf16 dot", kernels_us(lambda x, w: x @ w, list(zip(xs, ws))))
            show("xla path", kernels_us(lambda x, q: jq.qmatmul(x, q, implementation="xla"),
                                        list(zip(xs, qs))))
            show("kernel", kernels_us(lambda x, q: qmatmul_mgpu.qmatmul(x, q), list(zip(xs, qs))))
            for v in variants:
                bs = block_sizes(v)
                show(v, kernels_us(lambda x, q: qmatmul_mgpu.qmatmul(x, q, block_sizes=bs),
                                   list(zip(xs, qs))))


def profile_quantize(args):
    xs = [jax.random.normal(jax.random.key(i), (4096, 14336), jnp.bfloat16) for i in range(4)]
    variants = {
        "nf4": lambda x: jq.quantize(x, "nf4", 64, check_finite=False),
        "nf4 + dq": lambda x: jq.quantize(x, "nf4", 64, double_quant=True, check_finite=False),
        "nf4 axis=0 + dq": lambda x: jq.quantize(x, "nf4", 64, axis=0, double_quant=True,
                                                 check_finite=False),
        "copy x+1": lambda x: x + jnp.asarray(1, x.dtype),
    }
    for name, f in variants.items():
        times = kernels_us(f, [(x,) for x in xs])
        moved = xs[0].nbytes + jq.nbytes(jax.jit(f)(xs[0]))
        print(f"{name:<16} {moved / sum(times.values()) / 1e6:6.3f} TB/s", flush=True)
        show(name, times)


def _kind(name):
    for key in ("mosaic", "gemm", "gemv", "cutlass", "sm90", "fusion", "reduce", "loop", "input"):
        if key in name.lower():
            return key
    return name[:30]


def profile_decode(args):
    from jax.experimental.mosaic.gpu import profiler

    from jaxquant.models import llama, smollm2

    config = smollm2.LlamaConfig()
    prompt = jnp.arange(16, dtype=jnp.int32)[None] + 1000
    params = jax.jit(llama.Llama(config).init)(jax.random.key(0), prompt)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    model = llama.Llama(config, dtype=jnp.bfloat16)
    cache = llama.init_cache(config, 1, 64, jnp.bfloat16)
    _, cache = jax.jit(model.apply)(params, prompt, cache, 0)
    token = jnp.array([[1234]], jnp.int32)
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    quant = lambda p, t, c, s: jq.flax.apply(model, p, t, c, s, check=False)
    for label, fn, tree in [("float", model.apply, params),
                            ("nf4+dq", quant, jq.quantize_tree(params))]:
        step = jax.jit(lambda p, c, fn=fn: fn(p, token, c, 16)[0])
        jax.block_until_ready(step(tree, cache))
        _, kernels = profiler.measure(step, aggregate=False)(tree, cache)
        by_kind = collections.defaultdict(lambda: [0, 0.0])
        for name, ms in kernels:
            by_kind[_kind(name)][0] += 1
            by_kind[_kind(name)][1] += ms * 1e3
        t = time.perf_counter()
        for _ in range(200):
            out = step(tree, cache)
        jax.block_until_ready(out)
        wall = (time.perf_counter() - t) / 200 * 1e6
        gen = jax.jit(functools.partial(llama.generate, fn, steps=64, config=config,
                                        dtype=jnp.bfloat16))
        jax.block_until_ready(gen(tree, prompt))
        t = time.perf_counter()
        for _ in range(3):
            jax.block_until_ready(gen(tree, prompt))
        tok_s = 3 * 64 / (time.perf_counter() - t)
        parts = ", ".join(f"{k} {c}x {us:.0f}us"
                          for k, (c, us) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]))
        print(f"{label:<8} generate {tok_s:5.0f} tok/s | step wall {wall:6.0f} us | "
              f"{len(kernels)} kernels, {sum(v[1] for v in by_kind.values()):.0f} us | {parts}",
              flush=True)
    if args.xla_flags:
        for flags in ["--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN",
                      "--xla_gpu_enable_command_buffer="]:
            env = dict(os.environ, XLA_FLAGS=flags, XLA_PYTHON_CLIENT_MEM_FRACTION=".3")
            subprocess.run([sys.executable, __file__, "decode"], env=env, check=False)


def profile_generate(args):
    from generate_speed import SHAPES, random_params
    from jax.experimental.mosaic.gpu import profiler

    from jaxquant.models import llama

    config, dtype, steps = SHAPES[args.shape], jnp.bfloat16, 64
    prompt = jnp.arange(16, dtype=jnp.int32)[None] + 1000
    model = llama.Llama(config, dtype=dtype)
    tree = jq.quantize_tree(random_params(model, prompt, dtype))
    gen = jax.jit(functools.partial(
        llama.generate, lambda p, t, c, s: jq.flax.apply(model, p, t, c, s, check=False),
        steps=steps, config=config, dtype=dtype))
    jax.block_until_ready(gen(tree, prompt))
    t = time.perf_counter()
    jax.block_until_ready(gen(tree, prompt))
    wall_ms = (time.perf_counter() - t) * 1e3
    _, kernels = profiler.measure(gen, aggregate=False)(tree, prompt)
    by_name, count = collections.Counter(), collections.Counter()
    for name, ms in kernels:
        key = "mosaic qmatmul" if "mosaic" in name else name.split(".")[0][:40]
        by_name[key] += ms
        count[key] += 1
    print(f"{args.shape}: wall {wall_ms:.1f} ms for {steps} tokens ({steps / wall_ms * 1e3:.1f} "
          f"tok/s), kernels {sum(by_name.values()):.1f} ms in {len(kernels)} launches")
    for key, ms in by_name.most_common(15):
        print(f"  {key:<42} {ms:8.2f} ms  {count[key]:6d} x  {ms / count[key] * 1e3:7.2f} us")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    q = sub.add_parser("qmatmul")
    q.add_argument("--shapes", default="4096x14336,14336x4096,4096x4096")
    q.add_argument("--tokens", default="1,16,128,2048")
    q.add_argument("--variants", default="")
    sub.add_parser("quantize")
    d = sub.add_parser("decode")
    d.add_argument("--xla-flags", action="store_true", help="also with other XLA_FLAGS")
    g = sub.add_parser("generate")
    g.add_argument("--shape", default="llama-8b")
    args = p.parse_args()
    if args.what == "decode" and args.xla_flags:  # room for the subprocesses
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", ".3")
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, commit {commit()}", flush=True)
    dict(qmatmul=profile_qmatmul, quantize=profile_quantize, decode=profile_decode,
         generate=profile_generate)[args.what](args)


if __name__ == "__main__":
    main()
