"""Double quantization (QLoRA, arXiv 2305.14314): the float32 block constants quantized again."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src.config import QuantConfig
from jaxquant._src.division import divide
from jaxquant._src.encode import quantize_rows
from jaxquant._src.qarray import QArray


def fixed_order_sum(values: jax.Array) -> jax.Array:
    """The float32 sum of ``values`` in one fixed order (halves added pairwise), the same bits on
    every backend: XLA's own reductions sum in a backend-dependent order, and the mean's last bit
    moves every nested code and constant."""
    flat = values.reshape(-1)
    n = 1 << max(flat.size - 1, 0).bit_length()
    flat = jnp.pad(flat, (0, n - flat.size))
    while flat.size > 1:
        flat = flat[: flat.size // 2] + flat[flat.size // 2:]
    return flat[0]


def quantize_nested(constants: jax.Array, block_size: int) -> QArray:
    """bitsandbytes' double quantization: subtract the mean, then dynamic8 blocks of ``block_size``.

    The result is a QArray of ``constants``' shape with the mean as its ``offset``; ``dequantize``
    adds it back after the scale (``dequantize.block_scale``).
    """
    # The mean of the finite constants: a NaN constant (a block that held NaN/Inf under jit)
    # then spoils only its own nested block of ``block_size`` constants, not every block.
    # The barriers keep XLA from fusing the producer of the constants into the sum and the
    # subtraction (a GPU contracts a multiply and an add into one FMA: other bits than the CPU's)
    # and the mean into the subtraction (the H200's centered constants were 1 ulp off its own
    # constants minus the offset it stored). Each step is then one IEEE operation, the same bits
    # on every backend.
    constants = jax.lax.optimization_barrier(constants)
    finite = jnp.isfinite(constants)
    total = fixed_order_sum(jnp.where(finite, constants, 0))
    count = jnp.maximum(finite.sum(), 1).astype(jnp.float32)
    offset = jax.lax.optimization_barrier(divide(total, count)) if constants.size else jnp.float32(0)
    centered = constants - offset
    codes, scale, _ = quantize_rows(centered, QuantConfig("dynamic8", block_size, None), block_size)
    return QArray(codes, scale, None, offset.astype(jnp.float32), shape=tuple(centered.shape),
                  dtype=np.dtype(centered.dtype), qtype="dynamic8", block_size=block_size, axis=None)
