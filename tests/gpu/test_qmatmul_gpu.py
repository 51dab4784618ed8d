"""The Mosaic GPU qmatmul kernel on the GPU against the XLA path: its real PTX decodes (the
shared-memory byte-pair table at each step length, the prmt lookups in registers), one and two
warpgroups, split-K and in-place output, token tiles and persistent CTAs, for NF4 / FP4 / int4
with and without double quant, token counts from 1 to 2000, batch dims.

Tolerance: the kernel rounds each table value and each product with its scale to bf16 (fp16),
the XLA path dequantizes in float32 and rounds once; the relative Frobenius error measured on an
H100 is 2.0e-3 - 3.8e-3 in bf16 and ~4.5e-4 in fp16, so a bound of ~1.3 eps fails on a wrong
decode or constant but not on rounding; each element is held to 1.5 eps of the output's largest
value (its rounding) plus float32 summation-order slack.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant._src.kernels import platform
from jaxquant._src.kernels import qmatmul_mgpu as K
from jaxquant._src.kernels import qmatmul_tuning

FROBENIUS = {np.dtype(jnp.bfloat16): 1e-2, np.dtype(jnp.float16): 1.25e-3}

# (x's leading dims, K, N, qtype, double quant, block size, the kernel path on a 132-SM Hopper)
PUBLIC = [
    ((1,), 4096, 512, "nf4", True, 64, "table32 k256 1wg split-K"),  # x read unpadded (< 8 tokens)
    ((3,), 1024, 192, "nf4", False, 64, "table32 k256 1wg split-K"),
    ((17,), 2048, 320, "fp4", True, 64, "table32 k256 1wg split-K"),
    ((2, 16), 768, 64, "int4", False, 64, "table32 k256 1wg direct"),
    ((64,), 14336, 256, "nf4", True, 64, "table32 k256 1wg split-K"),  # 28 splits
    ((1,), 576, 1536, "nf4", True, 64, "table32 k64 1wg split-K"),  # SmolLM2's K: 64-k steps
    ((40,), 576, 192, "fp4", True, 64, "table32 k64 1wg split-K"),
    ((17,), 1024, 256, "nf4", True, 128, "table32 k256 1wg split-K"),  # blocks of 128
    # two warpgroups sharing x, fed by a third (warp specialization)
    ((100,), 4096, 256, "nf4", True, 64, "table32 k128 2wg split-K"),
    ((130,), 2048, 1024, "fp4", False, 64, "table32 k128 2wg split-K tiles"),
    ((130,), 1024, 14336, "nf4", True, 64, "table32 k128 2wg direct"),  # 136-token tiles
    ((256,), 1024, 14336, "fp4", True, 64, "table32 k128 2wg direct"),  # stored in two halves
    ((2, 512), 1024, 4096, "nf4", False, 64, "table32 k128 2wg direct tiles"),
    # persistent CTAs: 4 and 7 tiles each as chained pipelines (the last token tile padding)
    ((1024,), 1024, 14336, "nf4", True, 64, "table32 k128 2wg persistent tiles"),
    ((2, 1000), 1024, 14336, "int4", False, 64, "table32 k128 2wg persistent tiles"),
    ((200,), 1024, 192, "nf4", False, 64, "registers k128 1wg split-K tiles"),  # N % 128 != 0
]

_TABLE = lambda tile_k: K.BlockSizes(tile_k=tile_k, max_concurrent_steps=2, table_copies=32)
# (tokens, K, N, qtype, double quant, compute dtype, block sizes, path): what only explicit
# block sizes reach
EXPLICIT = [
    (3, 2048, 256, "fp4", False, jnp.bfloat16, K.BlockSizes(k_splits=2), "registers k256 1wg split-K"),
    (40, 1024, 128, "int4", False, jnp.bfloat16, K.BlockSizes(k_splits=1), "registers k256 1wg direct"),
    (256, 1024, 1024, "nf4", True, jnp.bfloat16, K.BlockSizes(compute_wgs=2, k_splits=1),
     "registers k256 2wg direct tiles"),
    (16, 1024, 256, "fp4", False, jnp.bfloat16,
     K.BlockSizes(table_copies=16, tile_k=128, max_concurrent_steps=3), "table16 k128 1wg split-K"),
    # the table decode's code loads follow the 32 / 64 / 128-byte swizzle of each step length
    (1, 2048, 384, "nf4", True, jnp.bfloat16, _TABLE(64), "table32 k64 1wg split-K"),
    (17, 2048, 384, "nf4", True, jnp.float16, _TABLE(64), "table32 k64 1wg split-K"),
    (17, 2048, 384, "nf4", True, jnp.bfloat16, _TABLE(128), "table32 k128 1wg split-K"),
    (1, 2048, 384, "nf4", True, jnp.float16, _TABLE(128), "table32 k128 1wg split-K"),
    (1, 2048, 384, "nf4", True, jnp.bfloat16, _TABLE(256), "table32 k256 1wg split-K"),
    (17, 2048, 384, "nf4", True, jnp.float16, _TABLE(256), "table32 k256 1wg split-K"),
]


def kernel_path(m, k, n, block=64, sizes=K.BlockSizes(), dtype=jnp.bfloat16) -> str:
    """The decode, step length, warpgroups, output and token tiling the kernel picks."""
    q = jq.QArray(codes=np.zeros((n, k // 2), np.uint8), scale=np.ones((n, k // block), np.float32),
                  shape=(k, n), qtype="nf4", block_size=block, axis=0)
    fitted = K.check_supported(jax.ShapeDtypeStruct((m, k), dtype), q, dtype, sizes)
    grid = qmatmul_tuning.launch(m, k, n, fitted)
    (token_tiles, _), splits, ctas = grid.tiles, grid.splits, grid.ctas
    decode = f"table{fitted.table_copies}" if fitted.table_copies else "registers"
    output = "split-K" if splits > 1 else "persistent" if ctas else "direct"
    return (f"{decode} k{fitted.tile_k} {fitted.compute_wgs}wg {output}"
            + (" tiles" if token_tiles > 1 else ""))


def test_the_cases_reach_every_kernel_path(monkeypatch):
    """(Runs anywhere.) Each case takes the path written beside it, and together they take
    every decode, step length, warpgroup count and output of the kernel."""
    monkeypatch.setattr(platform, "hopper_sm_count", lambda: 132)  # an H100 SXM or H200
    paths = [kernel_path(int(np.prod(lead)), k, n, block) for lead, k, n, _, _, block, _ in PUBLIC]
    assert paths == [case[-1] for case in PUBLIC]
    explicit = [kernel_path(m, k, n, 64, sizes, dtype)
                for m, k, n, _, _, dtype, sizes, _ in EXPLICIT]
    assert explicit == [case[-1] for case in EXPLICIT]
    for feature in ["table32 k64", "table32 k128", "table32 k256", "table16",
                    "registers k256 1wg split-K", "registers k256 1wg direct", "registers k256 2wg",
                    "registers k128 1wg split-K tiles", "1wg direct", "2wg split-K",
                    "2wg split-K tiles", "2wg direct", "2wg persistent"]:
        assert any(feature in p for p in paths + explicit), feature


def weights(rng, k, n, qtype, dq, heavy, block=64, dtype=jnp.bfloat16):
    """W[K, N] quantized along K; heavy: 1% of the weights 25x larger (large block constants)."""
    w = rng.standard_normal((k, n), dtype=np.float32) * 0.02
    if heavy:
        w *= np.where(rng.random((k, n)) < 0.01, 25.0, 1.0).astype(np.float32)
    return jq.quantize(jnp.asarray(w, dtype), qtype, block, axis=0, double_quant=dq)


def assert_close(out, ref, dtype, k):
    dtype = np.dtype(dtype)
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    err = jnp.abs(out - ref)
    rel = float(jnp.linalg.norm(err) / jnp.linalg.norm(ref))
    assert rel < FROBENIUS[dtype], f"relative Frobenius error {rel:.2e} (bound {FROBENIUS[dtype]:.1e})"
    largest = float(jnp.abs(ref).max())
    bound = largest * (1.5 * float(jnp.finfo(dtype).eps) + 1e-6 * np.sqrt(k))
    worst = np.unravel_index(int(jnp.argmax(err)), err.shape)
    assert float(err[worst]) <= bound, (
        f"at {worst}: kernel {float(out[worst])}, XLA {float(ref[worst])}; allowed {bound:.2e} "
        f"(max |ref| {largest:.2e})")


@pytest.mark.gpu
@pytest.mark.parametrize("lead,k,n,qtype,dq,block,path", PUBLIC, ids=[
    f"{'x'.join(map(str, c[0]))}x{c[1]}x{c[2]}-{c[3]}{'-dq' if c[4] else ''}-b{c[5]}" for c in PUBLIC])
def test_kernel_matches_the_xla_path(lead, k, n, qtype, dq, block, path, rng):
    for heavy in (False, True):
        q = weights(rng, k, n, qtype, dq, heavy, block)
        x = jnp.asarray(rng.standard_normal((*lead, k), dtype=np.float32), jnp.bfloat16)
        out = jq.qmatmul(x, q, implementation="pallas")
        assert out.shape == (*lead, n) and out.dtype == jnp.bfloat16
        assert_close(out, jq.qmatmul(x, q, implementation="xla"), jnp.bfloat16, k)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,qtype,dq,dtype,sizes,path", EXPLICIT, ids=[
    f"{c[0]}x{c[1]}x{c[2]}-{c[3]}-{np.dtype(c[5]).name}-{c[7].replace(' ', '-')}" for c in EXPLICIT])
def test_kernel_with_explicit_block_sizes_matches_the_xla_path(m, k, n, qtype, dq, dtype, sizes,
                                                               path, rng):
    q = weights(rng, k, n, qtype, dq, heavy=True, dtype=dtype)
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32), dtype)
    out = K.qmatmul(x, q, compute_dtype=dtype, block_sizes=sizes)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, jq.qmatmul(x, q, implementation="xla", compute_dtype=dtype), dtype, k)


@pytest.mark.gpu
def test_float16_through_the_public_call(rng):
    q = weights(rng, 2048, 512, "nf4", True, heavy=False, dtype=jnp.float16)
    x = jnp.asarray(rng.standard_normal((2, 16, 2048), dtype=np.float32), jnp.float16)
    out = jq.qmatmul(x, q, implementation="pallas", compute_dtype=jnp.float16)
    assert out.shape == (2, 16, 512) and out.dtype == jnp.float16
    ref = jq.qmatmul(x, q, implementation="xla", compute_dtype=jnp.float16)
    assert_close(out, ref, jnp.float16, 2048)


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,kernel", [
    (16, 2048, 1024, True),  # decode-sized batch on a 2M weight: the kernel
    (1, 576, 1536, False),  # one token on SmolLM2's 576x1536: XLA is faster there
    (3000, 1024, 1024, False)])  # past AUTO_MAX_TOKENS: XLA's dequantize + gemm
def test_auto_runs_the_kernel_where_it_is_faster(m, k, n, kernel, rng):
    q = weights(rng, k, n, "nf4", True, heavy=False)
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32), jnp.bfloat16)
    lowered = jax.jit(lambda x, q: jq.qmatmul(x, q)).lower(x, q).as_text()
    assert ("mosaic_gpu" in lowered) == kernel
    assert_close(jq.qmatmul(x, q), jq.qmatmul(x, q, implementation="xla"), jnp.bfloat16, k)


@pytest.mark.gpu
def test_gradient_through_the_kernel(rng):
    """The backward pass is XLA's (g @ W^T) for both: a squared loss makes g the forward
    output, so the kernel's output reaches the gradient."""
    q = weights(rng, 2048, 320, "fp4", True, heavy=True)
    x = jnp.asarray(rng.standard_normal((17, 2048), dtype=np.float32), jnp.bfloat16)
    loss = lambda impl: jax.jit(jax.grad(
        lambda x: jnp.sum(jq.qmatmul(x, q, implementation=impl).astype(jnp.float32) ** 2)))
    assert_close(loss("pallas")(x), loss("xla")(x), jnp.bfloat16, 320)


@pytest.mark.gpu
def test_cpu_placed_arrays_take_the_xla_path(cpu, rng):
    """On a Hopper machine, arrays committed to the CPU run auto's XLA path there (the kernel
    is chosen only when lowering for CUDA)."""
    q = jax.device_put(weights(rng, 2048, 1024, "nf4", True, heavy=False), cpu)
    x = jnp.asarray(rng.standard_normal((16, 2048), dtype=np.float32), jnp.bfloat16)
    x = jax.device_put(x, cpu)
    out = jax.jit(lambda x, q: jq.qmatmul(x, q))(x, q)
    assert out.devices() == {cpu}
    np.testing.assert_array_equal(out, jq.qmatmul(x, q, implementation="xla"))
