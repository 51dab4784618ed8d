import jax
import jax.numpy as jnp

import jaxquant as jq


def test_nbytes_counts_codes_constants_and_nested():
    x = jnp.ones((1024, 1024), jnp.bfloat16)
    plain = jq.quantize(x, "nf4", 64)
    assert jq.nbytes(plain) == 1024 * 1024 // 2 + 4 * 1024 * 1024 // 64
    assert jq.bits_per_param(plain) == 4.5
    dq = jq.quantize(x, "nf4", 64, double_quant=True)
    nb = 1024 * 1024 // 64
    assert jq.nbytes(dq) == 1024 * 1024 // 2 + nb + 4 * (nb // 256) + 4
    assert abs(jq.bits_per_param(dq) - (4 + 8 / 64 + 32 / (64 * 256))) < 1e-4
    assert jq.nbytes(jq.quantize(x, "int8", 128)) == 1024 * 1024 + 4 * 1024 * 1024 // 128


def test_trees_mix_quantized_and_plain_leaves():
    tree = {"w": jq.quantize(jnp.ones((256, 64)), "nf4", 64, axis=0), "b": jnp.ones((64,))}
    assert jq.num_params(tree) == 256 * 64 + 64
    assert jq.nbytes(tree) == 256 * 64 // 2 + 4 * 4 * 64 + 4 * 64


def test_abstract_trees_are_counted_without_allocation():
    spec = jax.ShapeDtypeStruct((4096, 14336), jnp.bfloat16)
    abstract = jax.eval_shape(lambda w: jq.quantize(w, "nf4", 64, 0, True), spec)
    assert isinstance(abstract.codes, jax.ShapeDtypeStruct)
    assert abs(jq.bits_per_param(abstract) - 4.127) < 1e-3


def test_llama2_7b_table():
    rows = {r["format"]: r for r in jq.memory_table()}
    assert rows["bf16"]["params"] == 6_738_415_616  # Llama-2-7B
    assert abs(rows["bf16"]["total_gb"] - 13.477) < 1e-3
    assert abs(rows["nf4"]["bits_per_param"] - 4.5) < 1e-3  # the few 1-D norms stay bf16
    assert abs(rows["nf4+dq"]["bits_per_param"] - 4.127) < 1e-3
    assert rows["nf4+dq"]["constants_gb"] < rows["nf4"]["constants_gb"] / 3.9
    qlora = {r["format"]: r for r in jq.memory_table(quantize_all=False)}
    assert qlora["nf4+dq"]["total_gb"] > rows["nf4+dq"]["total_gb"]  # embeddings stay bf16
