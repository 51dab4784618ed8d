"""jaxquant: blockwise 4- and 8-bit quantization for JAX (NF4/FP4 bit-exact with bitsandbytes)."""

__version__ = "0.1.0"

from jaxquant._src.bnb import from_bnb, to_bnb
from jaxquant._src.codebooks import QTYPES
from jaxquant._src.io import CheckpointError, load, save
from jaxquant._src.matmul import implementation, qmatmul
from jaxquant._src.memory import bits_per_param, memory_table, nbytes, num_params
from jaxquant._src.qarray import QArray, validate
from jaxquant._src.config import QuantConfig
from jaxquant._src.dequantize import dequantize, dequantize_into, unpack_codes
from jaxquant._src.quantize import quantize
from jaxquant._src.sharding import qarray_sharding
from jaxquant._src.report import format_report, memory_report
from jaxquant._src.tree import Layout, Policy, PolicyError, Rule, dequantize_tree, quantize_tree
from jaxquant import lora

__all__ = [
    "CheckpointError",
    "Layout",
    "Policy",
    "PolicyError",
    "QTYPES",
    "QArray",
    "QuantConfig",
    "bits_per_param",
    "dequantize",
    "dequantize_into",
    "dequantize_tree",
    "format_report",
    "implementation",
    "load",
    "from_bnb",
    "memory_report",
    "memory_table",
    "nbytes",
    "num_params",
    "qarray_sharding",
    "qmatmul",
    "quantize",
    "quantize_tree",
    "save",
    "Rule",
    "to_bnb",
    "unpack_codes",
    "validate",
]


def __getattr__(name):
    # jaxquant.flax imports Flax: loaded on first use, so the array core stays Flax-free.
    if name == "flax":
        import importlib
        return importlib.import_module("jaxquant.flax")
    raise AttributeError(f"module 'jaxquant' has no attribute {name!r}")
