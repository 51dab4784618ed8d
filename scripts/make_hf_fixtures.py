"""Write the tiny Hugging Face Llama checkpoints that tests/test_hf.py reads (tests/data/hf_tiny/).

Runs with torch + transformers + bitsandbytes (+ accelerate), on a CUDA GPU or on the CPU
(bitsandbytes >= 0.49 has a CPU backend for 4-bit and 8-bit):

    python scripts/make_hf_fixtures.py tests/data/hf_tiny [--device cuda|cpu]

Writes, for a randomly initialized LlamaForCausalLM (hidden 128, 2 layers, 4 heads of 32, 2 KV
heads, SwiGLU 256, vocab 256, untied LM head, seed 0):
  float/       bf16 safetensors as transformers saves them, sharded (model.safetensors.index.json)
  nf4_dq/      BitsAndBytesConfig(load_in_4bit, nf4, double quant, bf16 compute)
  fp4/         BitsAndBytesConfig(load_in_4bit, fp4, no double quant, bf16 compute)
  int8/        BitsAndBytesConfig(load_in_8bit)
and in each folder ``reference.npz``: ``tokens`` (2, 8) int32, transformers' ``logits`` (float32)
of the model as it was saved (bf16 compute), and for every quantized linear
``sha256/<module>``: the sha256 of bitsandbytes' own dequantized weight (float32, (out, in),
C order, zeros made +0), and that weight itself for ``FULL``. Both are taken from the checkpoint
as transformers loads it back, before any forward pass. ``meta.json`` records the versions and the device.
Everything is small (under 2 MB in all).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import pathlib
import platform
import shutil

import numpy as np
import torch

VARIANTS = {
    "nf4_dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
    "int8": dict(load_in_8bit=True),
}
FULL = "model.layers.0.self_attn.k_proj"  # the one weight whose dequantization is kept whole


def tiny_config():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                       tie_word_embeddings=False, initializer_range=0.05,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def bnb_dequant(module) -> np.ndarray:
    """bitsandbytes' own dequantization of a Linear4bit / Linear8bitLt weight, float32 (out, in)."""
    import bitsandbytes as bnb
    w = module.weight
    if isinstance(module, bnb.nn.Linear4bit):
        state = copy.copy(w.quant_state)
        state.dtype = torch.float32  # the float32 products, before the one cast to bf16
        return bnb.functional.dequantize_4bit(w.data, state).cpu().numpy()
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = module.state.SCB
    return bnb.functional.int8_vectorwise_dequant(w.data, scb).float().cpu().numpy()


def reference(model, tokens, device) -> dict[str, np.ndarray]:
    import bitsandbytes as bnb
    out = {"tokens": tokens}
    # before the forward: bitsandbytes' CPU backend repacks 4-bit weights in place on first use
    for name, module in model.named_modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            # + 0.0 turns -0.0 into +0.0: bitsandbytes' CPU dequantize gives +0 for FP4's code 8
            # (-0), jaxquant -0; the sign of a zero weight changes no product that matters
            w = np.ascontiguousarray(bnb_dequant(module) + np.float32(0), np.float32)
            out[f"sha256/{name}"] = np.array(hashlib.sha256(w.tobytes()).hexdigest())
            if name == FULL:
                out[f"dequant/{name}"] = w
    with torch.no_grad():
        out["logits"] = model(torch.as_tensor(tokens, device=device)).logits.float().cpu().numpy()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=pathlib.Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    import bitsandbytes
    import transformers
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

    out = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    torch.manual_seed(0)
    tokens = np.random.default_rng(0).integers(0, 256, (2, 8)).astype(np.int32)
    model = LlamaForCausalLM(tiny_config()).to(torch.bfloat16).eval()
    # max_shard_size: the float checkpoint is sharded as transformers shards a large model
    model.save_pretrained(out / "float", max_shard_size="300KB")
    (out / "float" / "generation_config.json").unlink(missing_ok=True)  # not read; keeps it small
    del model

    def load(folder, **kwargs):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map={"": args.device},
                                                    attn_implementation="eager", **kwargs).eval()

    for name, kwargs in VARIANTS.items():
        model = load(out / "float", quantization_config=BitsAndBytesConfig(
            **kwargs, bnb_4bit_compute_dtype=torch.bfloat16))
        model.save_pretrained(out / name)
        (out / name / "generation_config.json").unlink(missing_ok=True)
        del model
    for name in ("float", *VARIANTS):
        # the reference is each checkpoint as transformers loads it back: on the CPU, bitsandbytes
        # keeps freshly quantized 4-bit weights in memory in a repacked layout of its own
        np.savez_compressed(out / name / "reference.npz", **reference(load(out / name), tokens, args.device))

    meta = dict(device=args.device if args.device == "cpu" else torch.cuda.get_device_name(),
                torch=torch.__version__, transformers=transformers.__version__,
                bitsandbytes=bitsandbytes.__version__, python=platform.python_version(),
                script="scripts/make_hf_fixtures.py", seed=0,
                note="logits: transformers' forward of each saved model, bf16 compute, on `device`")
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB): {sorted(str(f.relative_to(out)) for f in out.rglob('*') if f.is_file())}")
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
