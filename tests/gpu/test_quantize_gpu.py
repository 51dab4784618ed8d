"""quantize on the GPU gives the CPU's bytes: codes, constants (nested ones included) and zero
points, for every qtype, along axis None / 0 / -1, through each GPU path (the Hopper quantize
kernel, the in-place blocks of a leading axis, the rows path), on inputs that sit on the
quantizers' midpoints and ties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import chex
import jaxquant as jq
from jaxquant._src.kernels import platform
from jaxquant._src.testing import awkward_bf16

QTYPES = [("nf4", False), ("fp4", False), ("int4", False), ("int4", True), ("int8", True),
          ("dynamic8", False)]

# per axis: (shape, dtype, block size, double quant); 2M-element weights reproduce the GPU's
# old division error (40,722 differing FP4 codes in a 4096x14336 weight: ~1,400 expected here)
SHAPES = {
    None: [((512, 4096), jnp.bfloat16, 64, True),  # nf4 / fp4: the Hopper quantize kernel
           ((7, 333, 5), jnp.float32, 64, False),  # a partial last block
           ((3, 1000), jnp.float16, 32, True)],
    0: [((4096, 512), jnp.bfloat16, 64, True),  # blocks reduced in place down the columns
        ((192, 3, 130), jnp.float32, 64, False),  # in place, with trailing dims
        ((100, 33), jnp.float16, 64, True)],  # a partial block: the rows path
    -1: [((2, 128, 4096), jnp.bfloat16, 64, False),  # nf4 / fp4: the kernel along the last axis
         ((300, 100), jnp.float16, 64, True),  # partial blocks at each row's end
         ((5, 7, 96), jnp.float32, 32, False)],
}


def make_input(rng, shape, dtype):
    """bf16/f16: values on the NF4 and FP4 midpoints, a zero block, tiny and heavy-tailed blocks
    (testing.awkward_bf16); float32: heavy-tailed normals with full mantissas."""
    if dtype == jnp.float32:
        x = rng.standard_normal(shape) * np.where(rng.random(shape) < 0.02, 30.0, 1.0)
        return jnp.asarray(x, jnp.float32)
    return awkward_bf16(rng, shape).astype(dtype)


def bits(tree):
    """The tree with float leaves viewed as unsigned ints: equality is bit equality."""
    def view(a):
        a = np.asarray(a)
        return a.view(f"u{a.itemsize}") if a.dtype.kind == "f" or a.dtype.name == "bfloat16" else a
    return jax.tree.map(view, tree)


def assert_same_bytes(got, want):
    """Same QArray metadata (the treedef) and, leaf by leaf, the same bits."""
    chex.assert_trees_all_equal_structs(got, want)
    chex.assert_trees_all_equal(bits(got), bits(want), strict=True)


@pytest.mark.gpu
@pytest.mark.parametrize("axis", [None, 0, -1])
@pytest.mark.parametrize("qtype,zero_point", QTYPES)
def test_gpu_quantize_is_bit_exact_with_the_cpu(qtype, zero_point, axis, cpu, gpu, rng):
    for shape, dtype, block, dq in SHAPES[axis]:
        x = make_input(rng, shape, dtype)
        kw = dict(qtype=qtype, block_size=block, axis=axis, double_quant=dq, zero_point=zero_point)
        want = jq.quantize(jax.device_put(x, cpu), **kw)
        got = jq.quantize(jax.device_put(x, gpu), **kw)
        assert got.codes.devices() == {gpu} and want.codes.devices() == {cpu}
        assert_same_bytes(got, want)
        if axis == 0 and len(shape) == 2:  # the same blocks as rows of x.T on the GPU
            rows = jq.quantize(jax.device_put(x.T, gpu), **{**kw, "axis": 1})
            chex.assert_trees_all_equal(bits(jax.tree.leaves(rows)), bits(jax.tree.leaves(want)),
                                        strict=True)


def test_the_bf16_shapes_take_the_quantize_kernel_for_nf4(monkeypatch):
    """(Runs anywhere: lowered for CUDA.) The bf16 shapes along None and -1 take the Hopper
    kernel, the one along 0 XLA's in-place blocks (the kernel takes bf16 only): the GPU test
    covers both."""
    monkeypatch.setattr(platform, "hopper_present", lambda: True)
    jax.clear_caches()  # drop traces made without a Hopper GPU
    try:
        for axis, cases in SHAPES.items():
            shape, dtype, block, dq = cases[0]
            assert dtype == jnp.bfloat16 and all(c[1] != jnp.bfloat16 for c in cases[1:])
            quantize = jax.jit(lambda x: jq.quantize(x, "nf4", block, axis, dq))
            text = quantize.trace(jax.ShapeDtypeStruct(shape, dtype)).lower(
                lowering_platforms=("cuda",)).as_text()
            assert ("mosaic_gpu" in text) == (axis != 0), (shape, axis)
    finally:
        jax.clear_caches()


@pytest.mark.gpu
@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("qtype,zero_point", QTYPES)
def test_non_finite_blocks_get_a_nan_constant_on_both(qtype, zero_point, axis, cpu, gpu, rng):
    """NaN and +-inf blocks: a NaN constant on the GPU as on the CPU, dequantizing to NaN; every
    other block's codes and constants the same bits. (256 rows: XLA:CPU's own max reduction
    drops NaN from 64 rows on, which the quantizers guard against.)"""
    x = np.asarray(awkward_bf16(rng, (256, 512)), np.float32)
    x[3, 7], x[100, 200], x[255, 511], x[150, 300] = np.inf, -np.inf, np.inf, np.nan
    x = jnp.asarray(x, jnp.bfloat16)
    kw = dict(qtype=qtype, block_size=64, axis=axis, zero_point=zero_point, check_finite=False)
    want = jq.quantize(jax.device_put(x, cpu), **kw)
    got = jax.device_put(jq.quantize(jax.device_put(x, gpu), **kw), cpu)
    nan = np.isnan(np.asarray(want.scale))
    assert nan.sum() == 4
    np.testing.assert_array_equal(np.isnan(np.asarray(got.scale)), nan)
    np.testing.assert_array_equal(bits(got.scale)[~nan], bits(want.scale)[~nan])
    values = np.asarray(jq.dequantize(want, jnp.float32))
    finite = np.isfinite(values)
    assert (~finite).sum() == 4 * 64
    np.testing.assert_array_equal(np.isfinite(np.asarray(jq.dequantize(got, jnp.float32))), finite)
    np.testing.assert_array_equal(np.asarray(jq.unpack_codes(got))[finite],
                                  np.asarray(jq.unpack_codes(want))[finite])
    if zero_point:
        np.testing.assert_array_equal(np.asarray(got.zero_point), np.asarray(want.zero_point))


@pytest.mark.gpu
class QuantizeUnderJit(chex.TestCase):
    """Inside a user's jit (quantize_tree with out_shardings, a training step) XLA may fuse the
    quantizer with its neighbours: the bytes must not change."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_jitted_gpu_quantize_gives_the_cpu_bytes(self):
        rng = np.random.default_rng(5)
        cpu, gpu = jax.devices("cpu")[0], jax.devices("gpu")[0]
        x = awkward_bf16(rng, (2048, 1536))
        for qtype, axis, zero_point in [("nf4", 0, False), ("fp4", None, False), ("int4", 0, True)]:
            kw = dict(qtype=qtype, block_size=64, axis=axis, double_quant=True, zero_point=zero_point)
            quantize = self.variant(lambda x: jq.quantize(x * 2, **kw))  # a neighbour to fuse
            want = jq.quantize(jax.device_put(x, cpu) * 2, **kw)
            assert_same_bytes(quantize(jax.device_put(x, gpu)), want)
