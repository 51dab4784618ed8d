"""Greedy decoding speed of the Flax Llama port, float vs NF4 + double quant, against the HBM roofline.

    .venv/bin/python experiments/generate_speed.py                  # SmolLM2-135M, real weights
    PYTHONPATH=. python3 experiments/generate_speed.py --random     # same shapes, random weights
    PYTHONPATH=. python3 experiments/generate_speed.py --shape llama-8b --batches 1,16
    PYTHONPATH=. python3 experiments/generate_speed.py --shape llama-70b --quantized-only --batches 1,16 --steps 32
    PYTHONPATH=. python3 experiments/generate_speed.py --shape tiny --quantized-only --batches 1,2 --steps 4  # CPU smoke

Per decode batch size (`--batches`, a prompt of shape (batch, 16)): tokens/s = batch * steps /
time of one jitted `llama.generate` call (best of 3, after a first call that compiles; the call
includes the prefill), KV cache of 16 + steps positions.

Roofline: a decode step reads every weight byte once, so tokens/s <= batch * bandwidth /
bytes_read_per_step (`--hbm-gbs`, 4800 = H200's nominal HBM3e). bytes_read_per_step counts the
tree's bytes (`jq.nbytes`: codes + constants for quantized leaves) without the embedding table
when the head is untied (a step gathers `batch` rows of it: negligible), plus the whole KV cache
(this port attends over the full preallocated cache every step). Activations and the writes of
one cache position are not counted. The timed call also runs the prefill (one more weight pass,
1/steps more), so both the fraction and achieved bytes/s = bytes_read_per_step * steps / time
slightly understate the decode steps alone.

Shapes: `smollm2` (SmolLM2-135M, tied), `llama-1b` (Llama-3.2-1B, tied, as the real model),
`llama-8b` / `llama-70b` (Llama-3-8B / -70B: untied LM head `lm_head`, as the real models;
results for llama-8b before this change used a tied head), `tiny` (an untied toy for CPU
smoke tests). llama-70b: 70.55B params, 141.1 GB in bf16, 37.96 GB in NF4 + DQ (of which the
bf16 embedding 2.10 GB), so 35.86 GB read per step + KV cache (0.25 GB at batch 16, 48 positions). Random weights (every shape but smollm2, or `--random`) are N(0, 0.02), norm
scales 1, drawn leaf by leaf directly in the compute dtype (no float32 temporary); speed does not depend on the values.
The default policy quantizes every Dense kernel (the LM head too) and keeps the embedding and
the norms in the compute dtype.

Building the quantized tree:
- default: the float tree is built (it is benchmarked too) and `jq.quantize_tree` quantizes it
  whole; `quantize_s` and the peak are those of a resident float tree (input + output). With
  random weights the streamed build below is then checked to give the identical tree.
- `--quantized-only` with random weights (the only way for llama-70b: 141 GB of bf16 does not
  fit one H200) streams: each leaf is drawn on the device, quantized at once by
  `jq.quantize_tree` on a tree holding only that leaf at its real path (the policy decides from
  path, shape and dtype, so this is exactly what the whole-tree call gives) with `donate=True`,
  which deletes the float leaf. Device peak = quantized tree + about one float leaf and its
  temporaries. `quantize_s` sums the quantize calls alone (each synced; the random draws are
  excluded), `build_s` is the whole build. One warm-up per distinct leaf shape first, so both
  exclude compiles.
Peak device memory (`peak_bytes_in_use`, the process's high-water mark; None on CPU) is
recorded after building and after decoding. `--implementation xla` runs every quantized matmul
through the XLA path instead of `auto` (the kernel on sm90). The Llama port unrolls its layers
(it has no scan option; `remat` only matters for gradients), so compiling the 80-layer prefill +
decode step is the slow part of a llama-70b run: about a minute per batch size, extrapolating
the 8B's 26 s first call on an H100 (tracing + lowering alone take 12 s on a CPU).
Writes experiments/results/generate_speed_<platform>[_<shape>][_xla].json (no shape suffix for
smollm2).
"""

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import time

import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant._src import flax_linen
from jaxquant.models import llama, smollm2

Config = smollm2.LlamaConfig
SHAPES = {
    "tiny": Config(vocab_size=512, hidden=128, ffn=256, layers=2, heads=4, kv_heads=2, head_dim=32,
                   rope_theta=500000.0, tie_embeddings=False),
    "smollm2": Config(),
    "llama-1b": Config(vocab_size=128256, hidden=2048, ffn=8192, layers=16, heads=32, kv_heads=8,
                       head_dim=64, rope_theta=500000.0),
    "llama-8b": Config(vocab_size=128256, hidden=4096, ffn=14336, layers=32, heads=32, kv_heads=8,
                       head_dim=128, rope_theta=500000.0, tie_embeddings=False),
    "llama-70b": Config(vocab_size=128256, hidden=8192, ffn=28672, layers=80, heads=64, kv_heads=8,
                        head_dim=128, rope_theta=500000.0, tie_embeddings=False),
}
PROMPT_LEN = 16
is_q = lambda x: isinstance(x, jq.QArray)


def peak_bytes():
    stats = jax.devices()[0].memory_stats()  # None on CPU
    return None if stats is None else stats.get("peak_bytes_in_use")


def make_leaf(key, shape, dtype):
    """N(0, 0.02) for matrices, ones for norm scales; jitted once per shape (static)."""
    if len(shape) < 2:
        return jnp.ones(shape, dtype)
    return _normal(key, shape, jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
    return jax.random.normal(key, shape, dtype) * jnp.asarray(0.02, dtype)  # no float32 temporary


def abstract_params(model, prompt, dtype):
    """The param tree's shapes, in `dtype` (Flax inits float32 whatever the compute dtype)."""
    abstract = jax.eval_shape(model.init, jax.random.key(0), prompt)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), abstract)


def random_params(model, prompt, dtype):
    leaves, treedef = jax.tree.flatten(abstract_params(model, prompt, dtype))
    keys = jax.random.split(jax.random.key(0), len(leaves))
    return jax.tree.unflatten(treedef, [make_leaf(k, x.shape, dtype) for k, x in zip(keys, leaves)])


def quantize_one(path, leaf, donate, policy=None):
    """`jq.quantize_tree` of a tree holding only `leaf` at `path`: what the whole-tree call gives it."""
    tree = leaf
    for key in reversed(path):
        tree = {key.key: tree}
    return jax.tree.leaves(jq.quantize_tree(tree, policy, donate=donate), is_leaf=is_q)[0]


def stream_quantized(model, prompt, dtype, policy=None):
    """`jq.quantize_tree(random_params(model, prompt, dtype), policy)`, drawn and quantized leaf by leaf."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params(model, prompt, dtype))
    keys = jax.random.split(jax.random.key(0), len(leaves))
    for (path, x) in {x.shape: (path, x) for path, x in leaves}.values():  # compile each shape once
        jax.block_until_ready(quantize_one(path, make_leaf(keys[0], x.shape, dtype), True, policy))
    out, quantize_s, start = [], 0.0, time.perf_counter()
    for (path, x), key in zip(leaves, keys):
        w = jax.block_until_ready(make_leaf(key, x.shape, dtype))
        t = time.perf_counter()
        out.append(jax.block_until_ready(quantize_one(path, w, True, policy)))  # frees w if quantized
        quantize_s += time.perf_counter() - t
        del w
    build_s = time.perf_counter() - start
    return jax.tree.unflatten(treedef, out), dict(mode="streamed", quantize_s=round(quantize_s, 3),
                                                  build_s=round(build_s, 3))


def quantize_whole(params):
    """`jq.quantize_tree(params)` timed, after compiling each distinct leaf shape on one leaf."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for path, x in {x.shape: (path, x) for path, x in leaves}.values():
        jax.block_until_ready(quantize_one(path, x, donate=False))
    t = time.perf_counter()
    q = jax.block_until_ready(jq.quantize_tree(params))
    return q, dict(mode="whole tree", quantize_s=round(time.perf_counter() - t, 3))


def same_tree(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(bool(jnp.array_equal(x, y)) for x, y in zip(la, lb))


def git_commit():
    if os.environ.get("JAXQUANT_COMMIT"):
        return os.environ["JAXQUANT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=pathlib.Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--random", action="store_true")
    p.add_argument("--shape", choices=list(SHAPES), default="smollm2")
    p.add_argument("--implementation", choices=["auto", "xla"], default="auto")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--batches", default="1", help="decode batch sizes, comma-separated")
    p.add_argument("--quantized-only", action="store_true", help="skip the float model")
    p.add_argument("--hbm-gbs", type=float, default=4800.0, help="HBM bandwidth for the roofline, GB/s")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    dev = jax.devices()[0]
    dtype = jnp.bfloat16 if dev.platform == "gpu" else jnp.float32
    config = SHAPES[args.shape]
    random = args.random or args.shape != "smollm2"
    if not random:
        config, weights = smollm2.load()
    model = llama.Llama(config, dtype=dtype)
    prompt1 = jnp.zeros((1, PROMPT_LEN), jnp.int32)  # for shapes only
    abstract = abstract_params(model, prompt1, dtype)
    expected = jq.nbytes(jq.quantize_tree(abstract))  # abstract: no allocation
    print(f"{args.shape}: {jq.num_params(abstract) / 1e9:.2f}B params, {jq.nbytes(abstract) / 1e9:.2f} GB "
          f"float, {expected / 1e9:.2f} GB quantized, on {dev.device_kind}", flush=True)

    if random and args.quantized_only:
        params = None
        qtree, build = stream_quantized(model, prompt1, dtype)
    else:
        params = (random_params(model, prompt1, dtype) if random else
                  jax.tree.map(lambda a: a.astype(dtype), llama.params_from_weights(weights)))
        qtree, build = quantize_whole(params)
    build.update(peak_bytes_after=peak_bytes(), bytes_quantized=jq.nbytes(qtree),
                 bits_per_param=round(jq.bits_per_param(qtree), 4))
    if build["bytes_quantized"] != expected:
        print(f"WARNING: {build['bytes_quantized']} bytes quantized, {expected} expected")
    if params is not None and random:  # the streamed path (llama-70b's) gives quantize_tree's tree
        build["streamed_identical"] = same_tree(qtree, stream_quantized(model, prompt1, dtype)[0])
        if not build["streamed_identical"]:  # warn, not raise: the speed numbers still stand
            print("WARNING: streamed quantization differs from quantize_tree")
    if args.quantized_only:
        params = None
    print("build:", build, flush=True)

    if args.implementation != "auto":  # every Dense of the port goes through flax_linen.qmatmul
        flax_linen.qmatmul = functools.partial(flax_linen.qmatmul, implementation=args.implementation)
    models = [("nf4+dq", qtree, lambda p, t, c, s: jq.flax.apply(model, p, t, c, s, check=False))]
    if params is not None:
        models.insert(0, ("float", params, lambda p, t, c, s: model.apply(p, t, c, s)))
    bandwidth = args.hbm_gbs * 1e9
    itemsize = jnp.dtype(dtype).itemsize
    rows = []
    for name, tree, fn in models:
        gen = jax.jit(functools.partial(llama.generate, fn, steps=args.steps, config=config, dtype=dtype))
        embed = 0 if config.tie_embeddings else jq.nbytes(tree["params"]["embed_tokens"])
        for batch in batches:
            tokens = 1000 + jnp.arange(PROMPT_LEN)[None] + 7 * jnp.arange(batch)[:, None]  # rows differ
            prompt = (tokens % config.vocab_size).astype(jnp.int32)
            t = time.perf_counter()
            jax.block_until_ready(gen(tree, prompt))
            first_call_s = time.perf_counter() - t
            times = []
            for _ in range(3):
                t = time.perf_counter()
                jax.block_until_ready(gen(tree, prompt))
                times.append(time.perf_counter() - t)
            seconds = min(times)
            kv = (2 * config.layers * batch * (PROMPT_LEN + args.steps) * config.kv_heads
                  * config.head_dim * itemsize)  # K and V, every layer, the whole cache
            per_step = jq.nbytes(tree) - embed + kv
            roofline = batch * bandwidth / per_step
            tokens_per_s = batch * args.steps / seconds
            rows.append(dict(model=name, batch=batch, tokens_per_s=round(tokens_per_s, 2),
                             seconds=round(seconds, 4), first_call_s=round(first_call_s, 1),
                             bytes=jq.nbytes(tree), kv_cache_bytes=kv, bytes_read_per_step=per_step,
                             roofline_tokens_per_s=round(roofline, 2),
                             roofline_fraction=round(tokens_per_s / roofline, 4),
                             achieved_bytes_per_s=per_step * args.steps / seconds))
            print(rows[-1], flush=True)
    build["peak_bytes_after_decode"] = peak_bytes()

    print(f"\n{'model':8} {'batch':>5} {'tok/s':>9} {'GB/step':>8} {'roofline':>9} {'frac':>6} "
          f"{'GB/s':>8} {'compile s':>9}")
    for r in rows:
        print(f"{r['model']:8} {r['batch']:5d} {r['tokens_per_s']:9.1f} "
              f"{r['bytes_read_per_step'] / 1e9:8.2f} {r['roofline_tokens_per_s']:9.1f} "
              f"{r['roofline_fraction']:6.3f} {r['achieved_bytes_per_s'] / 1e9:8.1f} {r['first_call_s']:9.1f}")
    gb = lambda b: "n/a" if b is None else f"{b / 1e9:.2f} GB"
    print(f"quantize {build['quantize_s']} s ({build['mode']}), {gb(build['bytes_quantized'])}; device peak "
          f"after build {gb(build['peak_bytes_after'])}, after decode {gb(build['peak_bytes_after_decode'])}")
    suffix = ("" if args.shape == "smollm2" else f"_{args.shape}") + (
        "" if args.implementation == "auto" else f"_{args.implementation}")
    out = pathlib.Path(__file__).parent / "results" / f"generate_speed_{dev.platform}{suffix}.json"
    out.write_text(json.dumps(dict(
        device=dev.device_kind, jax=jax.__version__, commit=git_commit(), random=random, shape=args.shape,
        config=dataclasses.asdict(config), implementation=args.implementation, dtype=jnp.dtype(dtype).name,
        steps=args.steps, prompt_len=PROMPT_LEN, quantized_only=args.quantized_only,
        hbm_bytes_per_s=bandwidth, build=build, rows=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
