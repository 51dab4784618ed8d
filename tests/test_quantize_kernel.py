"""The single-pass Hopper quantize kernel, run by the Pallas GPU interpreter on CPU: bit-exact
against the XLA path (codes and float32 absmax), and what it refuses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant._src import codebooks
from jaxquant._src.kernels import cell_table, platform
from jaxquant._src.kernels import quantize_mgpu as QK
from jaxquant._src.testing import awkward_bf16

awkward = awkward_bf16


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])  # FP4: codes not in value order
@pytest.mark.parametrize("shape", [(64, 512), (3, 4096), (2, 8, 256)])  # 8 steps / 1 CTA; 3 CTAs
def test_kernel_is_bit_exact_with_the_xla_path(qtype, shape, rng):
    x = awkward(rng, shape)
    codes, absmax = QK.quantize_blocks(x, qtype, interpret=True)
    q = jq.quantize(x, qtype, 64)  # the XLA path on CPU
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(q.codes).reshape(-1))
    np.testing.assert_array_equal(np.asarray(absmax).view(np.uint32),
                                  np.asarray(q.scale).reshape(-1).view(np.uint32))


def test_a_non_finite_block_gets_a_nan_constant(rng):
    x = np.asarray(awkward(rng, (64, 64)), np.float32)
    x[5, 3], x[9, 60] = np.nan, -np.inf
    _, absmax = QK.quantize_blocks(jnp.asarray(x, jnp.bfloat16), "nf4", interpret=True)
    absmax = np.asarray(absmax)
    assert np.isnan(absmax[5]) and np.isnan(absmax[9]) and np.isfinite(np.delete(absmax, [5, 9])).all()


@pytest.mark.parametrize("dtype,qtype,block,size", [
    (jnp.float32, "nf4", 64, 4096), (jnp.bfloat16, "int4", 64, 4096), (jnp.bfloat16, "dynamic8", 64, 4096),
    (jnp.bfloat16, "nf4", 128, 4096),
    (jnp.bfloat16, "nf4", 64, 4096 + 64)])
def test_refuses_what_it_does_not_handle(dtype, qtype, block, size):
    x = jnp.ones((size,), dtype)
    assert not QK.supports(x, qtype, block, False) and not QK.can_use(x, qtype, block, False)
    if block == 64 and qtype == "nf4":
        with pytest.raises(NotImplementedError, match="quantize_mgpu does not handle"):
            QK.quantize_blocks(x, qtype, interpret=True)


def test_not_used_off_hopper():
    if platform.hopper_present():
        pytest.skip("this machine has a Hopper GPU")
    assert not QK.can_use(jnp.ones((4096,), jnp.bfloat16), "nf4", 64, False)


def test_cpu_arrays_on_a_hopper_machine_take_the_xla_path(monkeypatch, rng):
    """The kernel is chosen when lowering for CUDA: a CPU-placed array still quantizes (through
    XLA) when the process also has a Hopper GPU (found on the H100: a CPU reference failed)."""
    monkeypatch.setattr(platform, "hopper_present", lambda: True)
    jax.clear_caches()
    x = awkward(rng, (8, 512))
    q = jq.quantize(x, "nf4", 64, double_quant=True)
    jax.clear_caches()
    monkeypatch.undo()
    ref = jq.quantize(x, "nf4", 64, double_quant=True)
    np.testing.assert_array_equal(q.codes, ref.codes)
    np.testing.assert_array_equal(q.scale.codes, ref.scale.codes)


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_kernel_lowers_for_hopper(qtype, rng):
    x = awkward(rng, (64, 512))
    lowered = jax.jit(lambda x: QK.quantize_blocks(x, qtype)).trace(x).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


@pytest.mark.slow  # the kernel in the interpreter plus both quantize paths: ~4 s on 2 cores
@pytest.mark.parametrize("shape,axis", [((8, 512), None), ((4, 2, 1024), -1), ((3, 4096), 1)])
def test_quantize_through_the_kernel_path_gives_the_same_qarray(monkeypatch, shape, axis, rng):
    """``jq.quantize``'s kernel branch (forced, the kernel interpreted) reshapes the kernel's flat
    codes and constants into the QArray the XLA path builds, double quant included."""
    x = awkward(rng, shape)
    ref = jq.quantize(x, "nf4", 64, axis=axis, double_quant=True)
    kernel = QK.quantize_blocks
    monkeypatch.setattr(platform, "hopper_present", lambda: True)
    monkeypatch.setattr(platform, "kernel_or_xla", lambda where, k, xla, *args: k(*args))
    calls = []
    monkeypatch.setattr(QK, "quantize_blocks",
                        lambda x, qtype: calls.append(qtype) or kernel(x, qtype, interpret=True))
    jax.clear_caches()
    q = jq.quantize(x, "nf4", 64, axis=axis, double_quant=True)
    jax.clear_caches()
    assert calls == ["nf4"]  # the kernel branch ran (the nested dynamic8 step stays on XLA)
    assert q.codes.shape == ref.codes.shape and q.scale.codes.shape == ref.scale.codes.shape
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jq.dequantize(q), jq.dequantize(ref))


def _near(values, ulps=4):
    """Each float32 value and its neighbours up to ``ulps`` steps away."""
    bits = np.asarray(values, np.float32).view(np.int32)[:, None] + np.arange(-ulps, ulps + 1)
    return bits.astype(np.int32).view(np.float32).reshape(-1)


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_cell_table_gives_the_midpoint_count_for_every_kind_of_value(qtype, rng):
    """The kernel's lookup (cell_table.py) = the number of midpoints strictly below, on values
    at and around every midpoint and every cell limit, random values, +-1, zeros and specials,
    in numpy and in jnp (what interpret mode runs)."""
    mids = np.asarray(codebooks.get_qtype(qtype).midpoints, np.float32)
    limits = [cell_table._first_in_cell(c) for c in range(1, cell_table.CELLS)]
    n = np.concatenate([
        _near(np.concatenate([mids, limits, [1, -1, 0, 1e-30, -1e-30]])),
        rng.uniform(-1.01, 1.01, 20_000).astype(np.float32),
        np.array([np.nan, np.inf, -np.inf, -0.0, 1e-45, -1e-45, 3.0, -3.0], np.float32)])
    want = np.sum(n[:, None] > mids[None, :], axis=1)
    table, words = cell_table.table(mids), cell_table.entry_words(mids)
    np.testing.assert_array_equal(cell_table.codes_reference(n, table, words), want)
    # XLA:CPU flushes subnormals to zero (FP4 has a midpoint at 0): jnp is checked on the rest
    normal = ~(np.abs(n) < np.finfo(np.float32).tiny) | (n == 0)
    got = cell_table.codes_reference(jnp.asarray(n[normal]), jnp.asarray(table), words)
    np.testing.assert_array_equal(np.asarray(got), want[normal])
    assert len(np.unique(table[:, 0])) > 8  # the counts really vary from cell to cell


def test_cell_table_refuses_crowded_cells():
    with pytest.raises(ValueError, match="midpoints"):
        cell_table.table(np.linspace(-0.01, 0.01, 9))
