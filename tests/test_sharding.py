"""QArrays under jax.sharding on 8 fake CPU devices (conftest sets the XLA flag)."""

import dataclasses
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chex
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jaxquant as jq


@pytest.fixture
def mesh():
    assert len(jax.devices()) == 8, "tests need XLA_FLAGS=--xla_force_host_platform_device_count=8"
    return Mesh(np.array(jax.devices()).reshape(8), ("model",))


def test_codes_and_constants_shard_along_the_output_axis(mesh, rng):
    w = jnp.asarray(rng.standard_normal((512, 1024)), jnp.bfloat16)  # W[K, N], N sharded
    q = jq.quantize(w, "nf4", 64, axis=0, double_quant=True)
    shardings = jq.qarray_sharding(q, mesh, P(None, "model"))
    sharded = jax.device_put(q, shardings)
    assert sharded.codes.sharding.spec == P("model", None)
    assert sharded.scale.codes.sharding.spec == P("model")
    # each device holds the codes and the nested codes of the same 128 output columns
    for shard, nested in zip(sharded.codes.addressable_shards, sharded.scale.codes.addressable_shards):
        assert shard.index[0] == slice(nested.index[0].start // 8, nested.index[0].stop // 8)
    np.testing.assert_array_equal(jq.dequantize(sharded), jq.dequantize(q))


def test_quantized_tree_created_sharded_and_model_runs_under_jit(mesh, rng):
    model = nn.Sequential([nn.Dense(1024, use_bias=False), jax.nn.relu, nn.Dense(512, use_bias=False)])
    x = jnp.asarray(rng.standard_normal((4, 512)), jnp.float32)
    params = model.init(jax.random.key(0), x)
    abstract = jax.eval_shape(lambda p: jq.quantize_tree(p), params)
    # shard every kernel along its output axis, created directly with those shardings
    out_shardings = jax.tree.map(
        lambda a: jq.qarray_sharding(a, mesh, P(None, "model")) if isinstance(a, jq.QArray)
        else NamedSharding(mesh, P()), abstract, is_leaf=lambda a: isinstance(a, jq.QArray))
    qparams = jax.jit(jq.quantize_tree, out_shardings=out_shardings)(params)
    kernel = qparams["params"]["layers_0"]["kernel"]
    assert kernel.codes.sharding.spec == P("model", None)
    out = jax.jit(lambda q, x: jq.flax.apply(model, q, x, check=False))(qparams, x)
    ref = model.apply(jq.dequantize_tree(jq.quantize_tree(params)), x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


def test_shards_of_the_block_axis_must_hold_whole_blocks(mesh, rng):
    w = jnp.asarray(rng.standard_normal((256, 64)), jnp.float32)  # K = 256: 32 per device
    q = jq.quantize(w, "nf4", 64, axis=0)
    with pytest.raises(ValueError, match="each shard must hold whole blocks of 64"):
        jq.qarray_sharding(q, mesh, P("model", None))
    assert jq.qarray_sharding(jq.quantize(w, "nf4", 32, axis=0), mesh, P("model", None)).codes.spec == P(None, "model")
    flat = jq.quantize(w, "nf4", 64)
    with pytest.raises(ValueError, match="flat blocks"):
        jq.qarray_sharding(flat, mesh, P(None, "model"))
    merged = jq.quantize(jnp.ones((8, 64, 32)), "nf4", 64, axis=(0, 1))  # attention out (H, D, F)
    assert jq.qarray_sharding(merged, mesh, P("model")).codes.spec == P(None, "model")  # heads split
    with pytest.raises(ValueError, match="inside the merged block axes"):
        jq.qarray_sharding(merged, mesh, P(None, "model"))
    with pytest.raises(ValueError, match="more entries"):
        jq.qarray_sharding(q, mesh, P(None, None, "model"))


def bits(tree):
    return [np.asarray(a).reshape(-1).view(np.uint8) for a in jax.tree.leaves(tree)]


@pytest.mark.parametrize("spec", [P(None, "model"), P("model", None)], ids=["columns", "rows"])
@pytest.mark.parametrize("qtype,dq", [("nf4", True), ("int8", False)])
def test_sharded_quantize_tree_is_byte_exact_and_stays_on_the_shards(spec, qtype, dq, mesh, rng):
    """Each device quantizes its own shard: the same bytes as unsharded, each device holding an
    eighth of the codes, and (without double quant's mean) no collective in the compiled
    program, so the weight is never gathered."""
    w = jnp.asarray(rng.standard_normal((1024, 512)), jnp.bfloat16)
    params = {"dense": {"kernel": w}}
    policy = jq.Policy(rules=(jq.Rule("kernel", qtype, 64, 0, dq),))
    sharded = jax.device_put(params, NamedSharding(mesh, spec))
    got = jq.quantize_tree(sharded, policy)["dense"]["kernel"]
    want = jq.quantize_tree(params, policy)["dense"]["kernel"]
    chex.assert_trees_all_equal_structs(got, want)
    for g, w_ in zip(bits(got), bits(want)):
        np.testing.assert_array_equal(g, w_)
    assert got.codes.sharding.spec == jq.qarray_sharding(want, mesh, spec).codes.spec
    per_device = {s.device: s.data.nbytes for s in got.codes.addressable_shards}
    assert len(per_device) == 8 and set(per_device.values()) == {got.codes.nbytes // 8}
    if not dq:
        from jaxquant._src.config import QuantConfig
        from jaxquant._src.quantize import quantize_array
        cfg = QuantConfig(qtype, 64, 0, False, dq, 256).validated(2)
        run = jax.jit(lambda a: quantize_array(a, cfg), out_shardings=jq.qarray_sharding(want, mesh, spec))
        hlo = run.lower(sharded["dense"]["kernel"]).compile().as_text()
        assert not any(op in hlo for op in ("all-gather", "all-reduce", "collective-permute", "all-to-all"))


def test_abstract_sharded_tree_gives_sharded_abstract_qarrays(mesh):
    """A checkpoint's target: shapes and shardings, no memory."""
    abstract = {"kernel": jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16,
                                               sharding=NamedSharding(mesh, P(None, "model")))}
    q = jq.quantize_tree(abstract)["kernel"]
    assert isinstance(q.codes, jax.ShapeDtypeStruct) and q.codes.sharding.spec == P("model", None)
    assert q.scale.codes.sharding.spec == P("model")


def megatron_mlp_specs(params):
    """W1 column-parallel (outputs split), W2 row-parallel (inputs split): one all-reduce."""
    return {"params": {"layers_0": {"kernel": P(None, "model"), "bias": P("model")},
                       "layers_2": {"kernel": P("model", None), "bias": P()}}}


def test_tensor_parallel_linen_mlp_equals_the_unsharded_model(mesh, rng):
    model = nn.Sequential([nn.Dense(1024), jax.nn.gelu, nn.Dense(256)])
    x = jnp.asarray(rng.standard_normal((4, 256)), jnp.float32)
    params = model.init(jax.random.key(0), x)
    specs = megatron_mlp_specs(params)
    sharded = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
    q_sharded, q = jq.quantize_tree(sharded), jq.quantize_tree(params)
    assert q_sharded["params"]["layers_2"]["kernel"].codes.sharding.spec == P(None, "model")
    run = jax.jit(lambda q, x: jq.flax.apply(model, q, x, check=False))
    got, want = run(q_sharded, x), run(q, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_tensor_parallel_nnx_mlp_equals_the_unsharded_model(mesh, rng):
    from flax import nnx

    def build():
        return nnx.Sequential(nnx.Linear(256, 1024, rngs=nnx.Rngs(0)), jax.nn.gelu,
                              nnx.Linear(1024, 256, rngs=nnx.Rngs(1)))

    x = jnp.asarray(rng.standard_normal((4, 256)), jnp.float32)
    plain, sharded = build(), build()
    for layer, spec in ((sharded.layers[0], P(None, "model")), (sharded.layers[2], P("model", None))):
        layer.kernel[...] = jax.device_put(layer.kernel[...], NamedSharding(mesh, spec))
    plain, sharded = jq.flax.quantize_module(plain), jq.flax.quantize_module(sharded)
    assert sharded.layers[2].kernel.codes.sharding.spec == P(None, "model")
    run = nnx.jit(lambda m, x: m(x))
    got, want = run(sharded, x), run(plain, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_qlora_step_data_parallel_on_an_fsdp_sharded_base_equals_the_unsharded_step(mesh, rng):
    """The frozen base split along its output axis over the devices (FSDP-style), the batch split
    over the same devices, the adapters replicated: one AdamW step gives the unsharded step's
    adapters."""
    import optax

    model = nn.Sequential([nn.Dense(512), jax.nn.gelu, nn.Dense(256)])
    x = jnp.asarray(rng.standard_normal((16, 256)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((16, 256)), jnp.float32)
    params = model.init(jax.random.key(0), x)
    q = jq.quantize_tree(params)
    specs = jax.tree.map(lambda a: P(*(None,) * (a.ndim - 1), "model"), params)
    q_sharded = jq.quantize_tree(jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)),
                                              params, specs))
    adapters = jq.lora.init(jax.random.key(1), q, rank=8, alpha=16.0)
    adapters = {k: jq.lora.Adapter(a.a, 0.01 * jax.random.normal(jax.random.key(2), a.b.shape), a.alpha)
                for k, a in adapters.items()}
    opt = optax.adamw(1e-2)

    @jax.jit
    def step(ad, state, base, x, y):
        loss = lambda ad: ((jq.flax.apply(model, base, x, lora=ad, check=False) - y) ** 2).mean()
        value, g = jax.value_and_grad(loss)(ad)
        updates, state = opt.update(g, state, ad)
        return optax.apply_updates(ad, updates), value

    batch = NamedSharding(mesh, P("model"))
    with jax.numpy_dtype_promotion("standard"):
        got, got_loss = step(adapters, opt.init(adapters), q_sharded, jax.device_put(x, batch),
                             jax.device_put(target, batch))
        want, want_loss = step(adapters, opt.init(adapters), q, x, target)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)


HF_TINY = pathlib.Path(__file__).parent / "data" / "hf_tiny"


@pytest.mark.parametrize("variant,policy", [("float", None), ("float", "nf4"), ("nf4_dq", None), ("int8", None)])
def test_hf_load_reads_into_tensor_parallel_shards(variant, policy):
    """hf.load(mesh=) puts each weight in its Megatron shards (float ones read device by device,
    quantized there by the policy); the logits equal the unsharded load's."""
    from jaxquant.models import hf

    mesh = Mesh(np.array(jax.devices()[:2]), ("model",))
    pol = None if policy is None else jq.Policy(rules=(jq.Rule(r"_proj/kernel$", "nf4", 64, 0, True),))
    model, want_params = hf.load(HF_TINY / variant, policy=pol)
    _, params = hf.load(HF_TINY / variant, policy=pol, mesh=mesh)
    layer = params["params"]["layers_0"]
    embedding = params["params"]["embed_tokens"]["embedding"]
    assert embedding.sharding.spec == P(None, "model")
    assert [s.data.shape for s in embedding.addressable_shards] == [(256, 64)] * 2
    o_proj, up = layer["self_attn"]["o_proj"]["kernel"], layer["mlp"]["up_proj"]["kernel"]
    if isinstance(o_proj, jq.QArray):
        assert o_proj.codes.sharding.spec == P(None, "model") and up.codes.sharding.spec == P("model", None)
    else:
        assert o_proj.sharding.spec == P("model", None) and up.sharding.spec == P(None, "model")
    chex.assert_trees_all_equal_structs(params, want_params)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)):  # same bytes
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    tokens = jnp.arange(8, dtype=jnp.int32)[None]
    run = jax.jit(lambda p: jq.flax.apply(model, p, tokens, check=False))
    np.testing.assert_allclose(np.asarray(run(params), np.float32), np.asarray(run(want_params), np.float32),
                               rtol=2e-2, atol=2e-2)


def test_hf_load_refuses_shards_that_cut_blocks():
    from jaxquant.models import hf

    mesh = Mesh(np.array(jax.devices()), ("model",))  # o_proj's 128 inputs over 8: 16, not 64
    with pytest.raises(ValueError, match="each shard must hold whole blocks of 64"):
        hf.load(HF_TINY / "nf4_dq", mesh=mesh)


def test_spec_errors_are_value_errors_that_name_the_problem(mesh):
    q = jq.quantize(jnp.ones((512, 256)), "nf4", 64, axis=0)
    with pytest.raises(ValueError, match="names mesh axis 'nope', which the mesh"):
        jq.qarray_sharding(q, mesh, P("nope", None))  # on the block axis: was a bare KeyError
    with pytest.raises(ValueError, match="names mesh axis 'nope'"):
        jq.qarray_sharding(q, mesh, P(None, "nope"))
    with pytest.raises(ValueError, match=r"splits dimension 1 \(size 100\).*over 8 devices"):
        jq.qarray_sharding(jq.quantize(jnp.ones((512, 100)), "nf4", 64, axis=0), mesh, P(None, "model"))
    # merged (heads, head_dim) block axis: 512 splits over 8, but 4 heads do not
    merged = jq.quantize(jnp.ones((4, 128, 32)), "nf4", 64, axis=(0, 1))
    with pytest.raises(ValueError, match=r"splits dimension 0 \(size 4\)"):
        jq.qarray_sharding(merged, mesh, P("model"))
    with pytest.raises(TypeError, match="PartitionSpec"):
        jq.qarray_sharding(q, mesh, None)
    two_d = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    assert jq.qarray_sharding(q, two_d, P(None, ("data", "model"))).codes.spec == P(("data", "model"), None)


def test_one_block_per_row_shards_row_parallel_with_the_constants_replicated(mesh, rng):
    """Per-channel constants (LLM.int8's row scales) have one block per row: the codes split
    along K, the single constant is replicated along it, and the bytes equal the unsharded ones."""
    w = jnp.asarray(rng.standard_normal((512, 256)), jnp.float32)
    policy = jq.Policy(rules=(jq.Rule("kernel", "int8", None, 0, False),))
    got = jq.quantize_tree({"kernel": jax.device_put(w, NamedSharding(mesh, P("model", None)))}, policy)["kernel"]
    want = jq.quantize_tree({"kernel": w}, policy)["kernel"]
    for g, w_ in zip(bits(got), bits(want)):
        np.testing.assert_array_equal(g, w_)
    assert got.codes.sharding.spec == P(None, "model") and got.scale.sharding.spec == P(None, None)
    assert {s.data.shape for s in got.codes.addressable_shards} == {(256, 64)}
    with pytest.raises(ValueError, match="even number of packed 4-bit codes"):  # 9 nibbles a shard
        jq.qarray_sharding(jq.quantize(jnp.ones((72, 64)), "nf4", None, axis=0), mesh, P("model"))


def test_sharded_leaves_of_one_shape_compile_once(mesh, rng, caplog):
    """A fresh jit per sharded leaf compiled every layer of a model again."""
    w = jnp.asarray(rng.standard_normal((384, 192)), jnp.float32)
    params = {f"k{i}": jax.device_put(w + i, NamedSharding(mesh, P(None, "model"))) for i in range(3)}
    policy = jq.Policy(rules=(jq.Rule("k", "int8", 64, 0, False),))
    with jax.log_compiles(), caplog.at_level("WARNING"):
        out = jq.quantize_tree(params, policy)
    assert sum("Compiling jit(layers)" in r.getMessage() for r in caplog.records) <= 1
    for i in range(3):
        for g, w_ in zip(bits(out[f"k{i}"]), bits(jq.quantize_tree({"k": w + i}, policy)["k"])):
            np.testing.assert_array_equal(g, w_)


def test_a_spec_that_cannot_shard_raises_before_anything_is_quantized_or_donated(mesh, rng):
    w = jnp.asarray(rng.standard_normal((512, 256)), jnp.float32)
    good = jax.device_put(w, NamedSharding(mesh, P(None, "model")))
    bad = jax.device_put(w[:256], NamedSharding(mesh, P("model", None)))  # 32 rows a shard, blocks of 64
    policy = jq.Policy(rules=(jq.Rule("a|b", "nf4", 64, 0, True),))
    with pytest.raises(jq.PolicyError, match=r"'b' \(256, 256\).*each shard must hold whole blocks of 64"):
        jq.quantize_tree({"a": good, "b": bad}, policy, donate=True)
    assert not good.is_deleted() and not bad.is_deleted()
    # NNX modules are quantized in place: no layer is replaced before the error
    from flax import nnx
    model = nnx.Sequential(nnx.Linear(512, 256, rngs=nnx.Rngs(0)), nnx.Linear(256, 512, rngs=nnx.Rngs(1)))
    model.layers[0].kernel[...] = jax.device_put(model.layers[0].kernel[...], NamedSharding(mesh, P(None, "model")))
    model.layers[1].kernel[...] = jax.device_put(model.layers[1].kernel[...], NamedSharding(mesh, P("model", None)))
    with pytest.raises(jq.PolicyError, match="layers/1/kernel"):
        jq.flax.quantize_module(model)
    assert type(model.layers[0]) is nnx.Linear


def test_hf_load_names_the_weight_a_spec_does_not_fit(tmp_path):
    import functools
    import shutil

    from jaxquant.models import hf

    data = Mesh(np.array(jax.devices()[:2]), ("data",))
    with pytest.raises(ValueError, match=r"specs\('params/embed_tokens/embedding'\) = .* the mesh \{'data': 2\}"):
        hf.load(HF_TINY / "nf4_dq", mesh=data)
    _, params = hf.load(HF_TINY / "float", mesh=data, specs=functools.partial(hf.tensor_parallel, axis="data"))
    assert params["params"]["embed_tokens"]["embedding"].sharding.spec == P(None, "data")
    two = Mesh(np.array(jax.devices()[:2]), ("model",))
    with pytest.raises(ValueError, match="3 entries for 2 dimensions"):  # was an IndexError
        hf.load(HF_TINY / "float", mesh=two, specs=lambda path: P(None, None, "model"))
    with pytest.raises(TypeError, match="not a PartitionSpec"):
        hf.load(HF_TINY / "float", mesh=two, specs=lambda path: None)
    # a truncated shard: the checkpoint's error, not safetensors'
    shutil.copytree(HF_TINY / "float", tmp_path / "float")
    shard = tmp_path / "float" / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(jq.CheckpointError, match="model-00002-of-00003"):
        hf.load(tmp_path / "float", mesh=two)


@pytest.mark.parametrize("qtype,options", [("nf4", {}), ("nf4", dict(double_quant=True)), ("int8", {}),
                                           ("int4", dict(zero_point=True))])
def test_a_kernel_runs_per_shard_column_and_row_parallel(qtype, options, rng):
    """The partitioning that puts the Hopper kernel on each shard, run here with the XLA path as
    the per-shard function (the kernel itself needs an sm90 GPU; its interpret mode calls back to
    Python, which a partitioned call cannot): equal results, the function sees its shard's
    shapes, no gather of the codes, a psum only for a split contraction."""
    from jaxquant._src import matmul_sharded
    from jaxquant._src.matmul_xla import qmatmul_xla

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    w = jnp.asarray(rng.standard_normal((512, 256)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 8, 512)), jnp.float32)
    q = jq.quantize(w, qtype, 64, axis=0, **options)
    seen = []

    def local(x, q, devices=None):
        seen.append((x.shape, q.shape, type(q.scale).__name__))
        return qmatmul_xla(x, q, compute_dtype=jnp.float32)

    ref = qmatmul_xla(x, q, compute_dtype=jnp.float32)
    for weight_spec, x_spec, local_shape in [(P(None, "model"), P("data", None, None), (512, 64)),
                                             (P("model", None), P("data", None, "model"), (128, 256))]:
        qs = jax.device_put(q, jq.qarray_sharding(q, mesh, weight_spec))
        xs = jax.device_put(x, NamedSharding(mesh, x_spec))
        seen.clear()
        f = jax.jit(lambda x, q: matmul_sharded.partitioned(local, x, q))
        out = f(xs, qs)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
        # per device: x's rows split over "data" too ((2 * 8) / 2), the weight's shard, and the
        # nested constants decoded into plain float32 ones
        per_shard = [s for s in seen if s[1] == local_shape]
        assert per_shard and all(s[0] == (8, local_shape[0]) and s[2] != "QArray" for s in per_shard)
        hlo = f.lower(xs, qs).compile().as_text()
        row_parallel = weight_spec == P("model", None)
        assert ("all-reduce" in hlo) == row_parallel
        assert ("all-gather" in hlo) == (options.get("double_quant", False) and not row_parallel)


def test_per_shard_partitioning_leaves_out_what_its_rule_cannot_express():
    from jaxquant._src import matmul_sharded
    w = jnp.ones((96, 128))
    assert not matmul_sharded.applies(jq.quantize(w, "nf4", 64, axis=0))  # a partial last block
    assert not matmul_sharded.applies(jq.quantize(w, "nf4", None, axis=0))  # one block per column
    assert matmul_sharded.applies(jq.quantize(w, "nf4", 32, axis=0))


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """qmatmul's dispatch answering "a kernel for this host's platform" (as on a Hopper machine),
    the kernel being the XLA path: the whole per-shard hook runs on the CPU devices."""
    from jaxquant._src.kernels import dispatch
    from jaxquant._src.matmul_xla import qmatmul_xla
    kernel = lambda x, q: qmatmul_xla(x, q, compute_dtype=jnp.float32)
    monkeypatch.setattr(dispatch, "choose", lambda x, q, **kw: dispatch.Choice(kernel, "cpu"))


def test_the_per_shard_hook_gives_the_unsharded_result_whatever_the_shardings(kernel_on_cpu, rng):
    devices = np.array(jax.devices())
    mm = jax.jit(lambda x, q: jq.qmatmul(x, q, compute_dtype=jnp.float32))
    w = jnp.asarray(rng.standard_normal((512, 256)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 8, 512)), jnp.float32)
    mesh2 = Mesh(devices.reshape(2, 4), ("data", "model"))
    fsdp = Mesh(devices[:2], ("data",))
    put = lambda a, mesh, spec: jax.device_put(a, NamedSharding(mesh, spec))
    cases = [  # (qtype, block, dq, mesh, x spec, weight spec): the weight placed by qarray_sharding
        ("nf4", 64, True, mesh2, P("data", None, None), P(None, "model")),
        ("nf4", 64, True, mesh2, P(None, None, "model"), P("model", None)),
        ("int8", 64, False, mesh2, P("data"), P("data", "model")),  # both weight axes split
        ("nf4", 64, False, fsdp, P("data"), P(None, "data")),  # the batch's axis splits the weight too
        ("nf4", 64, True, fsdp, P("data"), P("data", None)),
        ("nf4", None, False, mesh2, P(None, None, "model"), P(None, "model")),  # one block per column
    ]
    for qtype, block, dq, mesh, x_spec, w_spec in cases:
        q = jq.quantize(w, qtype, block, axis=0, double_quant=dq)
        ref = jq.qmatmul(x, q, implementation="xla", compute_dtype=jnp.float32)
        out = mm(put(x, mesh, x_spec), jax.device_put(q, jq.qarray_sharding(q, mesh, w_spec)))
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    # codes split along K where the blocks are not whole per shard (3 blocks over 2): resharded
    q = jq.quantize(w[:192], "nf4", 64, axis=0)
    cut = dataclasses.replace(q, codes=put(q.codes, fsdp, P(None, "data")))
    ref = jq.qmatmul(x[..., :192], q, implementation="xla", compute_dtype=jnp.float32)
    np.testing.assert_allclose(mm(x[..., :192], cut), ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    # vmap over examples, and over a stack of weights
    q = jq.quantize(w, "nf4", 64, axis=0, double_quant=True)
    ref = mm(x, q)
    close = lambda a: np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    close(jax.vmap(lambda x: mm(x, q))(x))
    close(jax.vmap(mm)(x, jax.tree.map(lambda *a: jnp.stack(a), q, q)))
