import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq


@pytest.fixture
def qtree(rng):
    params = {"params": {
        "dense": {"kernel": jnp.asarray(rng.standard_normal((256, 128)), jnp.bfloat16),
                  "bias": jnp.asarray(rng.standard_normal((128,)), jnp.float32)},
        "affine": {"kernel": jnp.asarray(rng.standard_normal((128, 64)), jnp.float32)},
    }}
    policy = jq.Policy(rules=(jq.Rule("affine", "int4", 32, zero_point=True), jq.Rule("kernel$")),
                       min_size=1)
    return jq.quantize_tree(params, policy)


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and x.shape == y.shape and bool(jnp.array_equal(x, y)) for x, y in zip(la, lb))


def test_round_trip_is_bit_exact(qtree, tmp_path):
    f = tmp_path / "q.safetensors"
    jq.save(f, qtree)
    back = jq.load(f)
    assert jax.tree.structure(back) == jax.tree.structure(qtree) and leaves_equal(back, qtree)
    assert back["params"]["dense"]["kernel"].dtype == jnp.bfloat16
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp file left


def test_load_against_abstract_target(qtree, tmp_path):
    f = tmp_path / "q.safetensors"
    jq.save(f, qtree)
    target = flax.core.freeze(jax.eval_shape(lambda: qtree))
    back = jq.load(f, target)
    assert isinstance(back, flax.core.FrozenDict) and leaves_equal(back, flax.core.freeze(qtree))


def test_truncated_file(qtree, tmp_path):
    f = tmp_path / "q.safetensors"
    jq.save(f, qtree)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(jq.CheckpointError, match="not a readable safetensors file"):
        jq.load(f)


def test_missing_tensor_and_mismatched_target(qtree, tmp_path, rng):
    f = tmp_path / "q.safetensors"
    partial = {"params": {"dense": qtree["params"]["dense"]}}
    jq.save(f, partial)
    with pytest.raises(jq.CheckpointError, match="has no 'params/affine/kernel'"):
        jq.load(f, jax.eval_shape(lambda: qtree))
    other = jq.quantize_tree({"params": {"dense": {
        "kernel": jnp.asarray(rng.standard_normal((256, 128)), jnp.bfloat16), "bias": jnp.zeros((128,))}}},
        jq.Policy(rules=(jq.Rule("kernel$", block_size=128),), min_size=1))
    with pytest.raises(jq.CheckpointError, match="'params/dense/kernel' is QArray.*block_size=64.*wants.*block_size=128"):
        jq.load(f, other)


def test_foreign_file_and_inconsistent_tensors(qtree, tmp_path):
    import safetensors.numpy
    f = tmp_path / "x.safetensors"
    safetensors.numpy.save_file({"a": np.ones(3, np.float32)}, f)
    with pytest.raises(jq.CheckpointError, match="not a jaxquant tree"):
        jq.load(f)
    jq.save(f, qtree)
    with safetensors.safe_open(str(f), framework="numpy") as h:
        meta, tensors = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}
    tensors["params/dense/kernel::codes"] = tensors["params/dense/kernel::codes"][:, :-1]
    safetensors.numpy.save_file(tensors, f, metadata=meta)
    with pytest.raises(jq.CheckpointError, match="checksum mismatch"):
        jq.load(f)
    # the same edit in a format-1 file (no checksum) is caught by the QArray invariant
    legacy = {"format": "jaxquant.tree/1", "layout": meta["layout"]}
    safetensors.numpy.save_file(tensors, f, metadata=legacy)
    with pytest.raises(jq.CheckpointError, match="'params/dense/kernel' does not match its metadata"):
        jq.load(f)
    del tensors["params/dense/bias"]
    safetensors.numpy.save_file(tensors, f, metadata=legacy)
    with pytest.raises(jq.CheckpointError, match="tensor 'params/dense/bias' is missing"):
        jq.load(f)
