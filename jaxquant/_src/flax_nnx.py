"""Run Flax NNX modules quantized: module surgery swaps ``nnx.Linear`` for ``QLinear``.

``QArray`` is registered as an NNX data type, so a QArray held by a module attribute is part of
the module's state: it travels through ``nnx.jit``, ``nnx.split``/``merge`` and ``nnx.state``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxquant._src.dequantize import dequantize
from jaxquant._src.matmul import qmatmul
from jaxquant._src.qarray import QArray
from jaxquant._src.quantize import quantize_array
from jaxquant._src.tree import Policy, plan

nnx.register_data_type(QArray)


class QLinear(nnx.Module):
    """``nnx.Linear`` with its kernel stored as a QArray (blocks along the input axis)."""

    def __init__(self, kernel: QArray, bias: nnx.Param | None, dtype=None):
        self.kernel = kernel
        self.bias = bias
        self.dtype = dtype

    def __call__(self, inputs: jax.Array) -> jax.Array:
        bias = self.bias[...] if self.bias is not None else None
        parts = [inputs, jnp.zeros((), self.kernel.dtype)] + ([bias] if bias is not None else [])
        dtype = self.dtype or jnp.result_type(*parts)
        y = qmatmul(inputs.astype(dtype), self.kernel, compute_dtype=dtype)
        if bias is not None:
            y = y + jnp.reshape(bias.astype(dtype), (1,) * (y.ndim - 1) + (-1,))
        return y

    def dequantized(self) -> nnx.Linear:
        """An equivalent plain ``nnx.Linear`` (for comparisons)."""
        in_f, out_f = self.kernel.shape
        linear = nnx.Linear(in_f, out_f, use_bias=self.bias is not None, dtype=self.dtype,
                            param_dtype=self.kernel.dtype, rngs=nnx.Rngs(0))
        linear.kernel[...] = dequantize(self.kernel)
        if self.bias is not None:
            linear.bias[...] = self.bias[...]
        return linear


def _set(parent, key, value):
    if isinstance(key, int) or (isinstance(key, str) and key.isdigit() and not hasattr(parent, key)):
        parent[int(key)] = value
    else:
        setattr(parent, key, value)


def _get(node, path):
    for key in path:
        node = node[int(key)] if isinstance(key, int) else getattr(node, key)
    return node


def quantize_module(module: nnx.Module, policy: Policy | None = None) -> nnx.Module:
    """Replace the ``nnx.Linear`` layers whose kernel the policy quantizes by ``QLinear``, in place.

    The policy sees paths like ``layers/0/kernel``; the default quantizes every Linear kernel of
    at least 4096 elements to NF4 + double quant along the input axis. Other layer types are left
    as they are. Returns ``module`` (updated).

    Example:
      >>> from flax import nnx; import jax.numpy as jnp, jaxquant as jq
      >>> model = nnx.Sequential(nnx.Linear(256, 256, rngs=nnx.Rngs(0)))
      >>> model = jq.flax.quantize_module(model)
      >>> y = nnx.jit(lambda m, x: m(x))(model, jnp.ones((2, 256)))
    """
    linears = [(path, m) for path, m in nnx.iter_modules(module) if isinstance(m, nnx.Linear)]
    params = {"/".join(map(str, path)): {"kernel": m.kernel[...]} for path, m in linears}
    decisions = plan(params, policy)
    for path, linear in linears:
        rule = decisions["/".join(map(str, (*path, "kernel")))]
        if rule is None:
            continue
        if rule.axis not in (0, -2):
            raise ValueError(f"quantize_module: {'/'.join(map(str, path))} is an nnx.Linear: its "
                             f"kernel (in, out) must be quantized along axis 0, got {rule.axis}")
        q = quantize_array(linear.kernel[...], rule.config(2))
        replacement = QLinear(q, linear.bias, linear.dtype)
        if not path:
            raise ValueError("quantize_module: pass a module that contains the Linear layers")
        _set(_get(module, path[:-1]), path[-1], replacement)
    return module
