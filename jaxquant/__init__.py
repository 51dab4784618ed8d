"""jaxquant: blockwise 4- and 8-bit quantization for JAX (NF4/FP4 bit-exact with bitsandbytes)."""

__version__ = "0.1.0"

from jaxquant._src.bnb import from_bnb, to_bnb
from jaxquant._src.codebooks import QTYPES
from jaxquant._src.matmul import qmatmul
from jaxquant._src.memory import bits_per_param, memory_table, nbytes, num_params
from jaxquant._src.qarray import QArray, validate
from jaxquant._src.quantize import QuantConfig, dequantize, quantize, unpack_codes

__all__ = [
    "QTYPES",
    "QArray",
    "QuantConfig",
    "bits_per_param",
    "dequantize",
    "from_bnb",
    "memory_table",
    "nbytes",
    "num_params",
    "qmatmul",
    "quantize",
    "to_bnb",
    "unpack_codes",
    "validate",
]
