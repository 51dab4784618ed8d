
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq


def tree(rng):
    return {"params": {
        "dense": {"kernel": jnp.asarray(rng.standard_normal((256, 128)), jnp.float32),
                  "bias": jnp.zeros((128,), jnp.float32)},
        "attn": {"kernel": jnp.asarray(rng.standard_normal((128, 4, 32)), jnp.float32)},
        "embed": {"embedding": jnp.asarray(rng.standard_normal((512, 128)), jnp.float32)},
        "norm": {"scale": jnp.ones((128,), jnp.float32)},
        "small": {"kernel": jnp.ones((8, 8), jnp.float32)},
    }}


def test_default_policy_quantizes_kernels_only(rng):
    params = tree(rng)
    q = jq.quantize_tree(params)
    p = q["params"]
    assert isinstance(p["dense"]["kernel"], jq.QArray) and p["dense"]["kernel"].axis == 0
    assert isinstance(p["attn"]["kernel"], jq.QArray) and p["attn"]["kernel"].double_quant
    for kept in (p["dense"]["bias"], p["embed"]["embedding"], p["norm"]["scale"], p["small"]["kernel"]):
        assert not isinstance(kept, jq.QArray)
    back = jq.dequantize_tree(q)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    err = jnp.abs(back["params"]["dense"]["kernel"] - params["params"]["dense"]["kernel"]).mean()
    assert 0 < float(err) < 0.1


def test_rules_first_match_wins_and_frozendict(rng):
    params = flax.core.freeze(tree(rng))
    policy = jq.Policy(rules=(jq.Rule("attn", qtype=None), jq.Rule(r"embedding$", "int8", 128, axis=1,
                                                                   double_quant=False),
                              jq.Rule(r"kernel$", "fp4", 32)), min_size=1000)
    q = jq.quantize_tree(params, policy)
    assert not isinstance(q["params"]["attn"]["kernel"], jq.QArray)
    assert q["params"]["embed"]["embedding"].qtype == "int8"
    assert q["params"]["dense"]["kernel"].qtype == "fp4" and q["params"]["dense"]["kernel"].block_size == 32


def test_predicate_escape_hatch(rng):
    policy = jq.Policy(predicate=lambda path, leaf: "dense" not in path)
    q = jq.quantize_tree(tree(rng), policy)
    assert not isinstance(q["params"]["dense"]["kernel"], jq.QArray)
    assert isinstance(q["params"]["attn"]["kernel"], jq.QArray)


def test_abstract_tree_plans_memory_without_allocating(rng):
    abstract = jax.eval_shape(lambda: tree(rng))
    q = jq.quantize_tree(abstract)
    assert isinstance(q["params"]["dense"]["kernel"].codes, jax.ShapeDtypeStruct)
    assert jq.nbytes(q) == jq.nbytes(jq.quantize_tree(tree(rng)))


def test_rule_matching_nothing_warns_or_raises(rng):
    policy = jq.Policy(rules=(jq.Rule(r"kernel$"), jq.Rule("no_such_layer")))
    with pytest.warns(UserWarning, match="'no_such_layer' matches no parameter"):
        jq.quantize_tree(tree(rng), policy)
    with pytest.raises(jq.PolicyError, match="no_such_layer"):
        jq.quantize_tree(tree(rng), jq.Policy(rules=policy.rules, strict=True))


def test_default_policy_leaves_what_it_cannot_quantize_with_the_reason(rng):
    params = {"conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 30, 64)), jnp.float32)},
              "mnist": {"kernel": jnp.asarray(rng.standard_normal((784, 64)), jnp.float32)},
              "ints": {"kernel": jnp.ones((128, 128), jnp.int32)}}
    q = jq.quantize_tree(params)
    assert q["mnist"]["kernel"].axis == 0  # 784 = 12 blocks of 64 and a partial one of 16
    err = jq.dequantize(q["mnist"]["kernel"]) - params["mnist"]["kernel"]
    assert 0.05 < float(jnp.linalg.norm(err) / jnp.linalg.norm(params["mnist"]["kernel"])) < 0.12
    assert q["conv"]["kernel"].axis == (0, 1, 2)  # kh * kw * cin = 270: a partial last block too
    assert not isinstance(q["ints"]["kernel"], jq.QArray)
    rows = {r["path"]: r for r in jq.memory_report(params, q)}
    assert rows["ints/kernel"]["why"] == "dtype int32 is not floating"
    assert "ints/kernel" in jq.format_report(list(rows.values()))


def test_policy_error_lists_every_offending_leaf(rng):
    params = {"a": {"kernel": jnp.ones((96, 64))}, "b": {"kernel": jnp.ones((80, 64))},
              "c": {"kernel": jnp.ones((128, 64))}}
    with pytest.raises(jq.PolicyError, match=r"2 parameter\(s\)(.|\n)*'a/kernel' \(96, 64\)(.|\n)*"
                                             r"'b/kernel' \(80, 64\)"):
        jq.quantize_tree(params, jq.Policy(rules=(jq.Rule(r"kernel$", axis=0),), min_size=1))


def test_layouts_give_contraction_and_stack_axes(rng):
    w = jnp.asarray(rng.standard_normal((3, 4, 32, 128)), jnp.float32)  # 3 layers of (h, d, F)
    layouts = {"out/kernel": jq.Layout((0, 1), stack=1)}
    q = jq.quantize_tree({"out": {"kernel": w}}, layouts=layouts)["out"]["kernel"]
    assert q.shape == (4, 32, 128) and q.axis == (0, 1) and q.codes.shape == (3, 128, 64)
    assert q.scale.offset.shape == (3,) and jq.num_params(q) == w.size
    for i in range(3):  # layer i is the quantization of w[i] alone
        one = jq.quantize(w[i], "nf4", 64, axis=(0, 1), double_quant=True)
        layer = jax.tree.map(lambda a: a[i], q)
        for a, b in zip(jax.tree.leaves(layer), jax.tree.leaves(one)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jq.dequantize(q)[1], jq.dequantize(one if i == 1 else
                                  jq.quantize(w[1], "nf4", 64, axis=(0, 1), double_quant=True)))


def test_merged_axes_are_the_reshaped_arrays_bytes(rng):
    w = jnp.asarray(rng.standard_normal((4, 32, 96)), jnp.float32)
    q = jq.quantize(w, "nf4", 64, axis=(0, 1), double_quant=True)
    flat = jq.quantize(w.reshape(128, 96), "nf4", 64, axis=0, double_quant=True)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(flat)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jq.dequantize(q), jq.dequantize(flat).reshape(4, 32, 96))
    np.testing.assert_array_equal(jq.unpack_codes(q), jq.unpack_codes(flat).reshape(4, 32, 96))
    with pytest.raises(ValueError, match="contiguous"):
        jq.quantize(w, "nf4", 64, axis=(0, 2))


def test_unquantizable_params_name_path_and_reason(rng):
    with pytest.raises(jq.PolicyError, match=r"params/dense/kernel.*not a multiple of block_size 96"):
        jq.quantize_tree(tree(rng), jq.Policy(rules=(jq.Rule(r"dense/kernel$", block_size=96),)))
    ints = {"w": jnp.ones((64, 128), jnp.int32)}
    with pytest.raises(jq.PolicyError, match=r"'w'.*not floating"):
        jq.quantize_tree(ints, jq.Policy(rules=(jq.Rule("w"),), min_size=1))
    with pytest.raises(jq.PolicyError, match=r"params/dense/kernel.*axis"):
        jq.quantize_tree(tree(rng), jq.Policy(rules=(jq.Rule(r"dense/kernel$", axis=3),)))


def test_memory_report_rows_and_totals(rng):
    params = tree(rng)
    q = jq.quantize_tree(params)
    rows = jq.memory_report(params, q, with_error=True)
    by_path = {r["path"]: r for r in rows}
    dense = by_path["params/dense/kernel"]
    assert dense["bytes_before"] == 256 * 128 * 4 and abs(dense["bits_per_param"] - 4.13) < 0.01
    assert 0.05 < dense["rel_rms_error"] < 0.15 and "rel_rms_error" not in by_path["params/norm/scale"]
    text = jq.format_report(rows)
    assert "total" in text.splitlines()[-1] and "params/dense/kernel" in text


def test_donate_frees_the_quantized_inputs_only(rng):
    """donate=True gives the same tree and deletes the input arrays it quantized (their memory
    is released as it goes), leaving the kept leaves alone."""
    import numpy as np

    params = tree(rng)
    ref = jq.quantize_tree(jax.tree.map(lambda a: a + 0, params))  # from copies
    got = jq.quantize_tree(params, donate=True)
    assert jax.tree.structure(got) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    p = params["params"]
    assert p["dense"]["kernel"].is_deleted() and p["attn"]["kernel"].is_deleted()
    kept = (p["dense"]["bias"], p["embed"]["embedding"], p["norm"]["scale"], p["small"]["kernel"])
    assert not any(x.is_deleted() for x in kept)


def test_donate_keeps_an_array_that_another_leaf_still_uses(rng):
    """One array under two quantized paths and under a kept one (tied weights): donate must not
    delete it while a later leaf or the returned tree still needs it."""
    w = jnp.asarray(rng.standard_normal((256, 128)), jnp.float32)
    params = {"a": {"kernel": w}, "b": {"kernel": w}}
    q = jq.quantize_tree(params, donate=True)
    np.testing.assert_array_equal(q["a"]["kernel"].codes, q["b"]["kernel"].codes)
    assert w.is_deleted()  # after its last use
    w = jnp.asarray(rng.standard_normal((256, 128)), jnp.float32)
    policy = jq.Policy(rules=(jq.Rule(r"^kept/", qtype=None), jq.Rule(r"kernel$")))
    q = jq.quantize_tree({"kept": {"kernel": w}, "quant": {"kernel": w}}, policy, donate=True)
    assert not w.is_deleted() and q["kept"]["kernel"] is w


def test_merged_and_stacked_qarrays_save_and_load(rng, tmp_path):
    w = jnp.asarray(rng.standard_normal((2, 4, 32, 128)), jnp.float32)
    q = jq.quantize_tree({"kernel": w}, layouts={"kernel": jq.Layout((0, 1), stack=1)})
    jq.save(tmp_path / "m.safetensors", q)
    back = jq.load(tmp_path / "m.safetensors", jax.eval_shape(lambda: q))["kernel"]
    assert back.axis == (0, 1) and back.codes.shape == (2, 128, 64)
    np.testing.assert_array_equal(jq.dequantize(back), jq.dequantize(q["kernel"]))
