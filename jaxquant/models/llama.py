"""A Flax Linen Llama-architecture decoder (SmolLM2-135M's, Llama 2/3's), for real-model work.

Plain Linen layers (``nn.Dense``, ``nn.Embed``), so ``jaxquant.flax.apply`` runs it quantized
without edits. RMSNorm in float32, RoPE in the rotate-half layout, grouped-query attention,
SwiGLU MLP; the LM head is the input embedding (``config.tie_embeddings``) or its own Dense
``lm_head``. ``tokenizer`` builds SmolLM2's byte-level BPE from the GGUF's vocab and merges;
``jaxquant.models.hf`` reads and writes Hugging Face checkpoints of this model.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.models.smollm2 import LlamaConfig


class RMSNorm(nn.Module):
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = scale.reshape((1,) * (x.ndim - 1) + (-1,))
        return scale.astype(x.dtype) * y.astype(x.dtype)  # params may be float32 (init) under bf16


def rope(x, positions, theta: float):
    """Rotate-half RoPE on ``x[..., seq, heads, head_dim]``."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (np.arange(0, half, dtype=np.float32) * 2 / x.shape[-1]))
    freqs = positions[..., :, None].astype(jnp.float32) * inv_freq.reshape(
        (1,) * positions.ndim + (-1,))  # (..., seq, half)
    cos = jnp.concatenate([jnp.cos(freqs)] * 2, -1)[..., :, None, :]
    sin = jnp.concatenate([jnp.sin(freqs)] * 2, -1)[..., :, None, :]
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class Attention(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x, positions, cache=None):
        """``cache=(k, v)`` of shape (batch, max_len, kv_heads, head_dim): the new keys and values
        are written at ``positions`` and attention runs over the whole cache (causally).

        ``implementation="cudnn"``: without a cache (prefill, training), cuDNN's fused causal
        attention (``jax.nn.dot_product_attention``; bf16/fp16 on an NVIDIA GPU), which never
        holds the (heads, seq, seq) scores; ``"xla"``: the scores in float32, plain XLA."""
        if self.implementation not in ("xla", "cudnn"):
            raise ValueError(f"attention implementation must be 'xla' or 'cudnn', got {self.implementation!r}")
        c = self.config
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype, name=name)
        b, s, _ = x.shape
        q = dense(c.heads * c.head_dim, "q_proj")(x).reshape(b, s, c.heads, c.head_dim)
        k = dense(c.kv_heads * c.head_dim, "k_proj")(x).reshape(b, s, c.kv_heads, c.head_dim)
        v = dense(c.kv_heads * c.head_dim, "v_proj")(x).reshape(b, s, c.kv_heads, c.head_dim)
        q, k = rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta)
        if cache is None and self.implementation == "cudnn":
            out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), is_causal=True,
                                               implementation="cudnn")
            return dense(c.hidden, "o_proj")(out.reshape(b, s, c.heads * c.head_dim)), None
        key_positions = positions
        if cache is not None:
            start = positions[0, 0]
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, start, 0, 0))
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, start, 0, 0))
            cache = (k, v)
            key_positions = jnp.arange(k.shape[1])[None]
        groups = c.heads // c.kv_heads
        kk, vv = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, kk.astype(q.dtype)).astype(jnp.float32)
        logits = logits / np.sqrt(c.head_dim)
        causal = key_positions[:, None, :] <= positions[:, :, None]  # (1, q, k)
        logits = jnp.where(causal[:, None], logits, -1e30)
        probs = jax.nn.softmax(logits, axis=-1).astype(x.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, vv.astype(x.dtype)).reshape(b, s, c.heads * c.head_dim)
        return dense(c.hidden, "o_proj")(out), cache


class MLP(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype, name=name)
        return dense(self.config.hidden, "down_proj")(
            jax.nn.silu(dense(self.config.ffn, "gate_proj")(x)) * dense(self.config.ffn, "up_proj")(x))


class Block(nn.Module):
    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x, positions, cache=None):
        c = self.config
        h, cache = Attention(c, self.dtype, self.attention, name="self_attn")(
            RMSNorm(c.rms_eps, name="input_layernorm")(x), positions, cache)
        x = x + h
        return x + MLP(c, self.dtype, name="mlp")(RMSNorm(c.rms_eps, name="post_attention_layernorm")(x)), cache


class Llama(nn.Module):
    """``Llama(config)(tokens) -> logits`` (float32), tokens ``(batch, seq)``.

    With ``cache`` (from ``init_cache``) and ``start`` (the position of ``tokens[:, 0]``), returns
    ``(logits, cache)``: the KV cache for incremental decoding. ``remat=True`` recomputes each
    block in the backward pass (gradient checkpointing per block, for training).

    With ``targets`` (ints shaped like ``tokens``; negative ones are ignored; one at or above the
    vocabulary size raises, or under jit makes the loss NaN), returns the mean negative
    log-likelihood of the targets, float32, instead of the logits. The head and the
    log-softmax run on ``loss_chunk`` tokens at a time, each chunk recomputed in the backward
    pass, so the full ``(batch, seq, vocab)`` logits never exist: at Llama-3's vocabulary they
    are 2.1 GB in float32 at 4x1024 tokens, more than the 4-bit weights of a 1B model. The
    causal-LM loss is ``targets = next_token_targets(tokens)``.

    ``attention="cudnn"`` runs training and prefill attention fused (``Attention``; its bf16
    gradients are as close to float32 as XLA's on the H200, tests/gpu/test_llama_gpu.py; its speed
    is not measured); decoding with a cache attends in plain XLA either way.
    """

    config: LlamaConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    loss_chunk: int = 512
    attention: str = "xla"

    @nn.compact
    def __call__(self, tokens, cache=None, start=0, targets=None):
        c = self.config
        embed = nn.Embed(c.vocab_size, c.hidden, dtype=self.dtype, name="embed_tokens")
        x = embed(tokens)
        positions = start + jnp.arange(tokens.shape[-1])[None]
        new_cache = []
        block = nn.remat(Block) if self.remat else Block
        for i in range(c.layers):
            x, layer_cache = block(c, self.dtype, self.attention, name=f"layers_{i}")(
                x, positions, None if cache is None else cache[i])
            new_cache.append(layer_cache)
        x = RMSNorm(c.rms_eps, name="norm")(x)
        if c.tie_embeddings:
            head = embed.attend
        else:
            head = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype, name="lm_head")
        if targets is not None:
            if cache is not None:
                raise ValueError("targets= computes a training loss; it takes no cache")
            if targets.shape != tokens.shape:
                raise ValueError(f"targets {targets.shape} must be shaped like tokens {tokens.shape}")
            if not jnp.issubdtype(targets.dtype, jnp.integer):
                raise TypeError(f"targets must be integers, got {targets.dtype}")
            if not isinstance(targets, jax.core.Tracer) and targets.size:  # traced: NaN tells
                top = int(np.asarray(targets).max())
                if top >= c.vocab_size:
                    raise ValueError(f"targets must be < vocab_size={c.vocab_size}, got {top}")
            targets = targets.astype(jnp.int32)  # unsigned ones would hide the -1 that means "ignored"
            if self.is_initializing():
                head(x[:, :1])  # its params are made here, outside the recomputed chunks
            return _chunked_nll(self, head, x, targets, self.loss_chunk)
        logits = head(x).astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)


def _chunked_nll(module: nn.Module, head, x, targets, chunk: int):
    """Mean -log p(target) over the non-negative targets, ``chunk`` tokens at a time: a scan
    (the head's gradient accumulates in one buffer) over chunks recomputed in the backward pass."""
    if chunk < 1:
        raise ValueError(f"loss_chunk must be >= 1, got {chunk}")
    x = x.reshape(-1, x.shape[-1])
    targets = targets.reshape(-1)
    pad = -len(x) % chunk  # the last chunk padded with ignored targets
    xs = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, x.shape[-1])
    ts = jnp.pad(targets, (0, pad), constant_values=-1).reshape(-1, chunk)

    def chunk_nll(_, total, chunk_in):
        xc, tc = chunk_in
        logp = jax.nn.log_softmax(head(xc).astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, jnp.maximum(tc, 0)[:, None], axis=-1)[:, 0]
        return total - jnp.sum(jnp.where(tc >= 0, picked, 0.0)), None

    scan = nn.scan(nn.remat(chunk_nll), variable_broadcast="params", split_rngs={"params": False})
    total, _ = scan(module, jnp.zeros((), jnp.float32), (xs, ts))
    return total / jnp.maximum(jnp.sum(targets >= 0), 1).astype(jnp.float32)


def next_token_targets(tokens):
    """The causal-LM targets for ``Llama(...)(tokens, targets=...)``: each position's next token,
    -1 (ignored) at the last.

    Example:
      >>> next_token_targets(jnp.array([[5, 6, 7]])).tolist()
      [[6, 7, -1]]
    """
    tokens = jnp.asarray(tokens).astype(jnp.int32)  # -1 must stay -1 (unsigned tokens)
    return jnp.concatenate([tokens[:, 1:], jnp.full_like(tokens[:, :1], -1)], axis=1)


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.float32):
    shape = (batch, max_len, config.kv_heads, config.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.layers)]


def generate(apply_fn, params, prompt, steps: int, config: LlamaConfig, dtype=jnp.float32):
    """Greedy decoding: ``apply_fn(params, tokens, cache, start) -> (logits, cache)``.

    The prompt fills the cache in one call; then one token per step in a ``lax.scan``. Jit it with
    ``steps`` static. Returns the ``steps`` new tokens ``(batch, steps)``.
    """
    batch, length = prompt.shape
    cache = init_cache(config, batch, length + steps, dtype)
    logits, cache = apply_fn(params, prompt, cache, 0)
    first = jnp.argmax(logits[:, -1], -1)

    def step(carry, i):
        token, cache = carry
        logits, cache = apply_fn(params, token[:, None], cache, length + i)
        nxt = jnp.argmax(logits[:, -1], -1)
        return (nxt, cache), token

    (_, _), tokens = jax.lax.scan(step, (first, cache), jnp.arange(steps))
    return tokens.T


def params_from_weights(weights: dict[str, np.ndarray]) -> dict:
    """``smollm2.load``'s flat weights -> this model's Linen param tree."""
    params = {"embed_tokens": {"embedding": weights["embed_tokens"]}, "norm": {"scale": weights["norm"]}}
    for name, w in weights.items():
        if not name.startswith("layers."):
            continue
        _, i, *rest = name.split(".")
        node = params.setdefault(f"layers_{i}", {})
        for part in rest[:-1]:
            node = node.setdefault(part, {})
        node[rest[-1]] = {"kernel" if w.ndim == 2 else "scale": w}
    return {"params": jax.tree.map(jnp.asarray, params)}


def tokenizer(path=None):
    """SmolLM2's byte-level BPE (llama.cpp's 'smollm' pre-tokenizer: digits split, GPT-2 regex)."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from jaxquant.models.smollm2 import gguf_path

    reader = gguf.GGUFReader(path or gguf_path())
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    return tok


def perplexity(forward, params, ids, window: int = 1024) -> float:
    """exp(mean NLL) over non-overlapping ``window``-token windows, every position predicted
    (no BOS); ``forward(params, tokens[1, window]) -> logits``."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - window + 1, window):
        w = jnp.asarray(ids[start:start + window])
        logp = jax.nn.log_softmax(forward(params, w[None])[0, :-1], -1)
        total += float(-jnp.take_along_axis(logp, w[1:, None], -1).sum())
        count += window - 1
    return float(np.exp(total / count))
