"""The Llama port's training path on the GPU: cuDNN's fused causal attention (``attention="cudnn"``)
against XLA's, loss and adapter gradients through the NF4 + DQ base."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.models import llama
from jaxquant.models.smollm2 import LlamaConfig

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("head_dim,seq", [(128, 256), (64, 200)])
def test_fused_attention_training_equals_xla(gpu, head_dim, seq):
    config = LlamaConfig(vocab_size=1000, hidden=512, ffn=1024, layers=2, heads=8, kv_heads=2,
                         head_dim=head_dim, rope_theta=500000.0, tie_embeddings=False)
    tokens = jax.random.randint(jax.random.key(0), (2, seq), 0, config.vocab_size)
    targets = llama.next_token_targets(tokens)
    params = llama.Llama(config).init(jax.random.key(1), tokens)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if a.ndim > 1 else a, params)
    q = jq.quantize_tree(params)
    adapters = jq.lora.init(jax.random.key(2), q, rank=8)
    adapters = jax.tree.map(lambda a: a + 0.01, adapters)  # B != 0: gradients reach A too

    def grad(attention):
        model = llama.Llama(config, dtype=jnp.bfloat16, remat=True, attention=attention, loss_chunk=128)
        loss = lambda ad: jq.lora.apply(model, q, tokens, targets=targets, adapters=ad, check=False)
        return jax.jit(jax.value_and_grad(loss)), adapters

    fused, args = grad("cudnn")
    assert "cudnn" in fused.lower(args).compile().as_text()  # the fused kernel ran, not XLA's
    (v1, g1), (v2, g2) = fused(args), grad("xla")[0](args)
    np.testing.assert_allclose(v1, v2, rtol=2e-3)
    chex.assert_trees_all_close(g1, g2, rtol=5e-2, atol=2e-3 * max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g2)))
