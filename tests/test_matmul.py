"""qmatmul: the XLA reference path against float64 numpy, one suite run against every
implementation (the XLA path, the Mosaic GPU and TPU kernels interpreted), gradients, empty
batches and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant._src.kernels import qmatmul_tpu

# every implementation, as qmatmul(x, q) with bf16 compute; the kernels in interpret mode
IMPLEMENTATIONS = {
    "xla": lambda x, q: jq.qmatmul(x, q, implementation="xla"),
    "mgpu-interpret": lambda x, q: jq.qmatmul(x, q, implementation="pallas", interpret=True),
    "tpu-interpret": lambda x, q: qmatmul_tpu.qmatmul(x, q, interpret=True),
}
# a kernel's run in the interpreter takes 3-7 s on 2 cores
IMPLEMENTATION_PARAMS = [pytest.param(name, marks=() if name == "xla" else pytest.mark.slow)
                         for name in IMPLEMENTATIONS]
KERNEL_CASES = [  # shapes and formats every kernel handles: (lead, K, N, qtype, double_quant)
    ((1,), 512, 256, "nf4", True),
    ((2, 5), 256, 128, "fp4", False),
    ((3,), 512, 256, "int4", False),
]

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


@pytest.mark.parametrize("impl", IMPLEMENTATION_PARAMS)
@pytest.mark.parametrize("lead,k,n,qtype,dq", KERNEL_CASES)
def test_every_implementation_matches_float64_reference(impl, lead, k, n, qtype, dq, rng):
    w = weights(rng, k, n, heavy=True)
    q = jq.quantize(jnp.asarray(w, jnp.bfloat16), qtype, 64, axis=0, double_quant=dq)
    x = jnp.asarray(rng.standard_normal((*lead, k)), jnp.bfloat16)
    ref = np.asarray(x, np.float64) @ np.asarray(jq.dequantize(q), np.float64)
    out = IMPLEMENTATIONS[impl](x, q)
    assert out.shape == (*lead, n) and out.dtype == jnp.bfloat16
    # bf16 operands (the weight rounded once more after its scale) and a bf16 result
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, atol=2e-2 * np.abs(ref).max(),
                               rtol=0)


@pytest.mark.parametrize("implementation,interpret", [
    ("xla", False), pytest.param("pallas", True, marks=pytest.mark.slow)])
def test_gradient_through_every_implementation(implementation, interpret, rng):
    q = jq.quantize(weights(rng, 256, 128), "nf4", 64, axis=0, double_quant=True)
    x = jnp.asarray(rng.standard_normal((3, 256)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((3, 128)), jnp.float32)
    loss = lambda x: jnp.sum(jq.qmatmul(x, q, implementation=implementation, interpret=interpret)
                             * ct)
    gx = jax.grad(loss)(x)
    # the backward pass is the XLA path's in every implementation: bf16 operands
    ref = np.asarray(ct, np.float64) @ np.asarray(jq.dequantize(q), np.float64).T
    np.testing.assert_allclose(gx, ref, atol=2e-2 * np.abs(ref).max(), rtol=0)


@pytest.mark.parametrize("implementation,interpret", [
    ("xla", False), ("auto", False), ("pallas", True), ("auto", True)])
@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_an_empty_batch_gives_the_empty_result(implementation, interpret, lead, rng):
    q = jq.quantize(weights(rng, 256, 128), "nf4", 64, axis=0, double_quant=True)
    f = lambda x: jq.qmatmul(x, q, implementation=implementation, interpret=interpret)
    x = jnp.ones((*lead, 256), jnp.bfloat16)
    for out in (f(x), jax.jit(f)(x)):
        assert out.shape == (*lead, 128) and out.dtype == jnp.bfloat16
    gx = jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32)))(x)
    assert gx.shape == x.shape and gx.dtype == x.dtype
