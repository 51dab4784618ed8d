"""The Llama port's training path on the GPU: cuDNN's fused causal attention (``attention="cudnn"``)
against XLA's, loss and adapter gradients through the NF4 + DQ base, both in bfloat16 and both
measured against a float32 reference (two bf16 paths differ by rounding, not by a bound)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.models import llama
from jaxquant.models.smollm2 import LlamaConfig

pytestmark = pytest.mark.gpu


def _relative_errors(g, ref):
    """Per adapter leaf: ||g - ref|| / ||ref||."""
    errs = jax.tree.map(lambda a, b: jnp.linalg.norm(a - b) / jnp.linalg.norm(b), g, ref)
    return {jax.tree_util.keystr(p): float(e) for p, e in jax.tree_util.tree_flatten_with_path(errs)[0]}


@pytest.mark.parametrize("head_dim,seq", [(128, 256), (64, 200)])
def test_fused_attention_training_matches_xla_against_float32(gpu, head_dim, seq):
    config = LlamaConfig(vocab_size=1000, hidden=512, ffn=1024, layers=2, heads=8, kv_heads=2,
                         head_dim=head_dim, rope_theta=500000.0, tie_embeddings=False)
    tokens = jax.random.randint(jax.random.key(0), (2, seq), 0, config.vocab_size)
    targets = llama.next_token_targets(tokens)
    params = llama.Llama(config).init(jax.random.key(1), tokens)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.ndim > 1 else a, params)
    q = jq.quantize_tree(params)
    adapters = jq.lora.init(jax.random.key(2), q, rank=8)
    # random B (not a constant): a constant B makes dA a sum over outputs that cancels to noise
    keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(adapters))))
    adapters = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(next(keys), a.shape, a.dtype), adapters)

    def value_and_grad(attention, dtype):
        model = llama.Llama(config, dtype=dtype, remat=True, attention=attention, loss_chunk=128)
        loss = lambda ad: jq.lora.apply(model, q, tokens, targets=targets, adapters=ad, check=False)
        return jax.jit(jax.value_and_grad(loss))

    fused = value_and_grad("cudnn", jnp.bfloat16)
    assert "cudnn" in fused.lower(adapters).compile().as_text()  # the fused kernel ran, not XLA's
    (v_ref, g_ref) = value_and_grad("xla", jnp.float32)(adapters)
    (v_xla, g_xla) = value_and_grad("xla", jnp.bfloat16)(adapters)
    (v_cudnn, g_cudnn) = fused(adapters)
    np.testing.assert_allclose(v_cudnn, v_ref, rtol=1e-2)
    err_xla, err_cudnn = _relative_errors(g_xla, g_ref), _relative_errors(g_cudnn, g_ref)
    worst = {k: (err_cudnn[k], err_xla[k]) for k in sorted(err_xla) if err_cudnn[k] > max(2 * err_xla[k], 0.03)}
    assert not worst, f"cuDNN's bf16 gradients further from float32 than XLA's bf16 (cudnn, xla): {worst}"
    assert max(err_cudnn.values()) < 0.1, err_cudnn
