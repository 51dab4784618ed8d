"""Choose a qmatmul kernel for the inputs and the backend, or fall back to XLA."""

from __future__ import annotations

import jax

from jaxquant._src import matmul


def qmatmul_kernel(x, q, *, implementation: str, interpret: bool, compute_dtype):
    """The Pallas kernel for these inputs; with ``auto``, XLA where no kernel applies."""
    raise_or_fallback = implementation == "pallas"
    try:
        from jaxquant._src.kernels import qmatmul_mgpu
        if interpret or qmatmul_mgpu.can_use(x, q, compute_dtype):
            return qmatmul_mgpu.qmatmul(x, q, compute_dtype=compute_dtype, interpret=interpret)
        raise NotImplementedError(f"no qmatmul kernel for {q!r} with x {x.dtype}{tuple(x.shape)} "
                                  f"on {jax.default_backend()}")
    except NotImplementedError:
        if raise_or_fallback:
            raise
        return matmul.qmatmul_xla(x, q, compute_dtype)
