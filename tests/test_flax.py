"""Linen models running on quantized params: same outputs as on the dequantized params."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq


class Block(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(512, 128, name="embed")
        h = embed(ids)
        h = nn.LayerNorm()(h)
        q = nn.DenseGeneral((4, 32), name="q")(h)  # kernel (128, 4, 32): contraction on axis 0
        o = nn.DenseGeneral(128, axis=(-2, -1), name="o")(q)  # kernel (4, 32, 128)
        e = nn.Einsum((128, 256), "btd,dh->bth", name="einsum")(o)
        h = nn.Dense(128, name="down")(jax.nn.gelu(e))
        return embed.attend(h)


@pytest.fixture
def model_and_params():
    model = Block()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 7)))
    return model, model.init(jax.random.key(0), ids), ids


POLICY = jq.Policy(rules=(jq.Rule(r"o/kernel$", qtype="nf4", axis=1, block_size=32),
                          jq.Rule(r"embedding$", "nf4", 64, axis=1),
                          jq.Rule(r"kernel$")), min_size=1024)


def test_linen_apply_matches_dequantized_params(model_and_params):
    model, params, ids = model_and_params
    q = jq.quantize_tree(params, POLICY)
    assert all(isinstance(q["params"][n]["kernel"], jq.QArray) for n in ("q", "o", "einsum", "down"))
    assert isinstance(q["params"]["embed"]["embedding"], jq.QArray)
    ref = model.apply(jq.dequantize_tree(q), ids)
    out = jq.flax.apply(model, q, ids)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5 * float(jnp.abs(ref).max()))
    jitted = jax.jit(lambda q, ids: jq.flax.apply(model, q, ids, check=False))(q, ids)
    np.testing.assert_allclose(jitted, ref, rtol=2e-5, atol=2e-5 * float(jnp.abs(ref).max()))
    # and it approximates the float model: 5 NF4 layers at ~0.09 relative error each compound to
    # about sqrt(5) * 0.09 = 0.2 on random weights; far off would mean a wrong layer
    full = model.apply(params, ids)
    assert float(jnp.linalg.norm(out - full) / jnp.linalg.norm(full)) < 0.35


class Stack(nn.Module):
    layers: int = 6

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = jnp.tanh(nn.Dense(1024, use_bias=False, name=f"d{i}")(x))
        return x


def test_jit_does_not_materialize_all_float_weights():
    model = Stack()
    x = jnp.ones((4, 1024), jnp.float32)
    params = model.init(jax.random.key(0), x)
    q = jq.quantize_tree(params)
    compiled = jax.jit(lambda q, x: jq.flax.apply(model, q, x, check=False)).lower(q, x).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    float_weights = 6 * 1024 * 1024 * 4
    assert temp < float_weights / 2, (temp, float_weights)


def test_mismatched_tree_names_the_path(model_and_params):
    model, params, ids = model_and_params
    q = jq.quantize_tree(params, POLICY)
    bad = jax.tree.map(lambda x: x, q, is_leaf=lambda x: isinstance(x, jq.QArray))
    bad["params"]["down"]["bias"] = jnp.zeros((64,))
    with pytest.raises(ValueError, match=r"'params/down/bias' has shape \(64,\)"):
        jq.flax.apply(model, bad, ids)
    del bad["params"]["down"]
    with pytest.raises(ValueError, match="lacks 'params/down/bias'"):
        jq.flax.apply(model, bad, ids)
