"""Beyond one GPU: tensor-parallel decode and a data-parallel QLoRA step over 1, 2, 4, ... devices.

    PYTHONPATH=. python3 experiments/bench_multi_gpu.py --shape llama-8b --devices 1,2,4
    PYTHONPATH=. python3 experiments/bench_multi_gpu.py --shape llama-70b --devices 2,4 --no-train
    XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=. python3 \\
        experiments/bench_multi_gpu.py --shape tiny --devices 1,2,4 --steps 4 --seq 32   # CPU smoke

Decode (per device count n, mesh axis "model" over the first n devices): random weights with the
shape's real sizes, each leaf drawn directly into its Megatron shards (`hf.tensor_parallel`:
q/k/v/gate/up and the head split along their outputs, o/down along their inputs), bf16 and NF4 +
DQ (each sharded leaf quantized where it lies, leaf by leaf; float32 instead of bf16 on CPU), greedy `llama.generate` at each
`--batches` size: tokens/s = batch * steps / best of 3 calls (prefill included). bf16 is skipped
where its shards would not fit one device. With several GPUs the NF4 matmuls run the Hopper kernel
per shard (`matmul_sharded.py`).

QLoRA step (mesh axis "data" over n devices; `--no-train` skips it): the NF4 + DQ base split
along its output axis over the devices (FSDP-style: XLA gathers what a layer needs), adapters
(rank 16 on every projection) replicated, `--per-device-batch` sequences of `--seq` tokens per
device, AdamW, remat per block, chunked loss. Scaling efficiency = tok/s(n) / (n * tok/s(1)).
Writes experiments/results/bench_multi_gpu_<platform>_<shape>.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's jaxquant
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jaxquant as jq  # noqa: E402
from generate_speed import PROMPT_LEN, SHAPES, abstract_params, git_commit, is_q  # noqa: E402
from jaxquant.models import hf, llama  # noqa: E402
from jaxquant._src.tree import path_str  # noqa: E402


def sharded_tree(model, mesh, spec_of, dtype, quantize: bool):
    """Random weights drawn leaf by leaf into their shards; quantized there (NF4 + DQ) if asked."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params(model, jnp.zeros((1, 16), jnp.int32), dtype))
    out = []
    for i, (path, x) in enumerate(leaves):
        sharding = NamedSharding(mesh, spec_of(path_str(path)) if len(x.shape) > 1 else P())
        draw = jax.jit(functools.partial(_draw, shape=x.shape, dtype=dtype), out_shardings=sharding)
        leaf = draw(jax.random.key(i))
        if quantize:
            tree = leaf
            for key in reversed(path):
                tree = {key.key: tree}
            leaf = jax.tree.leaves(jq.quantize_tree(tree, donate=True), is_leaf=is_q)[0]
        out.append(jax.block_until_ready(leaf))
    return jax.tree.unflatten(treedef, out)


def _draw(key, shape, dtype):
    if len(shape) < 2:
        return jnp.ones(shape, dtype)
    return jax.random.normal(key, shape, dtype) * jnp.asarray(0.02, dtype)


def best_of_3(fn, *args):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return min(times)


def decode_rows(config, dtype, devices, batches, steps, fits):
    rows = []
    for n in devices:
        mesh = Mesh(np.array(jax.devices()[:n]), ("model",))
        model = llama.Llama(config, dtype=dtype)
        for name, quantize in [(jnp.dtype(dtype).name, False), ("nf4+dq", True)]:
            if not quantize and not fits(n):
                print(f"decode {name} over {n}: skipped (shards larger than a device)", flush=True)
                continue
            tree = sharded_tree(model, mesh, hf.tensor_parallel, dtype, quantize)
            apply = (lambda p, t, c, s: jq.flax.apply(model, p, t, c, s, check=False)) if quantize else (
                lambda p, t, c, s: model.apply(p, t, c, s))
            gen = jax.jit(functools.partial(llama.generate, apply, steps=steps, config=config, dtype=dtype))
            for batch in batches:
                prompt = ((1000 + jnp.arange(PROMPT_LEN)[None] + 7 * jnp.arange(batch)[:, None])
                          % config.vocab_size).astype(jnp.int32)
                seconds = best_of_3(gen, tree, prompt)
                rows.append(dict(kind="decode", model=name, devices=n, batch=batch, steps=steps,
                                 tokens_per_s=round(batch * steps / seconds, 2), bytes=jq.nbytes(tree)))
                print(rows[-1], flush=True)
            del tree
    return rows


def train_rows(config, dtype, devices, per_device_batch, seq):
    import optax
    rows = []
    for n in devices:
        mesh = Mesh(np.array(jax.devices()[:n]), ("data",))
        model = llama.Llama(config, dtype=dtype, remat=True)
        base = sharded_tree(model, mesh, lambda path: P(None, "data"), dtype, quantize=True)  # FSDP-style
        adapters = jax.device_put(jq.lora.init(jax.random.key(1), base, rank=16, alpha=32.0),
                                  NamedSharding(mesh, P()))
        tokens = jax.device_put(jax.random.randint(jax.random.key(2), (per_device_batch * n, seq), 0,
                                                   config.vocab_size), NamedSharding(mesh, P("data", None)))
        targets = llama.next_token_targets(tokens)
        opt = optax.adamw(1e-4)
        state = opt.init(adapters)

        @jax.jit
        def step(ad, state, q):
            loss = lambda ad: jq.lora.apply(model, q, tokens, targets=targets, adapters=ad, check=False)
            value, g = jax.value_and_grad(loss)(ad)
            updates, state = opt.update(g, state, ad)
            return optax.apply_updates(ad, updates), state, value

        seconds = best_of_3(step, adapters, state, base)
        rows.append(dict(kind="qlora_step", devices=n, batch=per_device_batch * n, seq=seq,
                         step_s=round(seconds, 4), tokens_per_s=round(per_device_batch * n * seq / seconds, 1)))
        one = next((r for r in rows if r["devices"] == devices[0]), rows[-1])
        rows[-1]["scaling_efficiency"] = round(rows[-1]["tokens_per_s"] / (one["tokens_per_s"] * n / devices[0]), 3)
        print(rows[-1], flush=True)
        del base
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=[s for s in SHAPES if s != "smollm2"], default="llama-8b")
    p.add_argument("--devices", default="1,2,4", help="device counts, comma-separated")
    p.add_argument("--batches", default="1,16", help="decode batch sizes")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--seq", type=int, default=1024, help="QLoRA sequence length")
    p.add_argument("--per-device-batch", type=int, default=1)
    p.add_argument("--no-train", action="store_true")
    args = p.parse_args()
    devices = [int(n) for n in args.devices.split(",")]
    if max(devices) > len(jax.devices()):
        raise SystemExit(f"--devices {args.devices}: this process has {len(jax.devices())} devices")
    config = SHAPES[args.shape]
    dev = jax.devices()[0]
    dtype = jnp.bfloat16 if dev.platform == "gpu" else jnp.float32
    abstract = abstract_params(llama.Llama(config, dtype=dtype), jnp.zeros((1, 16), jnp.int32), dtype)
    capacity = (dev.memory_stats() or {}).get("bytes_limit")
    fits = lambda n: capacity is None or jq.nbytes(abstract) / n < 0.85 * capacity
    rows = decode_rows(config, dtype, devices, [int(b) for b in args.batches.split(",")], args.steps, fits)
    if not args.no_train:
        rows += train_rows(config, dtype, devices, args.per_device_batch, args.seq)
    out = pathlib.Path(__file__).parent / "results" / f"bench_multi_gpu_{dev.platform}_{args.shape}.json"
    out.write_text(json.dumps(dict(device=dev.device_kind, devices=len(jax.devices()), jax=jax.__version__,
                                   commit=git_commit(), shape=args.shape, rows=rows), indent=2))
    print(f"\n{'kind':<11} {'model':<7} {'devices':>7} {'batch':>5} {'tok/s':>10} {'scaling':>7}")
    for r in rows:
        print(f"{r['kind']:<11} {r.get('model', 'nf4+dq'):<7} {r['devices']:>7} {r['batch']:>5} "
              f"{r['tokens_per_s']:>10.1f} {r.get('scaling_efficiency', ''):>7}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
