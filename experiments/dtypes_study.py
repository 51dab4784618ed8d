"""Data types on real weights: error vs bits per parameter, and SmolLM2's perplexity per data type.

    .venv/bin/python experiments/dtypes_study.py [--ppl-tokens 4096]
Weight sets: all-MiniLM-L6-v2's linears (pristine float32), SmolLM2-135M's linears (stored as Q4_1
in the GGUF, i.e. already on a 4-bit grid) and its token embedding (Q8_0). For int8, int4, affine
int4, fp4, nf4 and nf4 + double quant at block sizes 32..4096: relative MSE (sum of squared errors
over sum of squares) and SQNR, with blocks along each matrix's input axis. Then SmolLM2's
perplexity on held-out Austen text (Persuasion, not used elsewhere) per data type at block 64
(and nf4 at 32): the analogue of the QLoRA paper's data-type table. Writes
experiments/results/dtypes_study.json, dtypes_error_vs_bits.png and dtypes_perplexity.png.
"""

import argparse
import json
import pathlib
import subprocess

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import jaxquant as jq
from jaxquant._src.study import Variant, quantize_weights
from jaxquant.models import austen, llama, minilm, smollm2

DTYPES = ["int8", "int4", "int4+zp", "fp4", "nf4", "nf4+dq"]
BLOCKS = [32, 64, 128, 256, 512, 1024, 2048, 4096]
OUT = pathlib.Path(__file__).parent / "results"


def weight_sets():
    mini = minilm.load_params()["params"]
    flat = {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(mini)[0]}
    mini_linears = {k: v for k, v in flat.items() if k.endswith("kernel")}
    _, smol = smollm2.load()
    return {
        "MiniLM linears (fp32)": (mini_linears, {k: 0 for k in mini_linears}),
        "SmolLM2 linears (Q4_1)": ({k: v for k, v in smol.items() if v.ndim == 2 and k != "embed_tokens"},
                                   {k: 0 for k, v in smol.items() if v.ndim == 2 and k != "embed_tokens"}),
        "SmolLM2 embedding (Q8_0)": ({"embed_tokens": smol["embed_tokens"]}, {"embed_tokens": 1}),
    }


def plot(errors, ppl, n_tokens):
    ids = range(n_tokens)
    sets = list(dict.fromkeys(e["weights"] for e in errors))
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 4), sharey=False)
    for ax, s in zip(axes, sets):
        for d in DTYPES:
            pts = sorted((e["bits_per_param"], e["rel_mse"], e["block"]) for e in errors
                         if e["weights"] == s and e["dtype"] == d)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=d, ms=3)
            if d == "nf4":
                for b, m, blk in pts:
                    ax.annotate(str(blk), (b, m), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_title(s, fontsize=10)
        ax.set_xlabel("bits per parameter (smaller blocks: more constants)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("relative MSE of the weights")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "dtypes_error_vs_bits.png", dpi=110)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [p["dtype"] + ("" if p["block"] in (None, 64) else f" (block {p['block']})") for p in ppl]
    ax.bar(labels, [p["perplexity"] for p in ppl], color=["gray"] + ["C0"] * (len(ppl) - 1))
    for i, p in enumerate(ppl):
        ax.text(i, p["perplexity"] + 0.3, f"{p['perplexity']:.2f}", ha="center", fontsize=8)
    ax.set_ylabel(f"perplexity, Persuasion ({len(ids)} tokens)")
    ax.set_title("SmolLM2-135M, linear layers quantized (block 64), embedding float", fontsize=10)
    plt.setp(ax.get_xticklabels(), rotation=20)
    fig.tight_layout()
    fig.savefig(OUT / "dtypes_perplexity.png", dpi=110)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ppl-tokens", type=int, default=4096,
                   help="tokens to score (a few thousand on CPU, tens of thousands on a GPU)")
    p.add_argument("--plot-only", action="store_true", help="redraw the plots from the saved JSON")
    p.add_argument("--text", metavar="FILE", help="score this UTF-8 text instead of Austen's Persuasion "
                   "(fetched by scripts/fetch_austen.sh)")
    args = p.parse_args()
    if args.plot_only:
        saved = json.loads((OUT / "dtypes_study.json").read_text())
        return plot(saved["errors"], saved["perplexity"], saved["ppl_tokens"])
    errors = []
    for set_name, (weights, axes) in weight_sets().items():
        params = sum(w.size for w in weights.values())
        for block in BLOCKS:
            # every matrix at every block size: where the input axis (576 in SmolLM2) is not a
            # multiple of the block, its last block is partial and has its own constant
            rows = quantize_weights(weights, [Variant.parse(d) for d in DTYPES], block, axes, progress=False)
            for r in rows:
                errors.append(dict(weights=set_name, block=block, dtype=r["dtype"], matrices=len(weights),
                                   bits_per_param=8 * r["bytes"] / params, rel_mse=r["rel_rms_error"] ** 2,
                                   sqnr_db=r["sqnr_db"]))
            print(set_name, block, {r["dtype"]: round(r["sqnr_db"], 2) for r in rows}, flush=True)

    config, weights = smollm2.load()
    params = llama.params_from_weights(weights)
    text = pathlib.Path(args.text).read_text(encoding="utf-8") if args.text else austen.novel("persuasion")
    ids = llama.tokenizer().encode(text).ids[:args.ppl_tokens]
    model = llama.Llama(config)
    ppl = [dict(dtype="float32", block=None, perplexity=llama.perplexity(jax.jit(model.apply), params, ids))]
    qfwd = jax.jit(lambda q, t: jq.flax.apply(model, q, t, check=False))
    for spec, block in [(d, 64) for d in DTYPES] + [("nf4+dq", 32)]:
        v = Variant.parse(spec)
        q = jq.quantize_tree(params, jq.Policy(rules=(jq.Rule(r"kernel$", v.qtype, block, 0, v.double_quant,
                                                                v.zero_point),)))
        quantized = [x for x in jax.tree.leaves(q, is_leaf=lambda a: isinstance(a, jq.QArray))
                     if isinstance(x, jq.QArray)]
        bits = jq.bits_per_param(quantized)
        ppl.append(dict(dtype=spec, block=block, linear_bits=bits, perplexity=llama.perplexity(qfwd, q, ids)))
        print(ppl[-1], flush=True)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    OUT.mkdir(exist_ok=True)
    (OUT / "dtypes_study.json").write_text(json.dumps(dict(
        device=jax.devices()[0].device_kind, jax=jax.__version__, commit=commit,
        text=args.text or "persuasion",
        ppl_tokens=len(ids), errors=errors, perplexity=ppl), indent=2))

    plot(errors, ppl, len(ids))
    print("wrote dtypes_study.json, dtypes_error_vs_bits.png, dtypes_perplexity.png")


if __name__ == "__main__":
    main()
