"""qmatmul: the XLA reference path against float64 numpy, gradients, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq

CASES = [  # (M-shape of x's leading dims, K, N, qtype, block, zero_point, double_quant)
    ((1,), 256, 128, "nf4", 64, False, True),
    ((3,), 200, 72, "nf4", 64, False, False),  # K not a multiple of the block: partial blocks
    ((17,), 128, 96, "fp4", 32, False, True),
    ((2, 5), 192, 40, "int4", 64, False, False),
    ((130,), 128, 64, "int4", 32, True, True),
    ((4,), 96, 24, "int8", None, False, False),
    ((2, 600), 128, 48, "nf4", 64, False, True),  # many tokens: the written-out weight path
]


def weights(rng, k, n, heavy=False):
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    if heavy:
        w = w * np.where(rng.random((k, n)) < 0.01, 20.0, 1.0).astype(np.float32)
    return w


@pytest.mark.parametrize("lead,k,n,qtype,bs,zp,dq", CASES)
@pytest.mark.parametrize("heavy", [False, True])
def test_xla_path_matches_float64_reference(lead, k, n, qtype, bs, zp, dq, heavy, rng):
    w = weights(rng, k, n, heavy)
    q = jq.quantize(w, qtype, bs, axis=0, double_quant=dq, zero_point=zp)
    x = rng.standard_normal((*lead, k)).astype(np.float32)
    ref = x.astype(np.float64) @ np.asarray(jq.dequantize(q), np.float64)
    out = jq.qmatmul(jnp.asarray(x), q, implementation="xla", compute_dtype=jnp.float32)
    assert out.shape == (*lead, n) and out.dtype == jnp.float32
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=1e-5 * scale * np.sqrt(k) / 8, rtol=0)
    bf16 = jq.qmatmul(jnp.asarray(x, jnp.bfloat16), q, implementation="xla")
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf16, np.float64), ref, atol=2e-2 * scale, rtol=0)


def test_gradient_wrt_x_and_none_for_codes(rng):
    w = weights(rng, 128, 48)
    q = jq.quantize(w, "nf4", 64, axis=0, double_quant=True)
    x = jnp.asarray(rng.standard_normal((3, 128)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((3, 48)), jnp.float32)
    loss = lambda x, q: jnp.sum(jq.qmatmul(x, q, compute_dtype=jnp.float32) * ct)
    gx, gq = jax.grad(loss, argnums=(0, 1), allow_int=True)(x, q)
    w_hat = np.asarray(jq.dequantize(q), np.float64)
    np.testing.assert_allclose(gx, np.asarray(ct, np.float64) @ w_hat.T, rtol=1e-5, atol=1e-5)
    assert isinstance(gq, jq.QArray)
    assert all(not np.any(np.asarray(leaf, np.float32)) for leaf in jax.tree.leaves(gq)
               if leaf.dtype != jax.dtypes.float0)
    gx_jit = jax.jit(jax.grad(loss))(x, q)
    np.testing.assert_allclose(gx_jit, gx, rtol=1e-6)


def test_bad_input(rng):
    q = jq.quantize(weights(rng, 128, 64), "nf4", 64, axis=0)
    x = jnp.ones((2, 128), jnp.float32)
    with pytest.raises(ValueError, match="last dimension must equal W's K"):
        jq.qmatmul(jnp.ones((2, 127)), q)
    with pytest.raises(TypeError, match="float x"):
        jq.qmatmul(jnp.ones((2, 128), jnp.int32), q)
    with pytest.raises(ValueError, match="quantized along its contraction axis"):
        jq.qmatmul(x, jq.quantize(weights(rng, 128, 64), "nf4", 64, axis=None))
    with pytest.raises(ValueError, match="quantized along its contraction axis"):
        jq.qmatmul(x, jq.quantize(weights(rng, 128, 64), "nf4", 64, axis=1))
    with pytest.raises(TypeError, match="compute_dtype"):
        jq.qmatmul(x, q, compute_dtype=jnp.int8)
    with pytest.raises(ValueError, match="implementation must be one of"):
        jq.qmatmul(x, q, implementation="triton")
    with pytest.raises(NotImplementedError):
        jq.qmatmul(x, q, implementation="pallas")
