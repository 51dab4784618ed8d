"""Quantize a Llama-3-8B-shaped bf16 param tree (random weights) on one GPU: time and peak memory.

    PYTHONPATH=. python3 experiments/quantize_8b_tree.py [--donate]
32 layers, hidden 4096, FFN 14336, 32/8 heads of 128, vocab 128256 (8.03B params). Linear
kernels -> NF4 + DQ along their input axis (jq.quantize_tree, leaf by leaf, so the peak is
the input tree + the quantized tree + one layer's temporaries); embeddings and norms stay bf16.
`--donate` frees each input leaf as it is quantized (`quantize_tree(..., donate=True)`); run it
as its own process (the peak is the process's). Writes quantize_8b_tree_gpu[_donate].json.
"""

import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

import jaxquant as jq


def shapes():
    h, f, v, kv = 4096, 14336, 128256, 1024
    tree = {"embed_tokens": {"embedding": (v, h)}, "lm_head": {"kernel": (h, v)}, "norm": {"scale": (h,)}}
    for i in range(32):
        tree[f"layers_{i}"] = {
            "q_proj": {"kernel": (h, h)}, "k_proj": {"kernel": (h, kv)}, "v_proj": {"kernel": (h, kv)},
            "o_proj": {"kernel": (h, h)}, "gate_proj": {"kernel": (h, f)}, "up_proj": {"kernel": (h, f)},
            "down_proj": {"kernel": (f, h)}, "input_layernorm": {"scale": (h,)},
            "post_attention_layernorm": {"scale": (h,)}}
    return tree


def main():
    dev = jax.devices()[0]
    leaves, treedef = jax.tree.flatten(shapes(), is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(jax.random.key(0), len(leaves))
    make = jax.jit(lambda k, s: (jax.random.normal(k, s, jnp.float32) * 0.02).astype(jnp.bfloat16),
                   static_argnums=1)
    params = jax.tree.unflatten(treedef, [make(k, s) for k, s in zip(keys, leaves)])
    jax.block_until_ready(params)
    n = sum(x.size for x in jax.tree.leaves(params))
    base = dev.memory_stats()["bytes_in_use"]
    policy = jq.Policy(rules=(jq.Rule(r"lm_head", qtype=None), jq.Rule(r"kernel$")))
    jq.quantize_tree({"w": params["layers_0"]["q_proj"]["kernel"]}, jq.Policy(rules=(jq.Rule("w"),)))  # warm-up
    jq.quantize_tree({"layers_0": params["layers_0"]}, policy)
    t = time.perf_counter()
    donate = "--donate" in sys.argv
    q = jq.quantize_tree(params, policy, donate=donate)
    jax.block_until_ready(q)
    seconds = time.perf_counter() - t
    stats = dev.memory_stats()
    row = dict(device=dev.device_kind, jax=jax.__version__, params=n, seconds=seconds,
               bytes_input=jq.nbytes(params), bytes_quantized=jq.nbytes(q),
               bits_per_param=jq.bits_per_param(q), peak_bytes_in_use=stats.get("peak_bytes_in_use"),
               bytes_in_use_before=base, donate=donate, bytes_in_use_after=stats.get("bytes_in_use"))
    print(json.dumps(row, indent=2))
    name = f"quantize_8b_tree_gpu{'_donate' if donate else ''}.json"
    (pathlib.Path(__file__).parent / "results" / name).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
