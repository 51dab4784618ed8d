import json

import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq


@pytest.fixture
def entry(rng):
    w = rng.standard_normal((128, 64)).astype(np.float32)  # Flax kernel (in, out)
    return w, jq.to_bnb(jq.quantize(jnp.asarray(w, jnp.bfloat16), "nf4", 64, axis=0, double_quant=True))


def test_flax_kernel_along_axis_0_is_bnb_of_the_transpose(entry, rng):
    w, d = entry
    torch_layout = jq.to_bnb(jq.quantize(jnp.asarray(w.T, jnp.bfloat16), "nf4", 64, double_quant=True))
    for key in d:
        np.testing.assert_array_equal(d[key], torch_layout[key])
    state = json.loads(d["weight.quant_state.bitsandbytes__nf4"].tobytes())
    assert state["shape"] == [64, 128] and state["dtype"] == "bfloat16"
    assert d["weight"].shape == (64 * 128 // 2, 1) and d["weight"].dtype == np.uint8


def test_from_bnb_transpose_gives_the_flax_kernel(entry):
    w, d = entry
    q = jq.from_bnb(d, transpose=True)
    assert q.shape == (128, 64) and q.axis == 0
    np.testing.assert_array_equal(jq.dequantize(q), jq.dequantize(jq.from_bnb(d)).T)


def test_prefix_and_quant_storage_reinterpretation(entry):
    _, d = entry
    renamed = {k.replace("weight", "model.layers.0.q_proj.weight", 1): v for k, v in d.items()}
    q = jq.from_bnb(renamed, prefix="model.layers.0.q_proj.weight")
    as_f32 = dict(d, weight=d["weight"].reshape(-1).view(np.float32))  # quant_storage=float32
    np.testing.assert_array_equal(jq.dequantize(jq.from_bnb(as_f32)), jq.dequantize(q))


@pytest.mark.parametrize("key", ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                                 "weight.nested_quant_map"])
def test_missing_key_is_named(entry, key):
    _, d = entry
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        jq.from_bnb({k: v for k, v in d.items() if k != key})


@pytest.mark.parametrize("key,value", [
    ("weight.absmax", lambda d: d["weight.absmax"].astype(np.float32)),
    ("weight.nested_absmax", lambda d: d["weight.nested_absmax"].astype(np.float64)),
    ("weight.quant_map", lambda d: d["weight.quant_map"].astype(np.float16)),
])
def test_wrong_dtype_is_named(entry, key, value):
    _, d = entry
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        jq.from_bnb(dict(d, **{key: value(d)}))


@pytest.mark.parametrize("change", [dict(shape=[64, 130]), dict(blocksize=128), dict(quant_type="fp4"),
                                    dict(dtype="int8")])
def test_json_that_does_not_match_the_arrays(entry, change):
    _, d = entry
    key = "weight.quant_state.bitsandbytes__nf4"
    state = json.loads(d[key].tobytes()) | change
    bad = dict(d, **{key: np.frombuffer(json.dumps(state).encode(), np.uint8)})
    with pytest.raises(ValueError, match="from_bnb"):
        jq.from_bnb(bad)


def test_missing_or_garbled_quant_state(entry):
    _, d = entry
    key = "weight.quant_state.bitsandbytes__nf4"
    with pytest.raises(ValueError, match="quant_state"):
        jq.from_bnb({k: v for k, v in d.items() if k != key})
    with pytest.raises(ValueError, match="not a valid quant_state JSON"):
        jq.from_bnb(dict(d, **{key: np.frombuffer(b"{not json", np.uint8)}))


def test_to_bnb_refuses_what_bitsandbytes_cannot_hold(rng):
    x = rng.standard_normal((96, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="nf4 or fp4"):
        jq.to_bnb(jq.quantize(x, "int4", 32))
    with pytest.raises(ValueError, match="multiple of block_size"):
        jq.to_bnb(jq.quantize(x, "nf4", 64, axis=0))
