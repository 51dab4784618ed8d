"""How the Hopper kernel tiles a problem (qmatmul_tuning): presets by token count, fitting to
shared memory, split-K and persistent grids, and the results behind every tuned number."""

import dataclasses
import inspect
import pathlib
import re

import jax.numpy as jnp
import pytest
from qmatmul_helpers import abstract_weight

from jaxquant._src.kernels import qmatmul_mgpu as K
from jaxquant._src.kernels import qmatmul_tuning as T
from jaxquant._src.kernels.qmatmul_tuning import BlockSizes

RESULTS = pathlib.Path(__file__).parents[1] / "experiments" / "results"


def chosen(m, k, n):
    return K.check_supported(jnp.zeros((m, k), jnp.bfloat16), abstract_weight(k, n), jnp.bfloat16)


@pytest.mark.parametrize("m,n,preset,splits", [
    (256, 14336, "MANY", 1), (1024, 4096, "MANY", 1), (2048, 14336, "MANY", 1),
    (96, 14336, "MID", 1), (128, 4096, "MID", 4), (65, 2048, "MID", 8),
    (256, 4096, "MID", 2), (512, 4096, "MID", 1), (64, 14336, "FEW", 1),
    (512, 14400, None, None), (100, 14400, None, None)])
def test_block_sizes_by_token_count(m, n, preset, splits):
    """<= 64 tokens: one warpgroup with the table decode (FEW); 65-128: two warpgroups on
    128-token tiles, K split to ~112 CTAs (MID); beyond: 256-token tiles where they make >= 100
    CTAs (MANY), else MID again; for N not a multiple of 128 the split-K kernel's defaults."""
    sizes = chosen(m, 4096, n)
    expected = {"FEW": T.FEW_TOKENS, "MID": T.MID_TOKENS, "MANY": T.MANY_TOKENS,
                None: BlockSizes()}[preset]
    assert dataclasses.replace(sizes, tile_k=expected.tile_k,
                               max_concurrent_steps=expected.max_concurrent_steps) == expected
    if preset in ("MID", "MANY"):  # 128-k steps of x fit beside the table: 3 or 2 of them
        assert sizes.tile_k == 128 and sizes.max_concurrent_steps == (3 if preset == "MID" else 2)
    if splits:
        assert T.launch(m, 4096, n, sizes).splits == splits


@pytest.mark.parametrize("m,k,n,ctas", [
    (2048, 4096, 14336, 128), (1024, 4096, 14336, 112), (300, 4096, 14336, 112),
    (2048, 4096, 4096, 128),
    (256, 4096, 14336, 0),  # 112 tiles: one round
    (1792, 4096, 14336, 0),  # 784 tiles in 6 rounds do not divide evenly
    (2048, 14336, 4096, 0)])  # 112-step tiles: one CTA each is as fast
def test_many_tokens_run_persistent_where_tiles_are_short_and_many(m, k, n, ctas):
    sizes = chosen(m, k, n)
    tiles = T.output_tiles(m, n, sizes)
    assert T.persistent_grid(tiles[0] * tiles[1], k // sizes.tile_k, sizes, sm_count=132) == ctas


@pytest.mark.parametrize("sms,tiles,ctas", [(114, 896, 112), (114, 256, 0), (132, 896, 128)])
def test_persistent_ctas_are_at_most_the_gpus_sms(sms, tiles, ctas):
    """On an H100 PCIe (114 SMs) 132 CTAs would run as two waves: the rounds are counted with the
    GPU's own SM count."""
    assert T.persistent_grid(tiles, 32, T.MANY_TOKENS, sm_count=sms) == ctas


def test_persistent_ctas_without_an_sm_count_take_the_preset(monkeypatch):
    monkeypatch.setattr(T.platform, "hopper_sm_count", lambda: None)
    assert T.persistent_grid(896, 32, T.MANY_TOKENS) == 128


@pytest.mark.parametrize("m,k,n,splits", [(1, 4096, 14336, 1), (16, 14336, 4096, 4),
                                          (64, 4096, 4096, 4), (65, 4096, 4096, None)])
def test_few_tokens_take_the_table_decode_in_fewer_longer_ctas(m, k, n, splits):
    sizes = chosen(m, k, n)
    assert (sizes.table_copies == 32 and sizes.compute_wgs == 1) == (splits is not None)
    if splits:  # ~200 CTAs with several steps each, so that the table's fill pays
        assert T.launch(m, k, n, sizes).splits == splits
        assert sizes.max_concurrent_steps == 2 and sizes.tile_k == 256


@pytest.mark.parametrize("m,stages", [(1, 4), (8, 4), (16, 3), (24, 2), (64, 2)])
def test_pipeline_stages_shrink_with_tokens_so_four_ctas_share_an_sm(m, stages):
    fitted = T.fit_stages(BlockSizes(), T.pad_tokens(m))
    assert fitted.max_concurrent_steps == stages
    step = T.TILE_N * fitted.tile_k // 2 + T.pad_tokens(m) * fitted.tile_k * 2
    assert stages == 2 or stages * step <= T.STAGE_BUDGET
    assert T.fit_stages(BlockSizes(max_concurrent_steps=2), 8).max_concurrent_steps == 2


@pytest.mark.parametrize("m,tile_k", [(1, 256), (64, 256), (72, 256), (88, 128), (128, 128)])
def test_steps_shorten_for_many_tokens_so_two_fit_the_budget(m, tile_k):
    fitted = T.fit_tile_k(4096, 64, BlockSizes(), T.pad_tokens(m))
    assert fitted.tile_k == tile_k
    assert T.step_bytes(tile_k, T.pad_tokens(m)) <= T.STAGE_BUDGET


def test_a_subclass_runs_exactly_its_block_sizes():
    """How an experiment bypasses the presets and the fitting: no patching of the library."""
    class Exact(BlockSizes):
        def for_problem(self, m, k, n, block_size):
            return self

    sizes = Exact(tile_k=512, max_concurrent_steps=6)
    assert chosen(64, 4096, 4096) != sizes
    assert K.check_supported(jnp.zeros((64, 4096), jnp.bfloat16), abstract_weight(4096, 4096),
                             jnp.bfloat16, sizes) is sizes


@pytest.mark.parametrize("m,weights,sizes,kernel", [
    (1, 576 * 1536, T.FEW_TOKENS, False),  # small decode matmuls: XLA
    (8, 1024 * 1024, T.FEW_TOKENS, False), (16, 576 * 1536, T.FEW_TOKENS, True),
    (1, 2048 * 1024, T.FEW_TOKENS, True),
    (T.AUTO_SPLIT_K_MAX_TOKENS, 10**6, BlockSizes(), True),  # the one-warpgroup split-K kernel
    (T.AUTO_SPLIT_K_MAX_TOKENS + 1, 10**6, BlockSizes(), False),
    (T.AUTO_MAX_TOKENS, 10**6, T.MANY_TOKENS, True),  # two warpgroups
    (T.AUTO_MAX_TOKENS + 1, 10**6, T.MANY_TOKENS, False)])
def test_auto_uses_the_kernel_where_it_is_faster(m, weights, sizes, kernel):
    assert T.auto_uses_kernel(m, weights, sizes) == kernel


def test_every_tuned_number_names_a_results_file_that_exists():
    cited = set(re.findall(r"results/([\w.-]+\.(?:log|json|txt))", inspect.getsource(T)))
    assert len(cited) >= 8
    assert not [name for name in cited if not (RESULTS / name).is_file()]
