"""The Mosaic GPU qmatmul kernel, run by the Pallas GPU interpreter on CPU, against the XLA path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant._src.kernels import platform
from jaxquant._src.kernels import qmatmul_mgpu as K


def make(rng, k, n, qtype="nf4", dq=True, heavy=False, bs=64):
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    if heavy:
        w *= np.where(rng.random((k, n)) < 0.01, 25.0, 1.0).astype(np.float32)
    return jq.quantize(jnp.asarray(w, jnp.bfloat16), qtype, bs, axis=0, double_quant=dq)


def close(out, ref, k):
    """bf16 outputs may differ by one ulp of the largest output (2^-7 of it); the kernel rounds
    each weight twice (table value, then times its scale: 2^-8 relative, random sign, so the
    sum's error is ~2^-8 / 5 of the largest output; allow 5 sigma); f32 sums in another order."""
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, atol=scale * (2**-7 + 2**-8 + 1e-6 * np.sqrt(k)), rtol=0)


@pytest.mark.parametrize("lead,k,n,qtype,dq,heavy", [
    ((1,), 512, 64, "nf4", True, False),
    ((3,), 256, 128, "nf4", False, True),
    ((17,), 768, 64, "fp4", True, True),
    ((2, 5), 512, 192, "int4", False, False),
    ((32,), 256, 64, "nf4", True, False),
    ((48,), 256, 64, "nf4", True, True),  # m_pad 48: a 32-byte swizzle for x
    ((1,), 576, 64, "nf4", True, False),  # SmolLM2's K: 64-element steps
    ((100,), 512, 64, "nf4", True, True),  # m_pad 104: 128-element steps to fit the stage budget
])
def test_kernel_matches_xla_path(lead, k, n, qtype, dq, heavy, rng):
    q = make(rng, k, n, qtype, dq, heavy)
    x = jnp.asarray(rng.standard_normal((*lead, k)), jnp.bfloat16)
    out = jq.qmatmul(x, q, implementation="pallas", interpret=True)
    assert out.shape == (*lead, n) and out.dtype == jnp.bfloat16
    close(out, jq.qmatmul(x, q, implementation="xla"), k)


def test_split_k_and_block_128(rng):
    q = make(rng, 1024, 64, bs=128)
    x = jnp.asarray(rng.standard_normal((5, 1024)), jnp.bfloat16)
    ref = jq.qmatmul(x, q, implementation="xla")
    for splits in (2, 4):
        out = K.qmatmul(x, q, interpret=True, block_sizes=K.BlockSizes(k_splits=splits))
        close(out, ref, 1024)


@pytest.mark.parametrize("sizes", [K.BlockSizes(table_copies=12),
                                   K.BlockSizes(table_copies=32, tile_k=512)])
def test_decode_tables_the_kernel_cannot_build_raise(sizes, rng):
    q = make(rng, 512, 128)
    with pytest.raises(NotImplementedError, match="table"):
        K.qmatmul(jnp.ones((4, 512), jnp.bfloat16), q, interpret=True, block_sizes=sizes)


@pytest.mark.parametrize("sizes", [K.BlockSizes(persistent_ctas=4),  # one warpgroup
                                   K.BlockSizes(compute_wgs=2, k_splits=2, persistent_ctas=4)])
def test_persistent_ctas_the_kernel_cannot_run_raise(sizes, rng):
    q = make(rng, 512, 128)
    with pytest.raises(NotImplementedError, match="persistent_ctas"):
        K.qmatmul(jnp.ones((4, 512), jnp.bfloat16), q, interpret=True, block_sizes=sizes)


@pytest.mark.parametrize("case", ["N=100", "K=288", "block 32", "affine", "int8", "f32"])
def test_unsupported_inputs_raise_for_pallas_and_fall_back_for_auto(case, rng):
    k, n, m, kwargs, dtype = 512, 64, 4, {}, jnp.bfloat16
    if case == "N=100":
        n = 100
    elif case == "K=288":  # not a multiple of 64 (the shortest step)
        k = 288
    elif case == "block 32":
        kwargs = dict(bs=32)
    q = {"affine": lambda: jq.quantize(rng.standard_normal((k, n)).astype(np.float32), "int4", 64,
                                        axis=0, zero_point=True),
         "int8": lambda: jq.quantize(rng.standard_normal((k, n)).astype(np.float32), "int8", 64, axis=0),
         }.get(case, lambda: make(rng, k, n, **kwargs))()
    compute = jnp.float32 if case == "f32" else None
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    with pytest.raises(NotImplementedError, match="qmatmul_mgpu does not handle"):
        jq.qmatmul(x, q, implementation="pallas", interpret=True, compute_dtype=compute)
    auto = jq.qmatmul(x, q, implementation="auto", interpret=True, compute_dtype=compute)
    np.testing.assert_array_equal(auto, jq.qmatmul(x, q, implementation="xla", compute_dtype=compute))


@pytest.mark.parametrize("m,block_sizes", [
    (130, K.BlockSizes()),  # two token tiles of 128, each written transposed in place
    (40, K.BlockSizes(token_tile=16, k_splits=1)),  # three tiles, the last one partly padding
    (40, K.BlockSizes(token_tile=16, k_splits=2)),  # the same through float32 partial sums
    (24, K.BlockSizes(compute_wgs=2, k_splits=1)),  # two warpgroups share x (warp specialized)
    (24, K.BlockSizes(compute_wgs=2, k_splits=2, token_tile=8)),
    (24, K.BlockSizes(table_copies=32)),  # (the interpreter decodes through jnp either way)
    # two warpgroups with the table decode: x in stored k order, in place or split
    (24, K.BlockSizes(compute_wgs=2, k_splits=1, table_copies=16)),
    (40, K.BlockSizes(compute_wgs=2, k_splits=2, token_tile=16, table_copies=32)),
    # two token tiles of 32, each stored in two halves (the last one partly padding)
    (40, K.BlockSizes(compute_wgs=2, k_splits=1, token_tile=32, table_copies=32)),
])
def test_token_tiles_warpgroups_and_direct_output(m, block_sizes, rng):
    q = make(rng, 512, 128, heavy=True)
    x = jnp.asarray(rng.standard_normal((m, 512)), jnp.float32)
    out = K.qmatmul(x, q, interpret=True, block_sizes=block_sizes)
    assert out.shape == (m, 128) and out.dtype == jnp.float32
    close(out, jq.qmatmul(x, q, implementation="xla"), 512)


@pytest.mark.parametrize("m,n,preset,splits", [
    (256, 14336, "MANY", 1), (1024, 4096, "MANY", 1), (2048, 14336, "MANY", 1),
    (96, 14336, "MID", 1), (128, 4096, "MID", 4), (65, 2048, "MID", 8),
    (256, 4096, "MID", 2), (512, 4096, "MID", 1), (64, 14336, "FEW", 1),
    (512, 14400, None, None), (100, 14400, None, None)])
def test_block_sizes_by_token_count(m, n, preset, splits):
    """<= 64 tokens: one warpgroup with the table decode (FEW); 65-128: two warpgroups on
    128-token tiles, K split to ~112 CTAs (MID); beyond: 256-token tiles where they make >= 100
    CTAs (MANY), else MID again; for N not a multiple of 128 the split-K kernel's defaults."""
    q = jq.QArray(codes=np.zeros((n, 2048), np.uint8), scale=np.ones((n, 64), np.float32),
                  shape=(4096, n), qtype="nf4", block_size=64, axis=0)
    chosen = K._check_supported(jnp.zeros((m, 4096), jnp.bfloat16), q, jnp.bfloat16)
    expected = {"FEW": K.FEW_TOKENS, "MID": K.MID_TOKENS, "MANY": K.MANY_TOKENS,
                None: K.BlockSizes()}[preset]
    assert dataclasses.replace(chosen, tile_k=expected.tile_k,
                               max_concurrent_steps=expected.max_concurrent_steps) == expected
    if preset in ("MID", "MANY"):  # 128-k steps of x fit beside the table: 3 or 2 of them
        assert chosen.tile_k == 128 and chosen.max_concurrent_steps == (3 if preset == "MID" else 2)
    if splits:
        tokens, m_pad = K._token_tiling(m, chosen)
        assert K._k_splits(4096, n, tokens, m_pad // tokens, chosen) == splits


@pytest.mark.parametrize("m,token_tile,persistent,ctas", [
    (48, 8, 2, 2),  # 6 tiles: 2 CTAs of 3 (chained pipelines START, STEADY, STOP)
    (48, 8, 3, 3),  # 3 CTAs of 2 (START, STOP)
    (40, 16, 1, 1),  # one CTA of 3, the last tile partly padding
    (40, 8, 2, 0)])  # 5 tiles in 3 rounds do not divide evenly: a CTA per tile
def test_persistent_ctas_run_several_tiles_as_chained_pipelines(m, token_tile, persistent, ctas,
                                                                 rng):
    q = make(rng, 512, 128, heavy=True)  # one weight tile of 128 rows, 4 steps
    x = jnp.asarray(rng.standard_normal((m, 512)), jnp.float32)
    sizes = K.BlockSizes(tile_k=128, max_concurrent_steps=2, k_splits=1, compute_wgs=2,
                         token_tile=token_tile, table_copies=32, persistent_ctas=persistent)
    chosen = K._check_supported(x, q, jnp.bfloat16, sizes)
    tokens, m_pad = K._token_tiling(m, chosen)
    assert K._persistent_ctas(m_pad // tokens, 512 // chosen.tile_k, chosen) == ctas
    out = K.qmatmul(x, q, interpret=True, block_sizes=sizes)
    close(out, jq.qmatmul(x, q, implementation="xla"), 512)


@pytest.mark.parametrize("m,k,n,ctas", [
    (2048, 4096, 14336, 128), (1024, 4096, 14336, 112), (300, 4096, 14336, 112),
    (2048, 4096, 4096, 128),
    (256, 4096, 14336, 0),  # 112 tiles: one round
    (1792, 4096, 14336, 0),  # 784 tiles in 6 rounds do not divide evenly
    (2048, 14336, 4096, 0)])  # 112-step tiles: one CTA each is as fast
def test_many_tokens_run_persistent_where_tiles_are_short_and_many(m, k, n, ctas):
    q = jq.QArray(codes=np.zeros((n, k // 2), np.uint8), scale=np.ones((n, k // 64), np.float32),
                  shape=(k, n), qtype="nf4", block_size=64, axis=0)
    chosen = K._check_supported(jnp.zeros((m, k), jnp.bfloat16), q, jnp.bfloat16)
    tiles = np.prod(K._output_tiles(m, n, chosen))
    assert K._persistent_ctas(tiles, k // chosen.tile_k, chosen) == ctas


@pytest.mark.parametrize("sms,tiles,ctas", [(114, 896, 112), (114, 256, 0), (132, 896, 128),
                                            (None, 896, 128)])
def test_persistent_ctas_are_at_most_the_gpus_sms(sms, tiles, ctas, monkeypatch):
    """On an H100 PCIe (114 SMs) 132 CTAs would run as two waves: the rounds are counted with the
    GPU's own SM count where the runtime gives it."""
    monkeypatch.setattr(platform, "hopper_sm_count", lambda: sms)
    assert K._persistent_ctas(tiles, 32, K.MANY_TOKENS) == ctas


@pytest.mark.parametrize("m,k,n,splits", [(1, 4096, 14336, 1), (16, 14336, 4096, 4),
                                          (64, 4096, 4096, 4), (65, 4096, 4096, None)])
def test_few_tokens_take_the_table_decode_in_fewer_longer_ctas(m, k, n, splits):
    q = jq.QArray(codes=np.zeros((n, k // 2), np.uint8), scale=np.ones((n, k // 64), np.float32),
                  shape=(k, n), qtype="nf4", block_size=64, axis=0)
    chosen = K._check_supported(jnp.zeros((m, k), jnp.bfloat16), q, jnp.bfloat16)
    assert (chosen.table_copies == 32 and chosen.compute_wgs == 1) == (splits is not None)
    if splits:  # ~200 CTAs with several steps each, so that the table's fill pays
        tokens, m_pad = K._token_tiling(m, chosen)
        assert K._k_splits(k, n, tokens, m_pad // tokens, chosen) == splits
        assert chosen.max_concurrent_steps == 2 and chosen.tile_k == 256


def test_warp_specialized_sizes_through_the_public_call(monkeypatch, rng):
    monkeypatch.setattr(K, "MANY_TOKENS_MIN_CTAS", 1)  # at a shape the interpreter can afford
    q = make(rng, 256, 256, heavy=True)
    x = jnp.asarray(rng.standard_normal((2, 50, 256)), jnp.bfloat16)
    assert K._check_supported(x, q, jnp.bfloat16).compute_wgs == 2
    out = jq.qmatmul(x, q, implementation="pallas", interpret=True)
    close(out, jq.qmatmul(x, q, implementation="xla"), 256)


def test_auto_leaves_many_tokens_to_xla(monkeypatch, rng):
    monkeypatch.setattr(platform, "hopper_present", lambda: True)
    q = make(rng, 256, 64)  # too narrow for the warp-specialized sizes: split-K up to its limit
    assert K.can_use(jnp.ones((K.AUTO_SPLIT_K_MAX_TOKENS, 256), jnp.bfloat16), q, jnp.bfloat16)
    assert not K.can_use(jnp.ones((K.AUTO_SPLIT_K_MAX_TOKENS + 1, 256), jnp.bfloat16), q, jnp.bfloat16)
    monkeypatch.setattr(K, "MANY_TOKENS_MIN_CTAS", 1)
    q = make(rng, 256, 128)
    assert K.can_use(jnp.ones((K.AUTO_MAX_TOKENS, 256), jnp.bfloat16), q, jnp.bfloat16)
    assert not K.can_use(jnp.ones((K.AUTO_MAX_TOKENS + 1, 256), jnp.bfloat16), q, jnp.bfloat16)


def test_gradient_through_the_kernel_path(rng):
    q = make(rng, 256, 64)
    x = jnp.asarray(rng.standard_normal((3, 256)), jnp.float32)
    loss = lambda impl: lambda x: jnp.sum(
        jq.qmatmul(x, q, implementation=impl, interpret=True).astype(jnp.float32) ** 2)
    g_kernel = jax.grad(loss("pallas"))(x)
    g_xla = jax.grad(loss("xla"))(x)
    close(g_kernel, g_xla, 256)


def test_kernel_is_not_used_off_hopper(rng):
    if platform.hopper_present():
        pytest.skip("this machine has a Hopper GPU")
    q = make(rng, 256, 64)
    assert not K.can_use(jnp.ones((1, 256), jnp.bfloat16), q, jnp.bfloat16)


def test_auto_lowers_cpu_arrays_to_xla_on_a_hopper_machine(monkeypatch, rng):
    """auto picks the kernel when lowering for CUDA only: CPU-placed arrays on a machine that
    also has an H100 run the XLA path instead of failing to lower the kernel for the CPU."""
    cpu = jax.devices("cpu")[0]  # explicit: on a GPU machine the default device is the GPU
    q = jax.device_put(make(rng, 512, 64), cpu)
    x = jax.device_put(jnp.asarray(rng.standard_normal((16, 512)), jnp.bfloat16), cpu)  # > XLA-only sizes
    monkeypatch.setattr(platform, "hopper_present", lambda: True)
    assert K.can_use(x, q, jnp.bfloat16)
    out = jax.jit(lambda x, q: jq.qmatmul(x, q))(x, q)
    np.testing.assert_array_equal(out, jq.qmatmul(x, q, implementation="xla"))


@pytest.mark.parametrize("m,qtype,dq,block_sizes", [
    (1, "nf4", True, K.BlockSizes()), (16, "fp4", False, K.BlockSizes()),
    (32, "int4", False, K.BlockSizes()), (128, "nf4", True, K.BlockSizes()),
    (300, "nf4", True, K.BlockSizes(k_splits=1)),  # token tiles, transposed in-place output
    (256, "nf4", True, K.BlockSizes(compute_wgs=2, k_splits=1)),
    (512, "fp4", True, K.MANY_TOKENS),  # two warpgroups, one table, stored in two halves
    # one persistent CTA running the 4 output tiles as chained pipelines
    (512, "nf4", True, dataclasses.replace(K.MANY_TOKENS, persistent_ctas=1)),
    (256, "nf4", False, K.BlockSizes(compute_wgs=2, k_splits=1, token_tile=256, table_copies=16)),
    (100, "nf4", True, K.MID_TOKENS),  # the same on 128-token tiles, 32 copies, split-K
    (1, "nf4", True, K.BlockSizes(table_copies=32)),  # the shared-memory byte-pair decode
    (16, "fp4", False, K.BlockSizes(table_copies=16, tile_k=128, max_concurrent_steps=3)),
])
def test_kernel_lowers_for_hopper(m, qtype, dq, block_sizes, rng):
    """Compile-time checks of the real Mosaic GPU lowering (layout inference, swizzles) on CPU:
    the interpreter does not run them, and an H100 run found the first failure here."""
    q = make(rng, 1024, 256, qtype, dq)
    x = jnp.asarray(rng.standard_normal((m, 1024)), jnp.bfloat16)
    lowered = jax.jit(lambda x, q: K.qmatmul(x, q, block_sizes=block_sizes)).trace(x, q).lower(
        lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.parametrize("m,splits", [(1, 2), (17, 2), (5, 1)])
def test_split_k_sums_are_their_own_pass_and_x_is_read_unpadded(m, splits, rng):
    """With a split of K the partial sums are added behind an optimization barrier (XLA fused
    them into consumers that re-read them); the table decode reads x without XLA padding it
    when there are fewer than 8 tokens (the copies fill the rest with zeros)."""
    q = make(rng, 1024, 256)
    x = jnp.asarray(rng.standard_normal((m, 1024)), jnp.bfloat16)
    sizes = K.BlockSizes(table_copies=32, max_concurrent_steps=2, k_splits=splits)
    text = jax.jit(lambda x, q: K.qmatmul(x, q, block_sizes=sizes)).trace(x, q).lower(
        lowering_platforms=("cuda",)).as_text()
    assert ("optimization_barrier" in text) == (splits > 1)
    assert ("stablehlo.pad" in text) == (m > 8)


# ---------------------------------------------------------------- the TPU kernel (interpret mode)
from jaxquant._src.kernels import qmatmul_tpu as T  # noqa: E402


@pytest.mark.parametrize("lead,k,n,qtype,dq", [
    ((1,), 512, 256, "nf4", True), ((3,), 256, 128, "fp4", False), ((17,), 768, 128, "int4", False),
    ((130,), 256, 128, "nf4", True), ((2, 5), 512, 256, "nf4", False)])
def test_tpu_kernel_matches_xla_path(lead, k, n, qtype, dq, rng):
    q = make(rng, k, n, qtype, dq, heavy=True)
    x = jnp.asarray(rng.standard_normal((*lead, k)), jnp.bfloat16)
    out = T.qmatmul(x, q, interpret=True)
    assert out.shape == (*lead, n) and out.dtype == jnp.bfloat16
    close(out, jq.qmatmul(x, q, implementation="xla"), k)


def test_tpu_kernel_refuses_what_it_does_not_handle(rng):
    with pytest.raises(NotImplementedError, match="qmatmul_tpu does not handle shape"):
        T.qmatmul(jnp.ones((1, 320), jnp.bfloat16), make(rng, 320, 128), interpret=True)
    assert not T.can_use(jnp.ones((1, 256), jnp.bfloat16), make(rng, 256, 128), jnp.bfloat16)  # CPU


def test_tpu_kernel_lowers_for_mosaic_tpu(rng):
    q = make(rng, 512, 256)
    x = jnp.ones((4, 512), jnp.bfloat16)
    lowered = jax.jit(lambda x, q: T.qmatmul(x, q)).trace(x, q).lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()


@pytest.mark.parametrize("m,stages", [(1, 4), (8, 4), (16, 3), (24, 2), (64, 2)])
def test_pipeline_stages_shrink_with_tokens_so_four_ctas_share_an_sm(m, stages):
    fitted = K._fit_stages(K.BlockSizes(), K._pad_tokens(m))
    assert fitted.max_concurrent_steps == stages
    step = K.TILE_N * fitted.tile_k // 2 + K._pad_tokens(m) * fitted.tile_k * 2
    assert stages == 2 or stages * step <= K.STAGE_BUDGET
    assert K._fit_stages(K.BlockSizes(max_concurrent_steps=2), 8).max_concurrent_steps == 2


@pytest.mark.parametrize("m,tile_k", [(1, 256), (64, 256), (72, 256), (88, 128), (128, 128)])
def test_steps_shorten_for_many_tokens_so_two_fit_the_budget(m, tile_k):
    fitted = K._fit_tile_k(4096, 64, K.BlockSizes(), K._pad_tokens(m))
    assert fitted.tile_k == tile_k
    assert K._step_bytes(tile_k, K._pad_tokens(m)) <= K.STAGE_BUDGET


@pytest.mark.parametrize("m,k,n,kernel", [(1, 576, 1536, False), (8, 1024, 1024, False),
                                          (16, 576, 1536, True), (1, 2048, 1024, True)])
def test_auto_leaves_small_decode_matmuls_to_xla(m, k, n, kernel, monkeypatch, rng):
    """On Hopper, auto runs 1-8 tokens against weights up to 1.2M elements through XLA (faster
    there, measured in experiments/small_shapes_gpu.py) and the kernel otherwise."""
    q = make(rng, k, n)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    monkeypatch.setattr(platform, "hopper_present", lambda: True)
    lowered = jax.jit(lambda x, q: jq.qmatmul(x, q)).trace(x, q).lower(lowering_platforms=("cuda",))
    assert ("mosaic_gpu" in lowered.as_text()) == kernel
