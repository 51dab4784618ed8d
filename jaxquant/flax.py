"""Flax integration: run Linen models on quantized params (``apply``)."""

from jaxquant._src.flax_linen import apply

__all__ = ["apply"]
