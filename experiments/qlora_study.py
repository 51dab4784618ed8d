"""QLoRA vs float LoRA on real weights: SmolLM2-135M fine-tuned on one Austen novel.

    python experiments/qlora_study.py [--steps 300 --batch 8 --seq 256]   # GPU: a few minutes
    python experiments/qlora_study.py --smoke                              # CPU: 5 steps, seq 128
Trains rank-16 (alpha 32) adapters on q/k/v/o/gate/up/down of every block on Pride and Prejudice
and measures perplexity on the first ``--eval-tokens`` tokens of Emma (held out; non-overlapping
1024-token windows, as experiments/smollm2_perplexity.py), for three bases with the same seed,
the same adapter init and the same batches: float32 weights (LoRA), NF4 (QLoRA) and NF4 + double
quant (QLoRA). bfloat16 compute, every block under ``nn.remat``, AdamW with warmup + cosine.
Target: NF4 + DQ's held-out perplexity within 2% of float LoRA's.
Writes experiments/results/qlora_study[_<GPU name>].json and qlora_study_loss[_<GPU name>].png
(with matplotlib).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's jaxquant

import jaxquant as jq  # noqa: E402
from jaxquant.models import austen, llama, smollm2  # noqa: E402

OUT = pathlib.Path(__file__).parent / "results"
VARIANTS = {"float": None, "nf4": False, "nf4+dq": True}  # name -> double_quant (None: no quantization)


def _nll(logits, tokens):
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


def _forward(model, base, adapters, tokens, quantized: bool):
    if quantized:
        return jq.lora.apply(model, base, tokens, adapters=adapters, check=False)
    with jq.lora.intercept(adapters):
        return model.apply(base, tokens)


def _perplexity(model, base, adapters, ids, window, quantized):
    fwd = jax.jit(lambda b, a, t: _nll(_forward(model, b, a, t, quantized), t))
    windows = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]
    losses = [float(fwd(base, adapters, jnp.asarray(w)[None])) for w in windows]
    return float(np.exp(np.mean(losses)))


def train(name, model, params, train_ids, eval_ids, args):
    import optax
    dq = VARIANTS[name]
    quantized = dq is not None
    base = params
    if quantized:
        base = jq.quantize_tree(params, jq.Policy(rules=(jq.Rule(r"_proj/kernel$", "nf4", 64, 0, dq),)))
    # adapters keyed by kernel path: the same init for every variant (paths and shapes match)
    shapes = jq.quantize_tree(params, jq.Policy(rules=(jq.Rule(r"_proj/kernel$", "nf4", 64, 0, False),)))
    adapters = jq.lora.init(jax.random.key(args.seed), shapes, rank=args.rank, alpha=args.alpha)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(args.steps // 10, 1), args.steps)
    opt = optax.adamw(schedule, weight_decay=0.0)
    state = opt.init(adapters)

    @jax.jit
    def step(ad, state, base, tokens):
        loss, g = jax.value_and_grad(lambda a: _nll(_forward(model, base, a, tokens, quantized), tokens))(ad)
        updates, state = opt.update(g, state, ad)
        return optax.apply_updates(ad, updates), state, loss

    rng = np.random.default_rng(args.seed)  # same batches for every variant
    before = _perplexity(model, base, adapters, eval_ids, args.window, quantized)
    losses, start = [], time.perf_counter()
    for _ in tqdm(range(args.steps), desc=f"{name} LoRA", leave=False):
        starts = rng.integers(0, len(train_ids) - args.seq, args.batch)
        tokens = jnp.asarray(np.stack([train_ids[s:s + args.seq] for s in starts]))
        adapters, state, loss = step(adapters, state, base, tokens)
        losses.append(float(loss))
    seconds = time.perf_counter() - start
    after = _perplexity(model, base, adapters, eval_ids, args.window, quantized)
    row = dict(variant=name, heldout_ppl_before=before, heldout_ppl_after=after, train_loss=losses,
               train_seconds=seconds, base_bytes=jq.nbytes(base), adapter_params=sum(
                   x.size for x in jax.tree.leaves(adapters)))
    print({k: v for k, v in row.items() if k != "train_loss"}, flush=True)
    return row


def _plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        loss = np.asarray(r["train_loss"])
        k = max(len(loss) // 30, 1)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + k - 1, smooth,
                label=f"{r['variant']} (held-out ppl {r['heldout_ppl_after']:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (Pride and Prejudice)")
    ax.set_title("SmolLM2-135M, LoRA rank 16: float vs NF4 vs NF4+DQ base")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", type=int, default=None, help="keep only the first N blocks (smoke)")
    p.add_argument("--smoke", action="store_true", help="5 steps, batch 2, seq 128, 2 blocks: a CPU check")
    args = p.parse_args()
    if args.smoke:
        args.steps, args.batch, args.seq, args.eval_tokens, args.window = 5, 2, 128, 256, 128
        args.layers = args.layers or 2
    config, weights = smollm2.load(num_layers=args.layers)
    params = llama.params_from_weights(weights)
    tok = llama.tokenizer()
    train_ids = np.asarray(tok.encode(austen.novel("prideprejudice")).ids, np.int32)
    eval_ids = np.asarray(tok.encode(austen.novel("emma")).ids[:args.eval_tokens], np.int32)
    model = llama.Llama(config, dtype=jnp.bfloat16, remat=True)
    rows = [train(name, model, params, train_ids, eval_ids, args) for name in VARIANTS]
    ref = rows[0]["heldout_ppl_after"]
    for r in rows:
        r["vs_float_lora"] = r["heldout_ppl_after"] / ref - 1
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = jax.devices()[0]
    suffix = "" if device.platform == "cpu" else "_" + device.device_kind.replace(" ", "_")
    if args.smoke:
        suffix = "_smoke"
    OUT.mkdir(exist_ok=True)
    (OUT / f"qlora_study{suffix}.json").write_text(json.dumps(dict(
        device=device.device_kind, jax=jax.__version__, commit=commit, args=vars(args),
        train_tokens=len(train_ids), eval_tokens=len(eval_ids), target="nf4+dq within 2% of float",
        rows=rows), indent=2))
    _plot(rows, OUT / f"qlora_study_loss{suffix}.png")
    print(f"{'variant':<8} {'ppl before':>10} {'ppl after':>10} {'vs float':>9} {'train s':>8}")
    for r in rows:
        print(f"{r['variant']:<8} {r['heldout_ppl_before']:>10.3f} {r['heldout_ppl_after']:>10.3f} "
              f"{100 * r['vs_float_lora']:>8.2f}% {r['train_seconds']:>8.1f}")


if __name__ == "__main__":
    main()
