"""Flax integration: run Linen models (``apply``) and NNX modules (``quantize_module``) quantized."""

from jaxquant._src.flax_linen import apply, layouts
from jaxquant._src.flax_nnx import QLinear, quantize_module

__all__ = ["QLinear", "apply", "layouts", "quantize_module"]
