"""Adapters trained here, loaded by torch + peft: same logits as jaxquant's LoRA model.

    python experiments/check_peft_gpu.py      # needs torch, transformers and peft (the GPU machine)
A tiny Llama (the port's layout) with random float weights and random non-zero adapters:
``jq.lora.to_peft`` writes the adapter folder, ``PeftModel.from_pretrained`` loads it onto a
``LlamaForCausalLM`` holding the same base weights, and the logits are compared with the port's
(float32, base not quantized, so only the adapter format is tested).
"""

from __future__ import annotations

import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # this checkout's jaxquant

import jaxquant as jq  # noqa: E402
from jaxquant.models import llama  # noqa: E402
from jaxquant.models.smollm2 import LlamaConfig  # noqa: E402

CONFIG = LlamaConfig(vocab_size=256, hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, head_dim=16)


def main():
    import torch
    from peft import PeftModel
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    model = llama.Llama(CONFIG)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, CONFIG.vocab_size)
    params = model.init(jax.random.key(1), tokens)
    shapes = jq.quantize_tree(params, jq.Policy(min_size=1024))
    adapters = jq.lora.init(jax.random.key(2), shapes, rank=4, alpha=8.0)
    adapters = {k: jq.lora.Adapter(a.a, 0.1 * jax.random.normal(jax.random.key(i), a.b.shape), a.alpha)
                for i, (k, a) in enumerate(adapters.items())}
    # float32 on both sides: a GPU's default JAX matmul precision is TF32 (5e-3 off torch's CPU)
    with jq.lora.intercept(adapters), jax.default_matmul_precision("highest"):
        want = np.asarray(model.apply(params, tokens))

    hf = LlamaForCausalLM(HFConfig(
        vocab_size=CONFIG.vocab_size, hidden_size=CONFIG.hidden, intermediate_size=CONFIG.ffn,
        num_hidden_layers=CONFIG.layers, num_attention_heads=CONFIG.heads,
        num_key_value_heads=CONFIG.kv_heads, head_dim=CONFIG.head_dim, rms_norm_eps=CONFIG.rms_eps,
        rope_theta=CONFIG.rope_theta, tie_word_embeddings=True, attention_bias=False, mlp_bias=False))
    p = jax.tree.map(np.asarray, params["params"])
    state = {"model.embed_tokens.weight": p["embed_tokens"]["embedding"], "model.norm.weight": p["norm"]["scale"]}
    for i in range(CONFIG.layers):
        block = p[f"layers_{i}"]
        state[f"model.layers.{i}.input_layernorm.weight"] = block["input_layernorm"]["scale"]
        state[f"model.layers.{i}.post_attention_layernorm.weight"] = block["post_attention_layernorm"]["scale"]
        for group in ("self_attn", "mlp"):
            for name, leaf in block[group].items():
                state[f"model.layers.{i}.{group}.{name}.weight"] = leaf["kernel"].T
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})
    with tempfile.TemporaryDirectory() as tmp:
        jq.lora.to_peft(tmp, adapters)
        peft_model = PeftModel.from_pretrained(hf, tmp).eval()
        with torch.no_grad():
            got = peft_model(torch.from_numpy(np.asarray(tokens)).long()).logits.numpy()
    err = float(np.abs(got - want).max())
    print(f"max |peft logits - jaxquant logits| = {err:.2e} (logits up to {np.abs(want).max():.2f})")
    assert err < 1e-3, err
    print("OK: peft loads jaxquant's adapters and gives the same logits")


if __name__ == "__main__":
    main()
