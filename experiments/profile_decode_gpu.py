"""Where a SmolLM2-135M decode step spends its time on the GPU, float vs quantized (batch 1, bf16).

    PYTHONPATH=. python3 experiments/profile_decode_gpu.py
Random weights with the real shapes; one jitted decode step (KV cache, position 16) profiled
with CUPTI: kernel count and summed kernel time per kernel kind, the wall time of the step in a
loop of 200 calls, and greedy generation tokens/s (64 tokens in a lax.scan, as
generate_speed.py). Variants: the quantized model with the kernel's split-K forced to 1 for
decode (no partial-sum fusion after each kernel), and XLA_FLAGS (each set by re-running this
script in a subprocess): XLA's command buffers (CUDA graphs) widened to custom calls, and off.
"""

import collections
import functools
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", ".3")  # room for the subprocesses
import jaxquant as jq
from jaxquant._src.kernels import qmatmul_mgpu as K
from jaxquant.models import llama, smollm2

config = smollm2.LlamaConfig()
prompt = jnp.arange(16, dtype=jnp.int32)[None] + 1000
params = jax.jit(llama.Llama(config).init)(jax.random.key(0), prompt)
params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
model = llama.Llama(config, dtype=jnp.bfloat16)
cache = llama.init_cache(config, 1, 64, jnp.bfloat16)
_, cache = jax.jit(model.apply)(params, prompt, cache, 0)
token = jnp.array([[1234]], jnp.int32)


def kind(name):
    for key in ("mosaic", "gemm", "gemv", "cutlass", "sm90", "fusion", "reduce", "loop", "input"):
        if key in name.lower():
            return key
    return name[:30]


def profile(label, fn, tree):
    step = jax.jit(lambda p, c: fn(p, token, c, 16)[0])
    jax.block_until_ready(step(tree, cache))
    _, kernels = profiler.measure(step, aggregate=False)(tree, cache)
    by_kind = collections.defaultdict(lambda: [0, 0.0])
    for name, ms in kernels:
        by_kind[kind(name)][0] += 1
        by_kind[kind(name)][1] += ms * 1e3
    t = time.perf_counter()
    for _ in range(200):
        out = step(tree, cache)
    jax.block_until_ready(out)
    wall = (time.perf_counter() - t) / 200 * 1e6
    total = sum(v[1] for v in by_kind.values())
    parts = ", ".join(f"{k} {n}x {us:.0f}us" for k, (n, us) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]))
    gen = jax.jit(functools.partial(llama.generate, fn, steps=64, config=config, dtype=jnp.bfloat16))
    jax.block_until_ready(gen(tree, prompt))
    t = time.perf_counter()
    for _ in range(3):
        jax.block_until_ready(gen(tree, prompt))
    tok_s = 3 * 64 / (time.perf_counter() - t)
    print(f"{label:<28} generate {tok_s:5.0f} tok/s | step wall {wall:6.0f} us | {len(kernels)} kernels, "
          f"{total:.0f} us | {parts}", flush=True)


qparams = jq.quantize_tree(params)
float_fn = model.apply
quant_fn = lambda p, t, c, s: jq.flax.apply(model, p, t, c, s, check=False)
flags = os.environ.get("XLA_FLAGS", "")
print(f"XLA_FLAGS={flags!r}", flush=True)
profile("float", float_fn, params)
profile("nf4+dq", quant_fn, qparams)
if not flags:
    splits = K._k_splits
    K._k_splits = lambda k, n, m_pad, bs: 1 if m_pad <= 8 else splits(k, n, m_pad, bs)
    jax.clear_caches()  # K.qmatmul's jit cache holds the traces with the default split
    profile("nf4+dq, split-K 1 at M<=8", quant_fn, qparams)
    K._k_splits = splits
    # (--legacy_command_buffer_custom_call_targets=mosaic_gpu_v2, the workaround for Pallas
    # Triton calls in jax-ml/jax#27988, is an unknown flag in JAX 0.11.2's XLA)
    for extra in ["--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN",
                  "--xla_gpu_enable_command_buffer="]:
        env = dict(os.environ, XLA_FLAGS=extra, XLA_PYTHON_CLIENT_MEM_FRACTION=".3")
        subprocess.run([sys.executable, __file__], env=env, check=False)
