"""QLoRA training step on one GPU: speed and peak memory, jaxquant vs qwix (when importable).

    python experiments/bench_qlora.py [--sizes 8b,1b] [--batches 1,4] [--seq 1024] [--variants nf4+dq,nf4]
Random weights with real Llama-3-8B / Llama-3.2-1B shapes on this repo's Flax Llama port
(bfloat16 compute, every block under ``nn.remat``), LoRA rank 16 / alpha 32 on q/k/v/o/gate/up/
down of every block, AdamW on the adapters, causal-LM loss (jaxquant: the port's chunked loss,
``targets=``, 512 tokens of logits at a time; qwix: full logits, as ANCHORS.md measured it). The
base is drawn and quantized leaf by leaf (no bf16 copy of the model on the device). Step = forward + backward + update,
median of ``--steps`` timed steps after 2 warm-ups; forward-only and forward+backward are timed
too, to say which part dominates (``--no-breakdown`` skips them: two compiles fewer). Peak device
memory from ``memory_stats()['peak_bytes_in_use']`` (a high-water mark: ``build_peak_gb`` is the
peak after building, ``peak_gb`` after training, the larger); each model size runs in its own process (the
peak only grows), batches in increasing order; its progress lines (build time, compile time) are
echoed as they come and the JSON is rewritten after each, so a run cut short shows how far it got.
On the H200: ``PYTHONPATH=. python3 experiments/bench_qlora.py --sizes 8b --batches 1,4 --steps 3
--no-breakdown`` alone in one command, then ``--qwix``.
Writes experiments/results/bench_qlora_<device>.json. Peers (ANCHORS.md, H200): qwix NF4 4521 /
6941 tok/s at 1x1024 / 4x1024 (8B); peft + bitsandbytes NF4+DQ peak 8.1 / 13.7 GB.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's jaxquant

SHAPES = {  # hidden, ffn, layers, heads, kv_heads, head_dim, vocab, rope theta
    "8b": dict(hidden=4096, ffn=14336, layers=32, heads=32, kv_heads=8, head_dim=128, vocab_size=128256,
               rope_theta=500000.0),
    "1b": dict(hidden=2048, ffn=8192, layers=16, heads=32, kv_heads=8, head_dim=64, vocab_size=128256,
               rope_theta=500000.0),
    "tiny": dict(hidden=128, ffn=256, layers=2, heads=4, kv_heads=2, head_dim=32, vocab_size=512,
                 rope_theta=10000.0),  # a CPU smoke test of the script
}


def _timed(fn, steps):
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_gb():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 1e9


def _loss(logits, tokens):
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


def _write(rows: list[dict]) -> None:
    """Merges `rows` into the device's JSON: a row replaces the earlier one of the same job and batch,
    so a run of one size keeps the other size's rows (each row names its commit)."""
    commit = os.environ.get("JAXQUANT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = jax.devices()[0].device_kind
    out = pathlib.Path(__file__).parent / "results" / f"bench_qlora_{device.replace(' ', '_')}.json"
    old = json.loads(out.read_text()) if out.exists() else {}
    key = lambda r: (r["lib"], r["size"], r["variant"], r.get("batch"), r.get("seq"), r.get("attention", "xla"))
    new = [dict(r, commit=r.get("commit", commit), jax=r.get("jax", jax.__version__)) for r in rows]
    kept = [dict(r, commit=r.get("commit", old.get("commit")), jax=r.get("jax", old.get("jax")))
            for r in old.get("rows", []) if key(r) not in {key(n) for n in new}]
    out.write_text(json.dumps(dict(device=device, rows=kept + new), indent=2))


def run_jaxquant(size: str, variant: str, batches, seq: int, steps: int, breakdown: bool = True,
                 attention: str = "xla") -> list[dict]:
    import optax

    import jaxquant as jq
    from jaxquant.models import llama
    from jaxquant.models.smollm2 import LlamaConfig

    from generate_speed import stream_quantized  # this directory's script

    config = LlamaConfig(**SHAPES[size], tie_embeddings=False)
    model = llama.Llama(config, dtype=jnp.bfloat16, remat=True, attention=attention)
    start = time.perf_counter()
    policy = jq.Policy(rules=(jq.Rule(r"_proj/kernel$", "nf4", 64, 0, variant == "nf4+dq"),))
    qparams, _ = stream_quantized(model, jnp.zeros((1, seq), jnp.int32), jnp.bfloat16, policy)
    weights_gb, build_peak = jq.nbytes(qparams) / 1e9, _peak_gb()
    print(f"built {size} {variant}: {weights_gb:.2f} GB in {time.perf_counter() - start:.0f} s, "
          f"peak {build_peak:.2f} GB", flush=True)
    adapters = jq.lora.init(jax.random.key(1), qparams, rank=16, alpha=32.0)
    opt = optax.adamw(1e-4)
    rows = []
    for batch in batches:
        tokens = jax.random.randint(jax.random.key(2), (batch, seq), 0, config.vocab_size)
        targets = llama.next_token_targets(tokens)
        loss = lambda ad, q: jq.lora.apply(model, q, tokens, targets=targets, adapters=ad, check=False)
        fwd = jax.jit(loss)
        grad = jax.jit(jax.value_and_grad(loss))

        @functools.partial(jax.jit, donate_argnums=(0, 1))  # updated in place, as a training loop does
        def step(ad, state, q):
            value, g = jax.value_and_grad(loss)(ad, q)
            updates, state = opt.update(g, state, ad)
            return optax.apply_updates(ad, updates), state, value

        state = opt.init(adapters)
        start = time.perf_counter()
        for _ in range(2):
            adapters, state, value = step(adapters, state, qparams)
        jax.block_until_ready(value)
        print(f"batch {batch}: compile + 2 steps {time.perf_counter() - start:.0f} s", flush=True)
        holder = {"ad": adapters, "st": state}

        def one():
            holder["ad"], holder["st"], v = step(holder["ad"], holder["st"], qparams)
            return v

        t_step = _timed(one, steps)
        peak = _peak_gb()
        t_fwd = t_grad = None
        if breakdown:  # two more compiles of the whole model
            fwd(holder["ad"], qparams), grad(holder["ad"], qparams)
            t_fwd = _timed(lambda: fwd(holder["ad"], qparams), steps)
            t_grad = _timed(lambda: grad(holder["ad"], qparams), steps)
        rows.append(dict(lib="jaxquant", size=size, variant=variant, batch=batch, seq=seq,
                         step_s=t_step, tokens_per_s=batch * seq / t_step, forward_s=t_fwd,
                         forward_backward_s=t_grad, update_s=None if t_grad is None else t_step - t_grad, weights_gb=weights_gb,
                         build_peak_gb=build_peak, peak_gb=peak, loss=float(value), attention=attention))
        print(json.dumps(rows[-1]), flush=True)
        adapters = holder["ad"]
    return rows


def run_qwix(size: str, batches, seq: int, steps: int) -> list[dict]:
    import optax
    import qwix
    from flax import traverse_util

    from jaxquant.models import llama
    from jaxquant.models.smollm2 import LlamaConfig

    config = LlamaConfig(**SHAPES[size], tie_embeddings=False)
    model = llama.Llama(config, dtype=jnp.bfloat16, remat=True)
    provider = qwix.LoraProvider(module_path=r".*_proj", rank=16, alpha=32.0, weight_qtype="nf4", tile_size=64)
    lora_model = qwix.apply_lora_to_model(model, provider)
    tokens0 = jnp.zeros((1, seq), jnp.int32)
    variables = jax.jit(lora_model.init)(jax.random.key(0), tokens0)
    flat = traverse_util.flatten_dict(variables["params"])
    trainable = {k: v for k, v in flat.items() if k[-1].endswith(("lora_a", "lora_b"))}
    frozen = {k: v for k, v in flat.items() if k not in trainable}
    opt = optax.adamw(1e-4)
    rows = []
    for batch in batches:
        tokens = jax.random.randint(jax.random.key(2), (batch, seq), 0, config.vocab_size)

        def loss(tr, fr):
            p = traverse_util.unflatten_dict({**tr, **fr})
            return _loss(lora_model.apply({"params": p}, tokens), tokens)

        @jax.jit
        def step(tr, state, fr):
            value, g = jax.value_and_grad(loss)(tr, fr)
            updates, state = opt.update(g, state, tr)
            return optax.apply_updates(tr, updates), state, value

        state = opt.init(trainable)
        for _ in range(2):
            trainable, state, value = step(trainable, state, frozen)
        holder = {"tr": trainable, "st": state}

        def one():
            holder["tr"], holder["st"], v = step(holder["tr"], holder["st"], frozen)
            return v

        t_step = _timed(one, steps)
        rows.append(dict(lib="qwix", size=size, variant="nf4", batch=batch, seq=seq, step_s=t_step,
                         tokens_per_s=batch * seq / t_step, peak_gb=_peak_gb()))
        print(json.dumps(rows[-1]), flush=True)
        trainable = holder["tr"]
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="8b,1b")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--variants", default="nf4+dq")
    p.add_argument("--qwix", action="store_true", help="also run qwix's QLoRA (if importable)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the forward / forward+backward "
                   "timings (two compiles fewer)")
    p.add_argument("--attention", default="xla", choices=["xla", "cudnn"], help="jaxquant's Llama "
                   "attention without a cache (cudnn: fused)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "lib:size:variant" in a child process
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.one:
        lib, size, variant = args.one.split(":")
        try:
            rows = (run_qwix(size, batches, args.seq, args.steps) if lib == "qwix"
                    else run_jaxquant(size, variant, batches, args.seq, args.steps, not args.no_breakdown,
                                      args.attention))
        except Exception as e:  # a peer that does not import or run is a missing column, not a crash
            rows = [dict(lib=lib, size=size, variant=variant, error=f"{type(e).__name__}: {e}"[:500])]
        print("ROWS " + json.dumps(rows), flush=True)
        return
    jobs = [("jaxquant", s, v) for s in args.sizes.split(",") for v in args.variants.split(",")]
    if args.qwix:
        jobs += [("qwix", s, "nf4") for s in args.sizes.split(",")]
    rows = []
    for lib, size, variant in jobs:
        cmd = [sys.executable, __file__, "--one", f"{lib}:{size}:{variant}", "--batches", args.batches,
               "--seq", str(args.seq), "--steps", str(args.steps), "--attention", args.attention] + (["--no-breakdown"] if args.no_breakdown else [])
        # the child's lines as they come (a run cut short by a time limit still shows how far it got)
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        found, tail = [], []
        for line in child.stdout:
            if line.startswith("ROWS "):
                found.append(line[5:])
            else:
                tail = (tail + [line])[-20:]
                if not line.startswith(("W0", "I0", " ")):
                    print(f"  [{lib} {size} {variant}] {line.rstrip()}", flush=True)
        child.wait()
        rows += json.loads(found[-1]) if found else [dict(lib=lib, size=size, variant=variant,
                                                          error="".join(tail)[-800:])]
        print(rows[-1], flush=True)
        _write(rows)
    print(f"{'lib':<9} {'size':<4} {'variant':<7} {'bxs':>7} {'step s':>7} {'tok/s':>7} {'fwd s':>6} "
          f"{'f+b s':>6} {'peak GB':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['lib']:<9} {r['size']:<4} {r['variant']:<7} error: {r['error'][:100]}")
            continue
        print(f"{r['lib']:<9} {r['size']:<4} {r['variant']:<7} {r['batch']}x{r['seq']:<5} {r['step_s']:>7.3f} "
              f"{r['tokens_per_s']:>7.0f} {r.get('forward_s') or float('nan'):>6.3f} "
              f"{r.get('forward_backward_s') or float('nan'):>6.3f} {r['peak_gb']:>7.2f}")


if __name__ == "__main__":
    main()
