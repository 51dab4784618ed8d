"""Choose a qmatmul kernel for the inputs and the backend, or fall back to XLA."""

from __future__ import annotations

import jax
import numpy as np

from jaxquant._src import matmul
from jaxquant._src.kernels import platform

# auto leaves small decode matmuls to XLA on the GPU: at SmolLM2-135M shapes (576x1536, 1 token)
# every call sits at its ~5 us latency floor and the XLA path was 0-13% faster than the kernel,
# which wins from 16 tokens or 4M weights (H100, experiments/small_shapes_gpu.py). SmolLM2 greedy
# generation went from 0.84x to 0.87x of bf16 (0.91x if its 16-token prefill also avoids the
# kernel: one Mosaic GPU call in a jitted program costs the decode loop its CUDA graphs).
XLA_UP_TO_TOKENS = 8
XLA_UP_TO_WEIGHTS = 1_200_000


def _xla_is_faster(x, q) -> bool:
    return int(np.prod(x.shape[:-1])) <= XLA_UP_TO_TOKENS and int(np.prod(q.shape)) <= XLA_UP_TO_WEIGHTS


def qmatmul_kernel(x, q, *, implementation: str, interpret: bool, compute_dtype):
    """The Pallas kernel for these inputs; with ``auto``, XLA where no kernel applies."""
    raise_or_fallback = implementation == "pallas"
    try:
        # the TPU kernel on TPUs; elsewhere the Mosaic GPU one (which interpret mode runs on CPU)
        if jax.default_backend() == "tpu":
            from jaxquant._src.kernels import qmatmul_tpu as kernel
            lowered_for = "tpu"
        else:
            from jaxquant._src.kernels import qmatmul_mgpu as kernel
            lowered_for = "cuda"
        if interpret:
            return kernel.qmatmul(x, q, compute_dtype=compute_dtype, interpret=True)
        if kernel.can_use(x, q, compute_dtype):
            run = lambda x, q: kernel.qmatmul(x, q, compute_dtype=compute_dtype)
            if raise_or_fallback:
                return run(x, q)
            if lowered_for == "cuda" and _xla_is_faster(x, q):
                return matmul.qmatmul_xla(x, q, compute_dtype)
            # auto: the kernel only where this is lowered for its platform (CPU-placed arrays on
            # a GPU machine take XLA)
            return platform.kernel_or_xla(
                lowered_for, run, lambda x, q: matmul.qmatmul_xla(x, q, compute_dtype), x, q)
        raise NotImplementedError(f"no qmatmul kernel for {q!r} with x {x.dtype}{tuple(x.shape)} "
                                  f"on {jax.default_backend()}")
    except NotImplementedError:
        if raise_or_fallback:
            raise
        return matmul.qmatmul_xla(x, q, compute_dtype)
