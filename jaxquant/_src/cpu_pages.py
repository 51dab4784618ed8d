"""Fresh CPU output buffers backed by transparent huge pages.

On the CPU, writing a large new array costs more in first-touch page faults than in arithmetic:
dequantizing a 4096x14336 float32 weight faults on 57,345 4-KB pages (~42 ms of wall time on 2
cores, against 16-31 ms for the decode itself; BUILD_NOTES, session 6). XLA allocates its outputs
with malloc, i.e. fresh small pages. numpy asks for huge pages on its large arrays; this module
does the same for jaxquant's large CPU outputs: a tiny XLA FFI custom call (``native/
huge_pages.cc``) returns an uninitialized buffer after ``madvise(MADV_HUGEPAGE)``, and the result
is written into it as a donated buffer (624 faults instead of 57,345).

The custom call is compiled with the system's C++ compiler on first use and cached under
``$XDG_CACHE_HOME/jaxquant`` (``~/.cache/jaxquant``). Where that fails (no compiler, say) or
``JAXQUANT_HUGE_PAGES=0`` is set, ``fresh_buffer`` returns None and callers allocate as usual;
``status()`` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import jax
import numpy as np

TARGET = "jaxquant_huge_page_buffer"
SOURCE = pathlib.Path(__file__).parent / "native" / "huge_pages.cc"
MIN_BYTES = 4 << 20  # smaller outputs gain little: a huge page is 2 MB
_why_not = ""


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(root) / "jaxquant"


def _build() -> pathlib.Path:
    """The compiled custom call (built once per source and jaxlib version)."""
    key = hashlib.sha256(SOURCE.read_bytes() + jax.__version__.encode()).hexdigest()[:16]
    library = _cache_dir() / f"huge_pages_{key}.so"
    if library.exists():
        return library
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise FileNotFoundError("no C++ compiler (g++ or c++) on PATH")
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:  # then an atomic rename
        built = pathlib.Path(tmp) / library.name
        subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-std=c++17", "-w",
                        f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)],
                       check=True, capture_output=True, text=True, timeout=300)
        os.replace(built, library)
    return library


@functools.cache
def available() -> bool:
    """Whether the custom call is registered (compiling it on the first call)."""
    global _why_not
    if os.environ.get("JAXQUANT_HUGE_PAGES", "1") == "0":
        _why_not = "disabled by JAXQUANT_HUGE_PAGES=0"
        return False
    try:
        library = ctypes.CDLL(str(_build()))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.JaxquantHugePageBuffer),
                                    platform="cpu")
    except (OSError, subprocess.SubprocessError, AttributeError) as e:
        detail = getattr(e, "stderr", "") or ""
        _why_not = f"{type(e).__name__}: {e} {detail[-500:]}".strip()
        return False
    return True


def status() -> str:
    """'available', or why fresh_buffer returns None."""
    return "available" if available() else _why_not


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _huge_page_buffer(shape: tuple[int, ...], dtype) -> jax.Array:
    return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(shape, dtype), has_side_effect=True)()


def fresh_buffer(shape, dtype, device: jax.Device) -> jax.Array | None:
    """An uninitialized ``(shape, dtype)`` array on the CPU ``device`` whose memory is advised
    to be huge pages, to be donated to a computation that overwrites all of it; None where that
    does not apply (not a CPU device, under ``MIN_BYTES``, or the custom call unavailable)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if device.platform != "cpu" or nbytes < MIN_BYTES or not available():
        return None
    with jax.default_device(device):
        return _huge_page_buffer(tuple(int(d) for d in shape), np.dtype(dtype))
