"""QLoRA: adapters on a frozen quantized base (jaxquant.lora), Linen and NNX, I/O, memory."""

import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant._src import matmul_grad
from jaxquant._src.matmul_grad import matmul_transposed
from jaxquant._src.matmul_xla import qmatmul_xla_grad_x
from jaxquant.models import llama
from jaxquant.models.smollm2 import LlamaConfig


# optax's bias correction raises a float to an int32 step count: standard promotion for it only
OPTAX_PROMOTION = jax.numpy_dtype_promotion("standard")


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(64, name="down")(nn.gelu(nn.Dense(128, name="up")(x)))


@pytest.fixture(scope="module")
def mlp():
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (16, 64))
    params = model.init(jax.random.key(1), x)
    return model, params, jq.quantize_tree(params), x


def _trained_like(adapters, seed=7):
    """Adapters with a non-zero b, as after training (a fresh b = 0 would hide errors)."""
    keys = jax.random.split(jax.random.key(seed), len(adapters))
    return {name: jq.lora.Adapter(ad.a, 0.05 * jax.random.normal(k, ad.b.shape), ad.alpha)
            for k, (name, ad) in zip(keys, adapters.items())}


def _bytes(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def test_init_shapes_scale_and_zero_b(mlp):
    _, _, q, _ = mlp
    adapters = jq.lora.init(jax.random.key(0), q, rank=4, alpha=8.0)
    assert sorted(adapters) == ["params/down/kernel", "params/up/kernel"]
    up = adapters["params/up/kernel"]
    assert up.a.shape == (64, 4) and up.b.shape == (4, 128) and up.a.dtype == jnp.float32
    assert up.scale == 2.0 and not np.any(np.asarray(up.b))
    assert 0 < float(jnp.abs(up.a).max()) <= 1 / np.sqrt(64)  # PEFT's kaiming-uniform bound
    only = jq.lora.init(jax.random.key(0), q, rank=4, pattern="up/")
    assert list(only) == ["params/up/kernel"]


def test_init_errors(mlp):
    _, _, q, _ = mlp
    with pytest.raises(ValueError, match="positive int"):
        jq.lora.init(jax.random.key(0), q, rank=0)
    with pytest.raises(ValueError, match=r"rank=65 is larger than 'params/down/kernel' allows.*128 x 64"):
        jq.lora.init(jax.random.key(0), q, rank=65)
    with pytest.raises(jq.lora.AdapterError, match="matches no quantized kernel"):
        jq.lora.init(jax.random.key(0), q, pattern="attention")
    with pytest.raises(TypeError, match="float dtype"):
        jq.lora.init(jax.random.key(0), q, dtype=jnp.int32)


def test_adapters_that_do_not_fit_the_tree(mlp):
    model, _, q, x = mlp
    adapters = jq.lora.init(jax.random.key(0), q, rank=4)
    wrong = dict(adapters, **{"params/up/kernel": jq.lora.Adapter(jnp.zeros((32, 4)), jnp.zeros((4, 128)))})
    with pytest.raises(jq.lora.AdapterError, match=r"'params/up/kernel' has a\(32, 4\)"):
        jq.lora.merge(q, wrong)
    with pytest.raises(jq.lora.AdapterError, match="'params/side/kernel' has no quantized kernel"):
        jq.lora.apply(model, q, x, adapters=dict(adapters, **{"params/side/kernel": adapters["params/up/kernel"]}))


def test_lora_matmul_is_the_formula(rng):
    w = jnp.asarray(rng.standard_normal((128, 64)), jnp.float32)
    q = jq.quantize(w, "nf4", 64, axis=0, double_quant=True)
    x = jnp.asarray(rng.standard_normal((5, 128)), jnp.float32)
    a = jnp.asarray(rng.standard_normal((128, 4)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
    y = jq.lora.lora_matmul(x, q, a, b, 0.5, compute_dtype=jnp.float32)
    want = x @ jq.dequantize(q) + 0.5 * (x @ a) @ b
    np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)
    dropped = jq.lora.lora_matmul(x, q, a, b, 0.5, compute_dtype=jnp.float32, rate=0.5,
                                  dropout_rng=jax.random.key(3))
    assert not np.allclose(dropped, y)
    with pytest.raises(ValueError, match="dropout rate"):
        jq.lora.lora_matmul(x, q, a, b, 0.5, rate=1.0, dropout_rng=jax.random.key(3))


def test_apply_with_lora_equals_apply_of_merge(mlp):
    model, _, q, x = mlp
    adapters = _trained_like(jq.lora.init(jax.random.key(0), q, rank=4, alpha=8.0))
    got = jax.jit(lambda q, ad, x: jq.lora.apply(model, q, x, adapters=ad))(q, adapters, x)
    want = model.apply(jq.lora.merge(q, adapters), x)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
    fresh = jq.lora.init(jax.random.key(0), q, rank=4)  # b = 0: the base model exactly
    chex.assert_trees_all_close(jq.lora.apply(model, q, x, adapters=fresh), jq.flax.apply(model, q, x))


def test_gradients_through_4bit_base_equal_merged_float(mlp):
    model, _, q, x = mlp
    adapters = _trained_like(jq.lora.init(jax.random.key(0), q, rank=4, alpha=8.0))
    target = jnp.ones((16, 64), jnp.float32)
    float_base = jq.dequantize_tree(q)

    def loss_quantized(ad):
        return jnp.mean((jq.lora.apply(model, q, x, adapters=ad) - target) ** 2)

    def loss_float(ad):  # the same adapters on the dequantized float model, no qmatmul anywhere
        with jq.lora.intercept(ad):
            return jnp.mean((model.apply(float_base, x) - target) ** 2)

    got = jax.jit(jax.grad(loss_quantized))(adapters)
    want = jax.jit(jax.grad(loss_float))(adapters)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(got["params/up/kernel"].a).max()) > 0  # reached through the base's W^T


def test_linen_training_changes_only_adapters(mlp):
    model, params, q, x = mlp
    target = MLP().apply(MLP().init(jax.random.key(9), x), x)
    adapters = jq.lora.init(jax.random.key(0), q, rank=8, alpha=16.0)
    before_base, before_ad = _bytes(q), jax.tree.map(np.asarray, adapters)
    opt = optax.adamw(3e-2)
    state = opt.init(adapters)

    @jax.jit
    def step(ad, state, q):
        loss, g = jax.value_and_grad(lambda a: jnp.mean((jq.lora.apply(model, q, x, adapters=a) - target) ** 2))(ad)
        updates, state = opt.update(g, state, ad)
        return optax.apply_updates(ad, updates), state, loss

    losses = []
    with OPTAX_PROMOTION:
        for _ in range(30):
            adapters, state, loss = step(adapters, state, q)
            losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
    assert _bytes(q) == before_base
    for name in adapters:
        assert not np.allclose(adapters[name].b, before_ad[name].b)


def _train_adapters(model, loss_fn, tx, steps):
    """``steps`` jitted updates of ``model``'s ``nnx.LoRAParam`` only; the losses."""
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    with OPTAX_PROMOTION:
        return [float(step(model, optimizer)) for _ in range(steps)]


def test_nnx_training_changes_only_lora_params():
    model = nnx.Sequential(nnx.Linear(64, 128, rngs=nnx.Rngs(0)), nnx.gelu, nnx.Linear(128, 64, rngs=nnx.Rngs(1)))
    model = jq.flax.quantize_module(model)
    model = jq.lora.add_lora(model, rank=8, alpha=16.0, rngs=nnx.Rngs(2))
    assert isinstance(model.layers[0], jq.lora.LoRA) and isinstance(model.layers[0].lora_b, nnx.LoRAParam)
    x = jax.random.normal(jax.random.key(3), (16, 64))
    target = jnp.sin(x)
    base = _bytes(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    lora_before = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
    losses = _train_adapters(model, lambda m: jnp.mean((m(x) - target) ** 2), optax.adamw(3e-2), 30)
    assert losses[-1] < 0.7 * losses[0], losses
    assert _bytes(nnx.state(model, nnx.Not(nnx.LoRAParam))) == base
    after = nnx.state(model, nnx.LoRAParam)
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(lora_before)))
    with pytest.raises(jq.lora.AdapterError, match="matches no layer"):
        jq.lora.add_lora(nnx.Sequential(nnx.Linear(4, 4, rngs=nnx.Rngs(0))))


def test_merge_float_and_requantize_report(mlp):
    _, params, q, _ = mlp
    adapters = _trained_like(jq.lora.init(jax.random.key(0), q, rank=4, alpha=8.0))
    merged = jq.lora.merge(q, adapters)
    kernel = merged["params"]["up"]["kernel"]
    ad = adapters["params/up/kernel"]
    np.testing.assert_allclose(kernel, jq.dequantize(q["params"]["up"]["kernel"]) + ad.scale * ad.a @ ad.b,
                               rtol=1e-6, atol=1e-6)
    requant, report = jq.lora.merge(q, adapters, requantize=True, return_report=True)
    rq, base = requant["params"]["up"]["kernel"], q["params"]["up"]["kernel"]
    assert isinstance(rq, jq.QArray) and (rq.qtype, rq.block_size, rq.axis, rq.double_quant) == (
        base.qtype, base.block_size, base.axis, base.double_quant)
    rows = {r["path"]: r for r in report}
    assert 0.01 < rows["params/up/kernel"]["rel_rms_error"] < 0.15  # NF4's error, reported
    err = jnp.linalg.norm(jq.dequantize(rq) - kernel) / jnp.linalg.norm(kernel)
    np.testing.assert_allclose(rows["params/up/kernel"]["rel_rms_error"], err, rtol=1e-4)


def test_save_load_round_trip(mlp, tmp_path):
    _, _, q, _ = mlp
    adapters = _trained_like(jq.lora.init(jax.random.key(0), q, rank=4, alpha=8.0))
    jq.lora.save(tmp_path / "a.safetensors", adapters)
    back = jq.lora.load(tmp_path / "a.safetensors")
    chex.assert_trees_all_equal(back, adapters)
    jq.save(tmp_path / "q.safetensors", q)
    with pytest.raises(jq.lora.AdapterError, match="not a jaxquant adapter file"):
        jq.lora.load(tmp_path / "q.safetensors")


TINY = LlamaConfig(vocab_size=256, hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, head_dim=16)


@pytest.fixture(scope="module")
def tiny_llama():
    model = llama.Llama(TINY)
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, TINY.vocab_size)
    params = model.init(jax.random.key(1), tokens)
    policy = jq.Policy(min_size=1024)
    return model, jq.quantize_tree(params, policy), tokens


def test_peft_format_round_trip(tiny_llama, tmp_path):
    import safetensors.numpy
    _, q, _ = tiny_llama
    adapters = _trained_like(jq.lora.init(jax.random.key(0), q, rank=4, alpha=8.0))
    jq.lora.to_peft(tmp_path, adapters, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M")
    tensors = safetensors.numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    a = tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (32, 4)  # (r, in) and (out, r)
    assert len(tensors) == 2 * 7 * TINY.layers
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["task_type"]) == ("LORA", 4, 8, "CAUSAL_LM")
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    chex.assert_trees_all_equal(jq.lora.from_peft(tmp_path), adapters)


def test_llama_remat_lora_gradients_match(tiny_llama):
    model, q, tokens = tiny_llama
    remat = llama.Llama(TINY, remat=True)
    adapters = _trained_like(jq.lora.init(jax.random.key(0), q, rank=4, alpha=8.0))

    def loss(ad, m):
        logits = jq.lora.apply(m, q, tokens, adapters=ad, check=False)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1))

    g1 = jax.jit(jax.grad(lambda ad: loss(ad, model)))(adapters)
    g2 = jax.jit(jax.grad(lambda ad: loss(ad, remat)))(adapters)
    chex.assert_trees_all_close(g1, g2, rtol=1e-4, atol=1e-7)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda ad: loss(ad, remat)))(adapters))
    assert "remat" in jaxpr or "checkpoint" in jaxpr


def test_dense_general_attention_and_einsum():
    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=128, name="attn")(x)
            h = nn.DenseGeneral((4, 32), name="split")(h).reshape(*x.shape[:-1], 128)
            return nn.Einsum((128, 2, 64), "bsd,dhk->bshk", name="ein")(h).reshape(*x.shape[:-1], 128)

    model = Mixed()
    x = jax.random.normal(jax.random.key(0), (2, 8, 128))
    params = model.init(jax.random.key(1), x)
    policy = jq.Policy(rules=(jq.Rule(r"out/kernel", axis=1, block_size=32), jq.Rule(r"kernel$")))
    q = jq.quantize_tree(params, policy)
    adapters = _trained_like(jq.lora.init(jax.random.key(2), q, rank=4, alpha=8.0))
    assert adapters["params/attn/out/kernel"].a.shape == (128, 4)  # (heads * head_dim, r)
    assert adapters["params/attn/query/kernel"].b.shape == (4, 128)  # (r, heads * head_dim)
    got = jq.lora.apply(model, q, x, adapters=adapters)
    want = model.apply(jq.lora.merge(q, adapters), x)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)


def test_flax_apply_lora_on_stock_attention_equals_merge():
    """jq.flax.apply(lora=) on nn.MultiHeadDotProductAttention quantized by the default policy
    with the model's layouts: the out projection's blocks run along (heads, head_dim) merged, and
    its adapter contracts K = heads * head_dim."""
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=128, name="attn")(x)
            return nn.Dense(128, name="mlp")(h)

    model = Block()
    x = jax.random.normal(jax.random.key(0), (2, 8, 128))
    params = model.init(jax.random.key(1), x)
    q = jq.quantize_tree(params, layouts=jq.flax.layouts(model, x))
    out = q["params"]["attn"]["out"]["kernel"]
    assert isinstance(out, jq.QArray) and out.shape == (4, 32, 128) and out.axis == (0, 1)
    adapters = _trained_like(jq.lora.init(jax.random.key(2), q, rank=4, alpha=8.0))
    assert adapters["params/attn/out/kernel"].a.shape == (128, 4)  # (heads * head_dim, r)
    assert adapters["params/attn/query/kernel"].b.shape == (4, 128)  # (r, heads * head_dim)
    got = jax.jit(lambda q, ad, x: jq.flax.apply(model, q, x, lora=ad))(q, adapters, x)
    want = model.apply(jq.lora.merge(q, adapters), x)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-4)
    base = jq.flax.apply(model, q, x)
    assert float(jnp.max(jnp.abs(got - base))) > 1e-3  # the adapters are in the output
    chex.assert_trees_all_equal(jq.lora.apply(model, q, x, adapters=adapters), jq.flax.apply(model, q, x, lora=adapters))


class AttentionMlp(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=4, in_features=64, qkv_features=128,
                                           decode=False, rngs=rngs)
        self.mlp = nnx.Linear(64, 64, rngs=rngs)

    def __call__(self, x):
        return x + self.mlp(nnx.gelu(self.attn(x)))


def test_quantize_module_with_lora_rank_trains_adapters_only():
    model = jq.flax.quantize_module(AttentionMlp(nnx.Rngs(0)), lora_rank=4, lora_alpha=8.0,
                                    lora_rngs=nnx.Rngs(1))
    assert isinstance(model.mlp, jq.lora.LoRA) and isinstance(model.attn.out, jq.lora.LoRA)
    assert model.attn.out.base.kernel.axis == (0, 1) and model.attn.out.lora_a.shape == (128, 4)
    assert model.attn.query.lora_b.shape == (4, 128)
    x = jax.random.normal(jax.random.key(3), (8, 6, 64))
    target = jnp.sin(x)
    base = _bytes(nnx.state(model, nnx.Not(nnx.LoRAParam)))
    losses = _train_adapters(model, lambda m: jnp.mean((m(x) - target) ** 2), optax.adamw(1e-3), 40)
    assert losses[-1] < 0.9 * losses[0], losses
    assert _bytes(nnx.state(model, nnx.Not(nnx.LoRAParam))) == base


def test_stacked_nnx_layers_get_one_adapter_per_layer_and_match_the_layers_run_one_by_one():
    make = nnx.vmap(lambda key: AttentionMlp(nnx.Rngs(key)), in_axes=0, out_axes=0)
    stack = make(jax.random.split(jax.random.key(0), 3))
    graphdef, state = nnx.split(stack)
    layers = [nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state)) for i in range(3)]  # float, one each
    jq.flax.quantize_module(stack, lora_rank=4, lora_alpha=8.0)
    assert stack.mlp.lora_a.shape == (3, 64, 4) and stack.attn.out.lora_b.shape == (3, 4, 64)
    for seed, lora in enumerate((stack.mlp, stack.attn.query, stack.attn.out)):  # B != 0, per layer
        lora.lora_b[...] = jax.random.normal(jax.random.key(seed), lora.lora_b.shape) * 0.1
    x = jax.random.normal(jax.random.key(1), (2, 5, 64))
    want = x
    for i, layer in enumerate(layers):  # the same layers quantized one by one, given the stack's adapters
        jq.flax.quantize_module(layer, lora_rank=4, lora_alpha=8.0)
        for name in ("mlp", "attn.query", "attn.key", "attn.value", "attn.out"):
            one, stacked = layer, stack
            for part in name.split("."):
                one, stacked = getattr(one, part), getattr(stacked, part)
            one.lora_a[...], one.lora_b[...] = stacked.lora_a[i], stacked.lora_b[i]
        want = layer(want)
    got = _run_stack(stack, x)
    assert float(jnp.max(jnp.abs(got - _run_stack(without_adapters(stack), x)))) > 1e-3  # adapters count
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one layer at a time"):
        stack.mlp(x)
    base = _bytes(nnx.state(stack, nnx.Not(nnx.LoRAParam)))
    losses = _train_adapters(stack, lambda s: jnp.mean((_run_stack(s, x) - jnp.sin(x)) ** 2), optax.adam(1e-2), 10)
    assert losses[-1] < 0.9 * losses[0], losses
    assert _bytes(nnx.state(stack, nnx.Not(nnx.LoRAParam))) == base


@pytest.mark.parametrize("rank", [0, 65, 2.0, True])
def test_a_bad_rank_on_stacked_layers_raises_per_layer_bounds(rank):
    stack = nnx.vmap(lambda key: AttentionMlp(nnx.Rngs(key)), in_axes=0, out_axes=0)(jax.random.split(jax.random.key(0), 2))
    jq.flax.quantize_module(stack)
    with pytest.raises(ValueError, match=r"\[1, 64\] for a 64 x 64 kernel"):  # the layer's, not the stack's
        jq.lora.add_lora(stack, rank=rank, pattern=r"mlp/kernel$")


@nnx.jit
def _run_stack(stack, x):
    """The stacked layers one after another, by ``nnx.scan``."""
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
        return block(x)
    return body(x, stack)


def test_stacked_lora_dropout_draws_from_per_layer_keys_under_scan():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.mlp = nnx.Linear(64, 64, rngs=rngs)

        def __call__(self, x):
            return x + self.mlp(x)

    stack = nnx.vmap(lambda key: Block(nnx.Rngs(key)), in_axes=0, out_axes=0)(jax.random.split(jax.random.key(0), 3))
    jq.flax.quantize_module(stack, jq.Policy(rules=(jq.Rule(r"kernel$"),)))
    jq.lora.add_lora(stack, rank=4, dropout=0.5, rngs=nnx.Rngs(1))
    stack.mlp.lora_b[...] = jnp.ones_like(stack.mlp.lora_b[...])
    assert all(leaf.shape == (3,) for leaf in jax.tree.leaves(nnx.state(stack, nnx.RngState)))
    x = jnp.ones((2, 64))
    first, second = _run_stack(stack, x), _run_stack(stack, x)
    assert float(jnp.max(jnp.abs(first - second))) > 1e-3  # fresh masks each call
    stack.eval()  # no dropout: deterministic
    np.testing.assert_array_equal(_run_stack(stack, x), _run_stack(stack, x))


def without_adapters(stack):
    """A copy of ``stack`` with every adapter's B zeroed."""
    copy = nnx.clone(stack)
    for _, layer in nnx.iter_modules(copy):
        if isinstance(layer, jq.lora.LoRA):
            layer.lora_b[...] = jnp.zeros_like(layer.lora_b[...])
    return copy


def test_training_step_holds_one_float_layer_at_a_time():
    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(6):
                x = nn.Dense(1024, name=f"l{i}")(x)
            return x

    model = Stack()
    x = jnp.ones((4, 1024), jnp.float32)
    q = jq.quantize_tree(model.init(jax.random.key(0), x))
    adapters = jq.lora.init(jax.random.key(1), q, rank=8)
    loss = lambda ad, q: jnp.sum(jq.lora.apply(model, q, x, adapters=ad, check=False) ** 2)
    compiled = jax.jit(jax.value_and_grad(loss)).lower(adapters, q).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    one_layer = 1024 * 1024 * 4
    assert temp < 2.5 * one_layer, (temp, one_layer)  # 6 float layers would be 6x


def test_chunked_backward_holds_one_layer_in_a_stack(monkeypatch):
    monkeypatch.setattr(matmul_grad, "CHUNK_ELEMENTS", 256 * 1024)  # qmatmul's backward: 4 chunks
    qs = [jq.quantize(jax.random.normal(jax.random.key(i), (1024, 1024)), "nf4", 64, axis=0,
                      double_quant=True) for i in range(6)]
    x = jnp.ones((4, 1024), jnp.float32)

    def loss(a, qs):
        h = x
        for q, ai in zip(qs, a):
            h = jq.qmatmul(h, q, compute_dtype=jnp.float32) + (h @ ai) @ jnp.ones((8, 1024))
        return jnp.sum(h * h)

    a = [jnp.full((1024, 8), 0.01) for _ in qs]
    temp = jax.jit(jax.grad(loss)).lower(a, qs).compile().memory_analysis().temp_size_in_bytes
    assert temp < 1.5 * 1024 * 1024 * 4, temp  # the forward's one float layer, not six


def test_chunked_backward_equals_and_holds_one_chunk(rng, monkeypatch):
    w = jnp.asarray(rng.standard_normal((1024, 512)), jnp.float32)
    q = jq.quantize(w, "nf4", 64, axis=0, double_quant=True)
    g = jnp.asarray(rng.standard_normal((32, 512)), jnp.bfloat16)
    want = qmatmul_xla_grad_x(g, q, jnp.bfloat16)  # the whole weight decoded, one dot
    for chunks in (1, 4, 16):
        chex.assert_trees_all_equal(matmul_transposed(g, q, jnp.bfloat16, chunks), want)
    temp = lambda c: jax.jit(lambda g, q: matmul_transposed(g, q, jnp.bfloat16, c)).lower(
        g, q).compile().memory_analysis().temp_size_in_bytes
    weight = 1024 * 512 * 2
    assert temp(8) < weight / 2 < temp(1), (temp(8), temp(1), weight)
    with pytest.raises(ValueError, match="chunks must cut K=1024"):
        matmul_transposed(g, q, jnp.bfloat16, 3)
    x = jnp.asarray(rng.standard_normal((32, 1024)), jnp.float32)
    monkeypatch.setattr(matmul_grad, "CHUNK_ELEMENTS", 128 * 1024)  # qmatmul's backward: 4 chunks
    assert matmul_grad.default_chunks(q) == 4
    gx = jax.grad(lambda x: jnp.sum(jq.qmatmul(x, q, compute_dtype=jnp.float32) ** 2))(x)
    ref = qmatmul_xla_grad_x(2 * jq.qmatmul(x, q, compute_dtype=jnp.float32), q, jnp.float32)
    np.testing.assert_allclose(gx, ref, rtol=1e-5, atol=1e-4)


def test_docstring_examples():
    import doctest

    from jaxquant._src import lora, lora_flax, matmul_grad
    with jax.numpy_dtype_promotion("standard"):
        results = [doctest.testmod(m, verbose=False) for m in (lora, lora_flax, matmul_grad)]
    assert all(r.attempted > 0 and r.failed == 0 for r in results), results


def test_a_rematerialized_training_step_holds_one_block_input_per_layer(monkeypatch):
    """Every layer of a QLoRA step keeps its block's input for the backward pass, and nothing more:
    the backward's (tokens, K) outputs exist only while their layer runs (they once were alive
    from the start of the step, one per projection of every layer: on the H200 most of a
    Llama-3-8B step's peak)."""
    from jaxquant.models import llama
    from jaxquant.models.smollm2 import LlamaConfig
    monkeypatch.setattr(matmul_grad, "CHUNK_ELEMENTS", 32 * 1024)  # every backward decodes in chunks
    tokens = jnp.zeros((1, 512), jnp.int32)

    def temp(layers):
        config = LlamaConfig(vocab_size=128, hidden=256, ffn=1024, layers=layers, heads=4, kv_heads=2,
                             head_dim=64)
        model = llama.Llama(config, remat=True)
        q = jq.quantize_tree(jax.eval_shape(model.init, jax.random.key(0), tokens))
        adapters = jax.eval_shape(lambda q: jq.lora.init(jax.random.key(1), q, rank=8), q)
        loss = lambda ad, q: jq.lora.apply(model, q, tokens, targets=llama.next_token_targets(tokens),
                                           adapters=ad, check=False)
        return jax.jit(jax.grad(loss)).lower(adapters, q).compile().memory_analysis().temp_size_in_bytes

    block_input = 512 * 256 * 4
    per_layer = (temp(6) - temp(2)) / 4
    assert per_layer < 2 * block_input, (per_layer, block_input)
