"""NNX modules quantized by surgery: same outputs as with the dequantized weights, under nnx.jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(100, 128, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(128, 256, rngs=rngs), nnx.Linear(256, 128, rngs=rngs)])
        self.norm = nnx.LayerNorm(128, rngs=rngs)
        self.head = nnx.Linear(128, 8, rngs=rngs)  # 1024 elements: under min_size, kept

    def __call__(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = jax.nn.gelu(layer(h))
        return self.head(self.norm(h))


def test_quantize_module_matches_dequantized_module():
    model = MLP(nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 100, (3, 5)))
    float_out = model(ids)
    model = jq.flax.quantize_module(model)
    assert isinstance(model.layers[0], jq.flax.QLinear) and isinstance(model.layers[1].kernel, jq.QArray)
    assert isinstance(model.head, nnx.Linear)  # small: left alone
    out = nnx.jit(lambda m, x: m(x))(model, ids)
    # the reference: the same module with each QLinear replaced by its dequantized Linear
    ref_model = nnx.clone(model)
    for i in range(2):
        ref_model.layers[i] = ref_model.layers[i].dequantized()
    ref = ref_model(ids)
    np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5 * float(jnp.abs(ref).max()))
    assert float(jnp.linalg.norm(out - float_out) / jnp.linalg.norm(float_out)) < 0.3
    # the QArray is module state: its codes are state leaves (uint8), and split/merge rebuilds it
    paths = {tuple(getattr(k, "key", k) for k in p): x
             for p, x in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]}
    assert paths[("layers", 0, "kernel", "codes")].dtype == jnp.uint8
    graphdef, state = nnx.split(model)
    assert isinstance(nnx.merge(graphdef, state).layers[0].kernel, jq.QArray)


def test_policy_paths_and_other_axes():
    model = MLP(nnx.Rngs(0))
    jq.flax.quantize_module(model, jq.Policy(rules=(jq.Rule(r"layers/1/kernel$", "int8", 128),)))
    assert isinstance(model.layers[0], nnx.Linear) and model.layers[1].kernel.qtype == "int8"
    # blocks along the output axis: no qmatmul, the layer's own code on the dequantized kernel
    model = MLP(nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 100, (3, 5)))
    jq.flax.quantize_module(model, jq.Policy(rules=(jq.Rule("layers/0", axis=1),)))
    assert type(model.layers[0]).__name__ == "QuantizedLinear" and model.layers[0].kernel.axis == 1
    ref = nnx.clone(model)
    ref.layers[0] = nnx.Linear(128, 256, rngs=nnx.Rngs(0))
    ref.layers[0].kernel[...] = jq.dequantize(model.layers[0].kernel)
    ref.layers[0].bias[...] = model.layers[0].bias[...]
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(model, ids), ref(ids), rtol=2e-5, atol=2e-5)


def test_nbytes_and_report_on_modules_and_states():
    model = MLP(nnx.Rngs(0))
    float_state = nnx.clone(nnx.state(model))
    jq.flax.quantize_module(model)
    assert jq.nbytes(model) == jq.nbytes(nnx.state(model)) < jq.nbytes(float_state)
    rows = {r["path"]: r for r in jq.memory_report(float_state, nnx.state(model))}
    assert rows["layers/0/kernel"]["qtype"] == "quantized"
    assert rows["layers/0/kernel"]["bytes_after"] == jq.nbytes(model.layers[0].kernel)
    rows = {r["path"]: r for r in jq.memory_report(model)}
    assert rows["layers/0/kernel"]["qtype"] == "nf4" and rows["layers/0/kernel"]["bytes_before"] == 128 * 256 * 4
    assert rows["head/kernel"]["why"] == "under min_size 4096"
    assert rows["embed/embedding"]["why"] == "no rule matches"
