"""Where a kernel may run: decided when a computation is lowered, not from the default device.

A process with a GPU can still place arrays on its CPU; a kernel chosen from ``jax.devices()[0]``
would then be lowered for the CPU and fail. So the kernels are picked with
``lax.platform_dependent``: the kernel when lowering for its platform, XLA elsewhere.
"""

from __future__ import annotations

import jax
from jax import lax


def _hopper_gpus() -> list:
    """This process's sm90 GPUs (the Mosaic GPU kernels' target)."""
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return []
    return [d for d in gpus if getattr(d, "compute_capability", "") == "9.0"]


def hopper_present() -> bool:
    """Whether this process has an sm90 GPU."""
    return bool(_hopper_gpus())


def hopper_sm_count() -> int | None:
    """Streaming multiprocessors of this process's smallest sm90 GPU (132 on an H100 SXM or an
    H200, 114 on an H100 PCIe); None without one, or where the runtime does not say."""
    counts = [getattr(d, "core_count", None) for d in _hopper_gpus()]
    return min(counts) if counts and None not in counts else None


def tpu_present() -> bool:
    try:
        return bool(jax.devices("tpu"))
    except RuntimeError:
        return False


def kernel_or_xla(platform: str, kernel, xla, *args):
    """``kernel(*args)`` when lowered for ``platform`` ("cuda" or "tpu"), ``xla(*args)`` elsewhere."""
    return lax.platform_dependent(*args, **{platform: kernel}, default=xla)
