"""Large CPU dequantize outputs in transparent huge pages (cpu_pages.py): the values are the
plain path's, the memory really is advised, and without a compiler everything still works."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant._src import cpu_pages

THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding ``address`` (/proc/self/smaps)."""
    inside = False
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(v, 16) for v in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.fixture
def built():
    if not cpu_pages.available():
        pytest.skip(f"huge-page buffers unavailable here: {cpu_pages.status()}")


def test_a_fresh_buffer_is_advised_to_be_huge_pages(built):
    if not THP.exists() or "[never]" in THP.read_text():
        pytest.skip("transparent huge pages are off on this machine")
    buffer = cpu_pages.fresh_buffer((2048, 1024), np.float32, jax.devices("cpu")[0])
    assert buffer is not None and buffer.shape == (2048, 1024)
    assert "hg" in _vm_flags(buffer.unsafe_buffer_pointer() + (4 << 20))  # MADV_HUGEPAGE


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_large_dequantize_goes_through_huge_pages_with_the_same_values(built, dtype, monkeypatch, rng):
    cpu = jax.devices("cpu")[0]  # explicit: on a GPU machine the default device is the GPU
    q = jq.quantize(jax.device_put(rng.standard_normal((1024, 2048)).astype(np.float32), cpu),
                    "nf4", 64, double_quant=True)
    calls = []
    fresh = cpu_pages.fresh_buffer
    monkeypatch.setattr(cpu_pages, "fresh_buffer", lambda *a: calls.append(fresh(*a)) or calls[-1])
    got = jq.dequantize(q, dtype)
    assert calls and calls[0] is not None  # 4-8 MB: above MIN_BYTES
    want = jax.jit(jq.dequantize, static_argnames="dtype")(q, dtype)  # traced: the plain path
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.dtype == dtype and calls[0].is_deleted()  # the buffer was donated


def test_small_outputs_and_switched_off_take_the_plain_path(monkeypatch):
    cpu = jax.devices("cpu")[0]
    assert cpu_pages.fresh_buffer((64, 64), np.float32, cpu) is None  # under MIN_BYTES
    monkeypatch.setenv("JAXQUANT_HUGE_PAGES", "0")
    cpu_pages.available.cache_clear()
    try:
        assert cpu_pages.fresh_buffer((2048, 1024), np.float32, cpu) is None
        assert "JAXQUANT_HUGE_PAGES" in cpu_pages.status()
    finally:
        monkeypatch.delenv("JAXQUANT_HUGE_PAGES")
        cpu_pages.available.cache_clear()


def test_without_a_compiler_dequantize_still_works(monkeypatch, tmp_path, rng):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built there
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    cpu_pages.available.cache_clear()
    try:
        assert not cpu_pages.available()
        assert "no-such-compiler" in cpu_pages.status()
        q = jq.quantize(jnp.asarray(rng.standard_normal((1024, 2048)), jnp.float32), "nf4", 64)
        np.testing.assert_array_equal(np.asarray(jq.dequantize(q)),
                                      np.asarray(jax.jit(jq.dequantize)(q)))
    finally:
        monkeypatch.undo()
        cpu_pages.available.cache_clear()
