"""QArrays under jax.sharding on 8 fake CPU devices (conftest sets the XLA flag)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


def test_sharding_the_block_axis_is_refused(mesh, rng):
    q = jq.quantize(jnp.asarray(rng.standard_normal((512, 64)), jnp.float32), "nf4", 64, axis=0)
    with pytest.raises(ValueError, match="shards axis 0, the block axis"):
        jq.qarray_sharding(q, mesh, P("model", None))
    flat = jq.quantize(jnp.asarray(rng.standard_normal((512, 64)), jnp.float32), "nf4", 64)
    with pytest.raises(ValueError, match="flat blocks"):
        jq.qarray_sharding(flat, mesh, P(None, "model"))
