"""SmolLM2-135M in Flax: perplexity of the float port and of quantized versions on Austen text.

    .venv/bin/python experiments/smollm2_perplexity.py [--dtypes nf4+dq,nf4,fp4,int4,int8]
Non-overlapping 1024-token windows, no BOS, the mean negative log-likelihood of every predicted
token. References (DESIGN.md): 22.21 on the first 8,192 tokens of Pride and Prejudice, 27.32 on
the first 4,096 of Emma. Quantized models quantize every linear kernel along its input axis
(block 64; the tied embedding stays float) and run through ``jaxquant.flax.apply``.
Writes experiments/results/smollm2_perplexity.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import time

import jax

import jaxquant as jq
from jaxquant._src.study import Variant
from jaxquant.models import austen, llama, smollm2

TEXTS = {"prideprejudice": 8192, "emma": 4096}
REFERENCE = {"prideprejudice": 22.21, "emma": 27.32}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtypes", default="nf4+dq,nf4,fp4,int4,int8")
    p.add_argument("--block-size", type=int, default=64)
    args = p.parse_args()
    config, weights = smollm2.load()
    params = llama.params_from_weights(weights)
    tok = llama.tokenizer()
    ids = {name: tok.encode(austen.novel(name)).ids[:n] for name, n in TEXTS.items()}
    model = llama.Llama(config)
    rows = []
    float_fwd = jax.jit(lambda p, t: model.apply(p, t))
    start = time.perf_counter()
    rows.append(dict(dtype="float32", bits_per_param=32.0,
                     **{k: llama.perplexity(float_fwd, params, v) for k, v in ids.items()},
                     seconds=time.perf_counter() - start))
    print(rows[-1], flush=True)
    quant_fwd = jax.jit(lambda q, t: jq.flax.apply(model, q, t, check=False))
    for spec in args.dtypes.split(","):
        v = Variant.parse(spec)
        policy = jq.Policy(rules=(jq.Rule(r"kernel$", v.qtype, args.block_size, 0, v.double_quant,
                                          v.zero_point),))
        start = time.perf_counter()
        q = jq.quantize_tree(params, policy)
        rows.append(dict(dtype=v.name, bits_per_param=jq.bits_per_param(q),
                         **{k: llama.perplexity(quant_fwd, q, t) for k, t in ids.items()},
                         seconds=time.perf_counter() - start))
        print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = pathlib.Path(__file__).parent / "results" / "smollm2_perplexity.json"
    out.write_text(json.dumps(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, commit=commit,
                                   reference=REFERENCE, tokens=TEXTS, rows=rows), indent=2))
    print(f"{'dtype':<8} {'bits/param':>10} " + " ".join(f"{k:>15}" for k in TEXTS))
    for r in rows:
        print(f"{r['dtype']:<8} {r['bits_per_param']:>10.3f} " + " ".join(f"{r[k]:>15.3f}" for k in TEXTS))
    print("reference (float)   " + " ".join(f"{REFERENCE[k]:>15.2f}" for k in TEXTS))


if __name__ == "__main__":
    main()
