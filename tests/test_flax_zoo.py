"""Stock Flax modules (Linen and NNX), each quantized by the default policy and run under jit:
the outputs equal the dequantized model's, and the stored bytes shrink as NF4 + double quant must."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq

# nn.SelfAttention is stock Linen (deprecated in favour of the attention module it wraps)
pytestmark = pytest.mark.filterwarnings("ignore:SelfAttention will be deprecated:DeprecationWarning")

F = 128  # features: small, but a multiple of the block size like real models


def close(out, ref, tol=2e-5):
    out, ref = (out[0], ref[0]) if isinstance(out, tuple) else (out, ref)  # a scan body's (x, None)
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * float(np.abs(ref).max()))


def dequantized_state(module):
    graphdef, state = nnx.split(module)
    state = jax.tree.map(lambda a: jq.dequantize(a) if isinstance(a, jq.QArray) else a, state,
                         is_leaf=lambda a: isinstance(a, jq.QArray))
    return nnx.merge(graphdef, state)


def kernel_bytes(tree):
    """Stored bytes of the kernels (the weights of transformer blocks; biases and norms aside)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda a: isinstance(a, jq.QArray))[0]
    return sum(jq.nbytes(x) for p, x in leaves if "kernel" in jax.tree_util.keystr(p))


class LinenBlock(nn.Module):
    """Every stock Linen matmul layout: attention (q/k/v (F, h, d), out (h, d, F)), DenseGeneral
    over two axes, a head-first Einsum, an MLP."""

    @nn.compact
    def __call__(self, x, _=None):
        x = x + nn.MultiHeadDotProductAttention(num_heads=4, name="mha")(nn.LayerNorm()(x))
        x = x + nn.SelfAttention(num_heads=2, name="self")(x)
        heads = nn.DenseGeneral((4, 32), name="split")(x)
        x = x + nn.DenseGeneral(F, axis=(-2, -1), name="merge")(heads)
        x = x + nn.Einsum((4, 32, F), "bthd,hdo->bto", name="einsum")(heads)
        return x + nn.Dense(F, name="down")(jax.nn.gelu(nn.Dense(2 * F, name="up")(x))), None


class ScanBody(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        x = x + nn.MultiHeadDotProductAttention(num_heads=4, name="mha")(x)
        return x + nn.Dense(F, name="down")(jax.nn.gelu(nn.Dense(2 * F, name="up")(x))), None


class Scanned(nn.Module):
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(ScanBody) if self.remat else ScanBody
        x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=2)(name="layers")(x, None)
        return x


X = jax.random.normal(jax.random.key(1), (2, 8, F))


@pytest.mark.parametrize("model", [LinenBlock(), Scanned(), Scanned(remat=True)],
                         ids=["block", "scan", "scan_remat"])
def test_linen_transformer_blocks(model):
    params = model.init(jax.random.key(0), X)
    q = jq.quantize_tree(params, layouts=jq.flax.layouts(model, X))
    kernels = [x for p, x in jax.tree_util.tree_flatten_with_path(
        q, is_leaf=lambda a: isinstance(a, jq.QArray))[0] if "kernel" in jax.tree_util.keystr(p)]
    assert len(kernels) == (6 if isinstance(model, Scanned) else 13) and all(isinstance(x, jq.QArray) for x in kernels)
    out = jax.jit(lambda q, x: jq.flax.apply(model, q, x))(q, X)
    close(out, model.apply(jq.dequantize_tree(q), X))
    assert kernel_bytes(q) <= 0.135 * kernel_bytes(params)
    assert jq.nbytes(q) <= 0.35 * jq.nbytes(params)
    mha = q["params"]["layers" if isinstance(model, Scanned) else "mha"]
    mha = mha["mha"] if isinstance(model, Scanned) else mha
    assert mha["out"]["kernel"].axis == (0, 1) and mha["query"]["kernel"].axis == 0


def test_linen_default_policy_without_layouts_and_scan_check():
    """Without the model, contraction axes come from the shapes (the attention output is (0, 1));
    apply's check names a scanned stack quantized that way instead of failing inside the scan."""
    model = ScanBody()
    params = model.init(jax.random.key(0), X)
    q = jq.quantize_tree(params)
    assert q["params"]["mha"]["out"]["kernel"].axis == (0, 1)
    close(jax.jit(lambda q, x: jq.flax.apply(model, q, x))(q, X), model.apply(jq.dequantize_tree(q), X))
    scanned = Scanned()
    bad = jq.quantize_tree(scanned.init(jax.random.key(0), X))
    with pytest.raises(ValueError, match="layouts=jq.flax.layouts"):
        jq.flax.apply(scanned, bad, X)


class Tied(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(512, F, name="embed")
        h = nn.Conv(F, (3,), name="conv")(embed(ids))
        return embed.attend(nn.Dense(F, name="dense")(h))


def test_linen_tied_embedding_and_conv():
    model, ids = Tied(), jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 9)))
    params = model.init(jax.random.key(0), ids)
    policy = jq.Policy(rules=(jq.Rule(r"embedding$"), *jq.Policy().rules))
    q = jq.quantize_tree(params, policy, layouts=jq.flax.layouts(model, ids))
    assert q["params"]["embed"]["embedding"].axis == 1 and q["params"]["conv"]["kernel"].axis == (0, 1)
    out = jax.jit(lambda q, ids: jq.flax.apply(model, q, ids))(q, ids)
    close(out, model.apply(jq.dequantize_tree(q), ids))
    assert jq.nbytes(q) <= 0.15 * jq.nbytes(params)


class MnistMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(256)(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.5, deterministic=not train)(jax.nn.relu(x))
        return nn.Dense(10)(x)

    def features(self, x):
        return self.__call__(x)


def test_linen_mnist_mlp_training_mode_and_method():
    """784 inputs (a partial last block), 10 outputs (under min_size: float, with the reason);
    dropout rngs, batch-norm updates and method= pass through as in model.apply."""
    model, x = MnistMLP(), jax.random.normal(jax.random.key(2), (4, 28, 28))
    variables = model.init(jax.random.key(0), x)
    q = jq.quantize_tree(variables)
    assert q["params"]["Dense_0"]["kernel"].shape == (784, 256)
    rows = {r["path"]: r for r in jq.memory_report(variables, q)}
    assert rows["params/Dense_1/kernel"]["why"] == "under min_size 4096"
    kwargs = dict(train=True, rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"])
    out, updates = jax.jit(lambda q, x: jq.flax.apply(model, q, x, **kwargs))(q, x)
    ref, ref_updates = model.apply(jq.dequantize_tree(q), x, **kwargs)
    close(out, ref)
    close(updates["batch_stats"]["BatchNorm_0"]["mean"], ref_updates["batch_stats"]["BatchNorm_0"]["mean"])
    close(jq.flax.apply(model, q, x, method="features"), model.apply(jq.dequantize_tree(q), x))
    assert jq.nbytes(q["params"]) <= 0.15 * jq.nbytes(variables["params"])


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(4, F, decode=False, rngs=rngs)
        self.split = nnx.LinearGeneral(F, (4, 32), rngs=rngs)
        self.merge = nnx.LinearGeneral((4, 32), F, axis=(-2, -1), rngs=rngs)
        self.einsum = nnx.Einsum("bthd,hdo->bto", (4, 32, F), (F,), rngs=rngs)
        self.up, self.down = nnx.Linear(F, 2 * F, rngs=rngs), nnx.Linear(2 * F, F, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(x)
        heads = self.split(x)
        x = x + self.merge(heads) + self.einsum(heads)
        return x + self.down(jax.nn.gelu(self.up(x)))


class NnxModel(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(512, F, rngs=rngs)
        self.conv = nnx.Conv(F, F, (3,), rngs=rngs)
        self.block = NnxBlock(rngs)

    def __call__(self, ids):
        return self.embed.attend(self.block(self.conv(self.embed(ids))))


def test_nnx_stock_modules():
    model, ids = NnxModel(nnx.Rngs(0)), jnp.asarray(np.random.default_rng(0).integers(0, 512, (2, 8)))
    float_bytes = jq.nbytes(nnx.state(model.block, nnx.Param))
    jq.flax.quantize_module(model, jq.Policy(rules=(jq.Rule(r"embedding$"), *jq.Policy().rules)))
    for layer in (model.block.attn.out, model.block.split, model.block.einsum, model.conv, model.embed):
        assert isinstance(layer, nnx.Module) and type(layer).__name__.startswith("Quantized")
    assert isinstance(model.block.up, jq.flax.QLinear)
    assert model.block.attn.out.kernel.axis == (0, 1) and model.block.attn.query.kernel.axis == 0
    out = nnx.jit(lambda m, ids: m(ids))(model, ids)
    close(out, dequantized_state(model)(ids))
    assert jq.nbytes(model.block) <= 0.35 * float_bytes  # the module itself, as a pytree
    rows = {r["path"]: r for r in jq.memory_report(model)}
    assert rows["block/attn/out/kernel"]["qtype"] == "nf4"
    assert rows["block/attn/out/bias"]["why"] == "no rule matches"


def test_nnx_scan_over_vmapped_layers():
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return NnxBlock(nnx.Rngs(key))

    stack = make(jax.random.split(jax.random.key(0), 2))
    float_bytes = jq.nbytes(stack)
    jq.flax.quantize_module(stack)
    assert stack.attn.out.kernel.shape == (4, 32, F) and stack.attn.out.kernel.codes.shape[0] == 2
    assert stack.up.kernel.scale.offset.shape == (2,)  # double quantization's constants per layer

    @nnx.jit
    def run(stack, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)
        return body(x, stack)

    close(run(stack, X), run(dequantized_state(stack), X))
    assert jq.nbytes(stack) <= 0.35 * float_bytes


def test_attention_out_projection_lowers_to_the_hopper_kernel(monkeypatch):
    """The out projection (heads, head_dim, features) is one 2-D qmatmul: lowered for CUDA with a
    Hopper present, it is the Mosaic GPU kernel (experiments/check_flax_kernel_gpu.py checks the
    compiled HLO on the GPU machine)."""
    from jaxquant._src.kernels import platform
    monkeypatch.setattr(platform, "hopper_present", lambda: True)
    model = nn.MultiHeadDotProductAttention(num_heads=8, dtype=jnp.bfloat16)
    x = jnp.ones((1, 16, 1024), jnp.bfloat16)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    q = jq.quantize_tree(params, jq.Policy(rules=(jq.Rule(r"out/kernel$"),)))
    text = jax.jit(lambda q, x: jq.flax.apply(model, q, x, check=False)).trace(q, x).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
