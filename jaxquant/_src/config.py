"""``QuantConfig``: how to quantize one array, validated at the API boundary."""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxquant._src import codebooks, layout


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How to quantize one array (hashable: a static argument of the jitted core)."""

    qtype: str = "nf4"
    block_size: int | None = 64
    axis: int | tuple[int, ...] | None = None
    zero_point: bool = False
    double_quant: bool = False
    nested_block_size: int = 256

    def validated(self, ndim: int) -> "QuantConfig":
        """The config with ``axis`` made non-negative; ValueError for what is not allowed."""
        qt = codebooks.get_qtype(self.qtype)
        for name in ("block_size", "nested_block_size"):
            value = getattr(self, name)
            if value is None and name == "block_size":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive int (or block_size=None for one block "
                                 f"per row), got {name}={value!r}")
        if self.zero_point and not qt.is_integer:
            raise ValueError(f"zero_point=True needs an integer qtype ('int4' or 'int8'), got "
                             f"qtype={self.qtype!r}: table types are symmetric by construction")
        axis = layout.normalize_axis(self.axis, ndim)  # a tuple: contiguous axes, merged
        bs = None if self.block_size is None else int(self.block_size)
        return dataclasses.replace(self, axis=axis, block_size=bs,
                                   nested_block_size=int(self.nested_block_size))
