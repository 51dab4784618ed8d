"""Which qmatmul kernel runs for these inputs on this backend: a choice handed back to the caller
(``matmul.qmatmul``), which runs the XLA path where the choice is none."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax

from jaxquant._src.kernels import platform


class Choice(NamedTuple):
    """``kernel(x, q)`` computes the product, or None for the XLA path. With ``platform``
    ("cuda" or "tpu") the kernel only where the computation is lowered for that platform and the
    XLA path elsewhere (``platform.kernel_or_xla``); None: the kernel as it is."""
    kernel: Callable | None
    platform: str | None = None


XLA = Choice(None)


def choose(x, q, *, implementation: str, interpret: bool, compute_dtype) -> Choice:
    """The kernel for ``implementation`` "pallas" or "auto" (``"xla"``: none).

    The TPU kernel on TPUs; elsewhere the Mosaic GPU one, which interpret mode runs on CPU.
    "pallas" raises NotImplementedError where the kernel does not handle the inputs or the
    backend has no device for it; "auto" takes XLA there, and where ``can_use`` says XLA is
    faster.
    """
    if implementation == "xla":
        return XLA
    # imported here: the Pallas backends load only when a kernel may run
    if jax.default_backend() == "tpu":
        from jaxquant._src.kernels import qmatmul_tpu as kernel
        lowered_for, present = "tpu", platform.tpu_present
    else:
        from jaxquant._src.kernels import qmatmul_mgpu as kernel
        lowered_for, present = "cuda", platform.hopper_present
    run = functools.partial(kernel.qmatmul, compute_dtype=compute_dtype, interpret=interpret)
    if implementation == "pallas":
        kernel.check_supported(x, q, compute_dtype)
        if not (interpret or present()):
            raise NotImplementedError(
                f"no qmatmul kernel for {q!r} with x {x.dtype}{tuple(x.shape)} on "
                f"{jax.default_backend()} (the kernels need an sm90 GPU or a TPU; "
                f"interpret=True runs them on CPU)")
        return Choice(run)
    if interpret:
        try:
            kernel.check_supported(x, q, compute_dtype)
        except NotImplementedError:
            return XLA
        return Choice(run)
    # the kernel only where this is lowered for its platform (CPU-placed arrays on a GPU
    # machine take XLA)
    return Choice(run, lowered_for) if kernel.can_use(x, q, compute_dtype) else XLA
