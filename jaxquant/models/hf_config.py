"""``config.json`` of a Hugging Face Llama checkpoint <-> ``llama.LlamaConfig``.

Read as transformers v4 writes it (top-level ``rope_theta``, ``torch_dtype``) and as v5 does
(``rope_parameters``, ``dtype``); written with both spellings, so either version loads it.
``quantization_config`` is read for bitsandbytes 4-bit / 8-bit and written as transformers writes
it for them.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

import jaxquant as jq
from jaxquant.models.smollm2 import LlamaConfig

SUPPORTED = ("LlamaForCausalLM",)
_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def read(path: pathlib.Path) -> dict:
    file = path / "config.json"
    if not file.exists():
        raise jq.CheckpointError(f"{file}: missing (a Hugging Face checkpoint folder has one)")
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise jq.CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise jq.CheckpointError(f"{file}: not a JSON object")
    return raw


def _quant(raw: dict, file) -> str | None:
    q = raw.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method", "bitsandbytes")
    if method != "bitsandbytes":
        raise NotImplementedError(f"{file}: quantization_config.quant_method={method!r} is not "
                                  f"supported; jaxquant reads bitsandbytes 4-bit and 8-bit checkpoints")
    if q.get("load_in_4bit"):
        return "bnb4"
    if q.get("load_in_8bit"):
        return "bnb8"
    raise NotImplementedError(f"{file}: a bitsandbytes quantization_config with neither load_in_4bit "
                              f"nor load_in_8bit")


def config_from_hf(raw: dict, file) -> tuple[LlamaConfig, str, str | None]:
    """``(config, dtype name, quantization)`` from config.json's dict; quantization is None,
    ``"bnb4"`` or ``"bnb8"``."""
    arch = raw.get("architectures") or (["LlamaForCausalLM"] if raw.get("model_type") == "llama" else [None])
    if arch[0] not in SUPPORTED:
        raise NotImplementedError(f"{file}: architecture {arch[0]!r} (model_type "
                                  f"{raw.get('model_type')!r}) is not supported; supported: "
                                  f"{', '.join(SUPPORTED)} (Llama 2/3, SmolLM2 and the same layout)")
    for flag in ("attention_bias", "mlp_bias"):
        if raw.get(flag):
            raise NotImplementedError(f"{file}: {flag}=true is not supported by the Llama port")
    if raw.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"{file}: hidden_act={raw['hidden_act']!r}; the port has SwiGLU (silu)")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise NotImplementedError(f"{file}: rope_type={rope_type!r} is not supported (only 'default' "
                                  f"RoPE; Llama 3.1+ 'llama3' scaling is not implemented)")
    try:
        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        config = LlamaConfig(
            vocab_size=int(raw["vocab_size"]), hidden=hidden, ffn=int(raw["intermediate_size"]),
            layers=int(raw["num_hidden_layers"]), heads=heads,
            kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10000.0))),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise jq.CheckpointError(f"{file}: missing or malformed field {e}") from None
    if heads % config.kv_heads:
        raise jq.CheckpointError(f"{file}: num_attention_heads={heads} is not a multiple of "
                                 f"num_key_value_heads={config.kv_heads}")
    dtype = _DTYPES.get(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16")
    if dtype is None:
        raise NotImplementedError(f"{file}: dtype {raw.get('dtype') or raw.get('torch_dtype')!r}; "
                                  f"expected one of {sorted(_DTYPES)}")
    return config, dtype, _quant(raw, file)


def quantization_config(kind: str, *, qtype: str = "nf4", double_quant: bool = False,
                        compute_dtype: str = "bfloat16", skip: list[str] | None = None) -> dict:
    """The ``quantization_config`` transformers writes for a bitsandbytes model (``kind``
    ``"bnb4"`` or ``"bnb8"``); ``skip``: linears left in float (None: transformers' default,
    which keeps ``lm_head`` in float)."""
    four = kind == "bnb4"
    return {"_load_in_4bit": four, "_load_in_8bit": not four, "bnb_4bit_compute_dtype": compute_dtype,
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": qtype if four else "fp4",
            "bnb_4bit_use_double_quant": bool(double_quant and four),
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": skip, "llm_int8_threshold": 6.0, "load_in_4bit": four,
            "load_in_8bit": not four, "quant_method": "bitsandbytes"}


def config_to_hf(config: LlamaConfig, dtype, quantization: dict | None = None) -> dict:
    """config.json's dict for ``config`` (transformers v5 layout, plus v4's ``rope_theta``)."""
    c = config
    out = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
           "attention_dropout": 0.0, "dtype": np.dtype(dtype).name, "head_dim": c.head_dim,
           "hidden_act": "silu", "hidden_size": c.hidden, "intermediate_size": c.ffn,
           "max_position_embeddings": 8192, "mlp_bias": False, "num_attention_heads": c.heads,
           "num_hidden_layers": c.layers, "num_key_value_heads": c.kv_heads, "pretraining_tp": 1,
           "rms_norm_eps": c.rms_eps, "rope_parameters": {"rope_theta": c.rope_theta, "rope_type": "default"},
           "rope_theta": c.rope_theta, "tie_word_embeddings": c.tie_embeddings,
           "torch_dtype": np.dtype(dtype).name, "use_cache": True, "vocab_size": c.vocab_size}
    if quantization is not None:
        out["quantization_config"] = quantization
    return dict(sorted(out.items()))
