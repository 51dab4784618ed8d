"""``qmatmul``: ``x @ dequantize(q)`` with an XLA reference path and Pallas kernels.

``q`` is a weight ``W[K, N]`` quantized along its contraction axis (``quantize(W, axis=0)``), so
its blocks run along K and its codes are stored ``(N, K/2)``: each output column's weights are one
contiguous row. The XLA path (dequantize, then ``lax.dot_general`` with float32 accumulation) is
the reference on every backend and the fallback for whatever a kernel does not handle.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src import matmul_sharded
from jaxquant._src.kernels import dispatch, platform
from jaxquant._src.matmul_grad import matmul_transposed
from jaxquant._src.matmul_xla import qmatmul_xla
from jaxquant._src.qarray import QArray, validate

IMPLEMENTATIONS = ("auto", "xla", "pallas")
_DEFAULT = contextvars.ContextVar("jaxquant_qmatmul_implementation", default="auto")
_COMPUTE_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def _check(x, q: QArray, implementation: str, compute_dtype) -> np.dtype:
    validate(q)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if q.ndim != 2 or q.axis != 0:
        raise ValueError(f"qmatmul needs a 2-D weight W[K, N] quantized along its contraction axis "
                         f"(quantize(W, axis=0)), got {q!r}")
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"qmatmul needs a float x, got dtype={dtype}")
    if x.ndim < 1 or x.shape[-1] != q.shape[0]:
        raise ValueError(f"x's last dimension must equal W's K, got x.shape={tuple(x.shape)} and "
                         f"W.shape={q.shape}")
    compute = np.dtype(jnp.bfloat16 if compute_dtype is None else compute_dtype)
    if compute not in [np.dtype(d) for d in _COMPUTE_DTYPES]:
        raise TypeError(f"compute_dtype must be bfloat16, float16 or float32, got {compute}")
    return compute


def _zero_cotangent(q: QArray) -> QArray:
    """No gradient for the frozen codes and constants (float0 for the integer leaves)."""
    def zero(leaf):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            return jnp.zeros(leaf.shape, leaf.dtype)
        return np.zeros(leaf.shape, jax.dtypes.float0)
    return jax.tree.map(zero, q)


def _forward(x, q, implementation, interpret, compute_dtype, devices=None):
    """The product; a kernel call under several devices goes per shard. ``devices`` (the platform
    a partitioned call is lowered for: "gpu", "tpu", "cpu") marks one shard's call, which picks
    kernel or XLA directly."""
    if x.size == 0:  # no tokens (or K = 0): nothing to multiply, and no kernel to launch
        return jnp.zeros((*x.shape[:-1], q.shape[1]), x.dtype)
    xla = functools.partial(qmatmul_xla, compute_dtype=compute_dtype)
    choice = dispatch.choose(x, q, implementation=implementation, interpret=interpret,
                             compute_dtype=compute_dtype)
    if choice.kernel is None:
        return xla(x, q)
    kernel_platform = {"cuda": "gpu"}.get(choice.platform, choice.platform) or jax.default_backend()
    if devices is not None:
        return choice.kernel(x, q) if kernel_platform == devices else xla(x, q)
    on_host = kernel_platform == jax.default_backend()
    if not interpret and on_host and jax.device_count() > 1 and matmul_sharded.applies(q):
        # XLA cannot split a kernel's custom call: it would gather the weight onto each device.
        # Partitioned, each device runs the kernel chosen for its own shard's shapes. (Interpret
        # mode calls back to Python, which a partitioned call cannot. Lowered for another
        # platform than this host's devices, it stays one platform-dependent call.)
        local = functools.partial(_forward, implementation=implementation, interpret=interpret,
                                  compute_dtype=compute_dtype)
        return matmul_sharded.partitioned(local, x, q)
    if choice.platform is None:
        return choice.kernel(x, q)
    return platform.kernel_or_xla(choice.platform, choice.kernel, xla, x, q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _qmatmul(x, q, implementation, interpret, compute_dtype):
    return _forward(x, q, implementation, interpret, compute_dtype)


def _qmatmul_fwd(x, q, implementation, interpret, compute_dtype):
    return _forward(x, q, implementation, interpret, compute_dtype), q


def _qmatmul_bwd(implementation, interpret, compute_dtype, q, g):
    # dL/dx = g @ W^T, one K-chunk of W decoded at a time and tied to g (matmul_grad.py): a
    # training step then holds one layer's weight in compute dtype, not every layer's at once.
    return matmul_transposed(g, q, compute_dtype), _zero_cotangent(q)


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


@contextlib.contextmanager
def implementation(name: str):
    """What ``implementation="auto"`` means inside the block, for every ``qmatmul`` traced there
    (through ``jq.flax.apply``, NNX modules, qeinsum): e.g. ``"xla"`` to compare a model against
    the kernel's numbers. It acts at trace time: a function jitted before keeps the choice it was
    traced with.

    Example:
      >>> import jax.numpy as jnp, jaxquant as jq
      >>> q = jq.quantize(jnp.ones((256, 128)), "nf4", 64, axis=0)
      >>> with jq.implementation("xla"):
      ...     y = jq.qmatmul(jnp.ones((2, 256)), q)
    """
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {name!r}")
    token = _DEFAULT.set(name)
    try:
        yield
    finally:
        _DEFAULT.reset(token)


def qmatmul(x, q: QArray, *, implementation: str = "auto", interpret: bool = False,
            compute_dtype=None) -> jax.Array:
    """``x @ dequantize(q)`` for ``q = quantize(W, axis=0)``, W of shape ``[K, N]``.

    Args:
      x: float array ``[..., K]``.
      q: the quantized weight (any qtype; absmax, affine or double-quantized constants).
      implementation: ``"xla"`` (dequantize then dot; every backend), ``"pallas"`` (the kernel;
        ``NotImplementedError`` where it does not apply) or ``"auto"`` (the kernel where it is
        supported, else XLA; ``jaxquant.implementation`` sets what it means in a block).
      interpret: run the Pallas kernel in interpret mode (how the kernel is tested on CPU).
      compute_dtype: dtype of the matmul operands (bfloat16 by default; float16 or float32);
        accumulation is always float32. The output has x's dtype.

    Differentiable in ``x`` (for LoRA on a frozen base); the codes and constants get zeros.

    Raises:
      ValueError: x's last dim is not K, q is not a 2-D weight quantized along axis 0, unknown
        implementation. TypeError: non-float x or an unsupported compute dtype.

    Example:
      >>> import jax, jax.numpy as jnp, jaxquant as jq
      >>> w = jax.random.normal(jax.random.key(0), (256, 128))
      >>> q = jq.quantize(w, "nf4", 64, axis=0, double_quant=True)
      >>> jq.qmatmul(jnp.ones((3, 256)), q).shape
      (3, 128)
    """
    if not isinstance(x, jax.Array):
        x = jnp.asarray(x)
    if implementation == "auto":
        implementation = _DEFAULT.get()
    compute = _check(x, q, implementation, compute_dtype)
    return _qmatmul(x, q, implementation, interpret, compute)
