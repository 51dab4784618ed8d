"""Greedy decoding speed of the Flax Llama port, float vs quantized, at batch 1.

    .venv/bin/python experiments/generate_speed.py                 # SmolLM2-135M, real weights
    PYTHONPATH=. python3 experiments/generate_speed.py --random    # same shapes, random weights
    PYTHONPATH=. python3 experiments/generate_speed.py --shape llama-8b   # random, Llama-3-8B shapes
Tokens/s over `--steps` new tokens after a jitted warm-up, KV cache, prompt of 16 tokens. Random
weights (for machines without the model package, and for the larger shapes; speed does not
depend on the values) are drawn leaf by leaf with the real shapes, directly in the compute dtype.
`--shape llama-1b` / `llama-8b` are Llama-3.2-1B / Llama-3-8B shapes with a tied embedding (this
port always ties; the 8B's separate LM head would be one more 128256x4096 matrix). The embedding
stays in the compute dtype in both models (the default policy). `--implementation xla` runs
every quantized matmul through the XLA path instead of `auto` (the kernel on sm90).
Writes experiments/results/generate_speed_<platform>[_<shape>][_xla].json.
"""

import argparse
import dataclasses
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant._src import flax_linen
from jaxquant.models import llama, smollm2

SHAPES = {
    "smollm2": smollm2.LlamaConfig(),
    "llama-1b": smollm2.LlamaConfig(vocab_size=128256, hidden=2048, ffn=8192, layers=16, heads=32,
                                    kv_heads=8, head_dim=64, rope_theta=500000.0),
    "llama-8b": smollm2.LlamaConfig(vocab_size=128256, hidden=4096, ffn=14336, layers=32, heads=32,
                                    kv_heads=8, head_dim=128, rope_theta=500000.0),
}


def random_params(model, prompt, dtype):
    """N(0, 0.02) weights (norm scales 1) with the model's shapes, one leaf at a time."""
    abstract = jax.eval_shape(model.init, jax.random.key(0), prompt)
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    make = jax.jit(lambda k, s: (jax.random.normal(k, s, jnp.float32) * 0.02).astype(dtype),
                   static_argnums=1)
    return jax.tree.unflatten(treedef, [
        make(k, x.shape) if len(x.shape) > 1 else jnp.ones(x.shape, dtype) for k, x in zip(keys, leaves)])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--random", action="store_true")
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--implementation", choices=["auto", "xla"], default="auto")
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args()
    on_gpu = jax.devices()[0].platform == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    config = SHAPES[args.shape]
    prompt = jnp.arange(16, dtype=jnp.int32)[None] + 1000
    random = args.random or args.shape != "smollm2"
    if random:
        params = random_params(llama.Llama(config, dtype=dtype), prompt, dtype)
    else:
        config, weights = smollm2.load()
        params = jax.tree.map(lambda a: a.astype(dtype), llama.params_from_weights(weights))
    if args.implementation != "auto":  # every Dense of the port goes through flax_linen.qmatmul
        flax_linen.qmatmul = functools.partial(flax_linen.qmatmul, implementation=args.implementation)
    model = llama.Llama(config, dtype=dtype)
    rows = []
    for name, tree, fn in [
        ("float", params, lambda p, t, c, s: model.apply(p, t, c, s)),
        ("nf4+dq", jq.quantize_tree(params), lambda p, t, c, s: jq.flax.apply(model, p, t, c, s, check=False)),
    ]:
        gen = jax.jit(functools.partial(llama.generate, fn, steps=args.steps, config=config, dtype=dtype))
        t = time.perf_counter()
        jax.block_until_ready(gen(tree, prompt))
        compile_s = time.perf_counter() - t
        times = []
        for _ in range(3):
            t = time.perf_counter()
            jax.block_until_ready(gen(tree, prompt))
            times.append(time.perf_counter() - t)
        rows.append(dict(model=name, tokens_per_s=args.steps / min(times), bytes=jq.nbytes(tree),
                         first_call_s=round(compile_s, 1)))
        print(rows[-1], flush=True)
    dev = jax.devices()[0]
    suffix = ("" if args.shape == "smollm2" else f"_{args.shape}") + (
        "" if args.implementation == "auto" else f"_{args.implementation}")
    out = pathlib.Path(__file__).parent / "results" / f"generate_speed_{dev.platform}{suffix}.json"
    out.write_text(json.dumps(dict(device=dev.device_kind, jax=jax.__version__, random=random,
                                   shape=args.shape, config=dataclasses.asdict(config),
                                   implementation=args.implementation, dtype=jnp.dtype(dtype).name,
                                   rows=rows), indent=2))
    print(f"speedup quantized/float: {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x on "
          f"{dev.device_kind} ({args.shape}, {args.implementation})")


if __name__ == "__main__":
    main()
