"""The Mosaic GPU qmatmul kernel, run by the Pallas GPU interpreter on CPU against the XLA path,
and lowered for CUDA (the compile-time checks the interpreter skips)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from qmatmul_helpers import close, make

import jaxquant as jq
from jaxquant._src.kernels import qmatmul_mgpu as K
from jaxquant._src.kernels import qmatmul_tuning as T
from jaxquant._src.kernels.qmatmul_tuning import BlockSizes

# every run of the kernel in the interpreter takes 3-7 s on 2 cores, more when they are busy
slow = pytest.mark.slow


@slow
@pytest.mark.parametrize("lead,k,n,qtype,dq,heavy", [
    ((1,), 512, 64, "nf4", True, False),
    ((3,), 256, 128, "nf4", False, True),
    ((17,), 768, 64, "fp4", True, True),
    ((2, 5), 512, 192, "int4", False, False),
    ((32,), 256, 64, "nf4", True, False),
    ((48,), 256, 64, "nf4", True, True),  # m_pad 48: a 32-byte swizzle for x
    ((1,), 576, 64, "nf4", True, False),  # SmolLM2's K: 64-element steps
    ((100,), 512, 64, "nf4", True, True),  # m_pad 104: 128-element steps
])
def test_kernel_matches_xla_path(lead, k, n, qtype, dq, heavy, rng):
    q = make(rng, k, n, qtype, dq, heavy)
    x = jnp.asarray(rng.standard_normal((*lead, k)), jnp.bfloat16)
    out = K.qmatmul(x, q, interpret=True)
    assert out.shape == (*lead, n) and out.dtype == jnp.bfloat16
    close(out, K.reference(x, q), k)


@slow
def test_split_k_and_block_128(rng):
    q = make(rng, 1024, 64, bs=128)
    x = jnp.asarray(rng.standard_normal((5, 1024)), jnp.bfloat16)
    ref = K.reference(x, q)
    for splits in (2, 4):
        close(K.qmatmul(x, q, interpret=True, block_sizes=BlockSizes(k_splits=splits)), ref, 1024)


@pytest.mark.parametrize("sizes,match", [
    (BlockSizes(table_copies=12), "table_copies=12"),
    (BlockSizes(table_copies=32, tile_k=512), "table with tile_k=512"),
    (BlockSizes(persistent_ctas=4), "persistent_ctas"),  # one warpgroup
    (BlockSizes(compute_wgs=2, k_splits=2, persistent_ctas=4), "persistent_ctas")])
def test_block_sizes_the_kernel_cannot_run_raise(sizes, match, rng):
    q = make(rng, 512, 128)
    with pytest.raises(NotImplementedError, match=match):
        K.qmatmul(jnp.ones((4, 512), jnp.bfloat16), q, interpret=True, block_sizes=sizes)


def test_empty_x_is_not_a_kernel_launch(rng):
    """qmatmul returns the empty result itself; the kernel refuses (no zero-size tiles)."""
    with pytest.raises(NotImplementedError, match="empty x"):
        K.check_supported(jnp.ones((0, 512), jnp.bfloat16), make(rng, 512, 128), jnp.bfloat16)


@slow
@pytest.mark.parametrize("m,block_sizes", [
    (130, BlockSizes()),  # two token tiles of 128, each written transposed in place
    (40, BlockSizes(token_tile=16, k_splits=1)),  # three tiles, the last one partly padding
    (40, BlockSizes(token_tile=16, k_splits=2)),  # the same through float32 partial sums
    (24, BlockSizes(compute_wgs=2, k_splits=1)),  # two warpgroups share x (warp specialized)
    (24, BlockSizes(compute_wgs=2, k_splits=2, token_tile=8)),
    (24, BlockSizes(table_copies=32)),  # (the interpreter decodes through jnp either way)
    # two warpgroups with the table decode: x in stored k order, in place or split
    (24, BlockSizes(compute_wgs=2, k_splits=1, table_copies=16)),
    (40, BlockSizes(compute_wgs=2, k_splits=2, token_tile=16, table_copies=32)),
    # two token tiles of 32, each stored in two halves (the last one partly padding)
    (40, BlockSizes(compute_wgs=2, k_splits=1, token_tile=32, table_copies=32)),
])
def test_token_tiles_warpgroups_and_direct_output(m, block_sizes, rng):
    q = make(rng, 512, 128, heavy=True)
    x = jnp.asarray(rng.standard_normal((m, 512)), jnp.float32)
    out = K.qmatmul(x, q, interpret=True, block_sizes=block_sizes)
    assert out.shape == (m, 128) and out.dtype == jnp.float32
    close(out, K.reference(x, q), 512)


@slow
@pytest.mark.parametrize("m,token_tile,persistent,ctas", [
    (48, 8, 2, 2),  # 6 tiles: 2 CTAs of 3 (chained pipelines START, STEADY, STOP)
    (48, 8, 3, 3),  # 3 CTAs of 2 (START, STOP)
    (40, 16, 1, 1),  # one CTA of 3, the last tile partly padding
    (40, 8, 2, 0)])  # 5 tiles in 3 rounds do not divide evenly: a CTA per tile
def test_persistent_ctas_run_several_tiles_as_chained_pipelines(m, token_tile, persistent, ctas,
                                                                 rng):
    q = make(rng, 512, 128, heavy=True)  # one weight tile of 128 rows, 4 steps
    x = jnp.asarray(rng.standard_normal((m, 512)), jnp.float32)
    sizes = BlockSizes(tile_k=128, max_concurrent_steps=2, k_splits=1, compute_wgs=2,
                       token_tile=token_tile, table_copies=32, persistent_ctas=persistent)
    chosen = K.check_supported(x, q, jnp.bfloat16, sizes)
    assert T.launch(m, 512, 128, chosen).ctas == ctas
    close(K.qmatmul(x, q, interpret=True, block_sizes=sizes), K.reference(x, q), 512)


@slow
def test_warp_specialized_sizes_through_the_public_call(rng):
    q = make(rng, 256, 256, heavy=True)
    x = jnp.asarray(rng.standard_normal((2, 50, 256)), jnp.bfloat16)
    assert K.check_supported(x, q, jnp.bfloat16).compute_wgs == 2  # MID_TOKENS
    out = jq.qmatmul(x, q, implementation="pallas", interpret=True)
    close(out, K.reference(x, q), 256)


def lower_for_cuda(x, q, block_sizes):
    f = jax.jit(lambda x, q: K.qmatmul(x, q, block_sizes=block_sizes))
    return f.trace(x, q).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("m,qtype,dq,block_sizes", [
    (1, "nf4", True, BlockSizes()), (16, "fp4", False, BlockSizes()),
    (32, "int4", False, BlockSizes()), (128, "nf4", True, BlockSizes()),
    (300, "nf4", True, BlockSizes(k_splits=1)),  # token tiles, transposed in-place output
    (256, "nf4", True, BlockSizes(compute_wgs=2, k_splits=1)),
    (512, "fp4", True, T.MANY_TOKENS),  # two warpgroups, one table, stored in two halves
    # one persistent CTA running the 4 output tiles as chained pipelines
    (512, "nf4", True, dataclasses.replace(T.MANY_TOKENS, persistent_ctas=1)),
    (256, "nf4", False, BlockSizes(compute_wgs=2, k_splits=1, token_tile=256, table_copies=16)),
    (100, "nf4", True, T.MID_TOKENS),  # the same on 128-token tiles, 32 copies, split-K
    (1, "nf4", True, BlockSizes(table_copies=32)),  # the shared-memory byte-pair decode
    (16, "fp4", False, BlockSizes(table_copies=16, tile_k=128, max_concurrent_steps=3)),
])
def test_kernel_lowers_for_hopper(m, qtype, dq, block_sizes, rng):
    """Compile-time checks of the real Mosaic GPU lowering (layout inference, swizzles) on CPU:
    the interpreter does not run them, and an H100 run found the first failure here."""
    q = make(rng, 1024, 256, qtype, dq)
    x = jnp.asarray(rng.standard_normal((m, 1024)), jnp.bfloat16)
    assert "mosaic_gpu" in lower_for_cuda(x, q, block_sizes)


@pytest.mark.parametrize("m,splits", [(1, 2), (17, 2), (5, 1)])
def test_split_k_sums_are_their_own_pass_and_x_is_read_unpadded(m, splits, rng):
    """With a split of K the partial sums are added behind an optimization barrier (XLA fused
    them into consumers that re-read them); the table decode reads x without XLA padding it
    when there are fewer than 8 tokens (the copies fill the rest with zeros)."""
    q = make(rng, 1024, 256)
    x = jnp.asarray(rng.standard_normal((m, 1024)), jnp.bfloat16)
    text = lower_for_cuda(x, q, BlockSizes(table_copies=32, max_concurrent_steps=2,
                                           k_splits=splits))
    assert ("optimization_barrier" in text) == (splits > 1)
    assert ("stablehlo.pad" in text) == (m > 8)
