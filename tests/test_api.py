"""The public surface: every listed name imports and nothing else is public; the public functions
give the same results eager and under jit, against a small numpy model of NF4."""

import importlib
import inspect

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

# DESIGN.md's API contract: names that callers and outside checks rely on
CONTRACT = {"jaxquant": {"quantize", "dequantize", "unpack_codes", "nbytes", "bits_per_param",
                         "to_bnb", "from_bnb", "QArray", "qmatmul", "quantize_tree",
                         "dequantize_tree"},
            "jaxquant.flax": {"apply", "quantize_module"}}


@pytest.mark.parametrize("module", ["jaxquant", "jaxquant.flax"])
def test_every_public_name_imports_and_only_listed_names_are_public(module):
    namespace = {}
    exec(f"from {module} import *", namespace)  # what a user's star import gets: __all__
    mod = importlib.import_module(module)
    listed = set(mod.__all__)
    assert len(listed) == len(mod.__all__), "a name is listed twice"
    assert set(namespace) - {"__builtins__"} == listed
    public = {name for name, value in vars(mod).items()
              if not name.startswith("_") and not inspect.ismodule(value)}
    assert public == listed, "a public name is missing from __all__ (or listed but not defined)"
    assert CONTRACT[module] <= listed
    for name in listed:
        value = namespace[name]
        if callable(value):  # defined in the package, documented
            assert value.__module__.startswith("jaxquant."), (name, value.__module__)
            assert inspect.getdoc(value), f"{module}.{name} has no docstring"
    if module == "jaxquant":
        assert set(namespace["QTYPES"]) >= {"nf4", "fp4", "int4", "int8", "dynamic8"}
        assert namespace["QArray"] is jq.QArray and mod.flax is importlib.import_module("jaxquant.flax")


def nf4_model(w: np.ndarray, block: int):
    """Codes and dequantized values of ``w`` quantized along axis 0, in float64 numpy: each code
    the nearest NF4 level of ``w / absmax`` in its block of ``block`` consecutive rows."""
    table = np.asarray(jq.QTYPES["nf4"].values, np.float64)
    k, n = w.shape
    blocks = w.T.astype(np.float64).reshape(n, k // block, block)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    codes = np.abs(blocks[..., None] / absmax[..., None] - table).argmin(-1)
    values = table[codes] * absmax
    return codes.reshape(n, k).T, values.reshape(n, k).T


class PublicFunctionsUnderJit(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_quantize_dequantize_qmatmul_match_the_numpy_model(self):
        rng = np.random.default_rng(0)
        w = rng.standard_normal((128, 48)).astype(np.float32)
        x = rng.standard_normal((3, 128)).astype(np.float32)
        codes, w_hat = nf4_model(w, 64)
        quantize = self.variant(jq.quantize, static_argnames=("qtype", "block_size", "axis"))
        q = quantize(jnp.asarray(w), qtype="nf4", block_size=64, axis=0)
        assert (q.shape, q.dtype, q.qtype, q.block_size) == ((128, 48), np.float32, "nf4", 64)
        assert q.axis == 0
        chex.assert_trees_all_equal(np.asarray(self.variant(jq.unpack_codes)(q)), codes)
        chex.assert_trees_all_close(self.variant(jq.dequantize)(q), w_hat.astype(np.float32),
                                    rtol=1e-6, atol=0)
        qmatmul = self.variant(jq.qmatmul, static_argnames=("compute_dtype",))
        out = qmatmul(jnp.asarray(x), q, compute_dtype=jnp.float32)
        chex.assert_shape(out, (3, 48))
        ref = (x.astype(np.float64) @ w_hat).astype(np.float32)
        chex.assert_trees_all_close(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
