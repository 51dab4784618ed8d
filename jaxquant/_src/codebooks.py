"""Code tables: the value each stored code stands for, exactly as bitsandbytes has them.

Every qtype has a ``values`` table indexed by the raw stored code (16 entries for 4-bit types,
256 for 8-bit types), so that dequantization is always ``values[code] * scale``:

* ``nf4``: the 16 NormalFloat4 levels (QLoRA, arXiv 2305.14314, §3), ascending, code 7 = 0.
* ``fp4``: bitsandbytes' own FP4 table (not OCP E2M1); bit 3 is the sign, so it is unsorted.
* ``int4`` / ``int8``: two's-complement bit patterns, ``values[raw] = signed(raw)``.
* ``dynamic8``: bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(signed=True)``),
  bit-exact from the float32 patterns in ``data/bnb_dynamic_map.txt``.

Quantizing to a table picks the nearest level: the number of midpoints of the SORTED table that
are strictly below the value (a tie goes to the lower level), mapped back to the raw code.
This module is pure numpy; nothing here touches JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources

import numpy as np

NF4 = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)

# bitsandbytes' FP4: magnitudes [0, 0.0625, 8, 12, 4, 6, 2, 3] / 12 for codes 0-7, negated for 8-15.
_FP4_MAGNITUDES = np.array([0, 0.0625, 8, 12, 4, 6, 2, 3], dtype=np.float32) / np.float32(12)
FP4 = np.concatenate([_FP4_MAGNITUDES, -_FP4_MAGNITUDES]).astype(np.float32)


def _load_dynamic_maps() -> tuple[np.ndarray, np.ndarray]:
    text = importlib.resources.files("jaxquant._src.data").joinpath("bnb_dynamic_map.txt").read_text()
    rows = [line.split() for line in text.splitlines() if line and not line.startswith("#")]
    signed = np.array([int(r[1], 16) for r in rows], dtype=np.uint32).view(np.float32)
    unsigned = np.array([int(r[3], 16) for r in rows], dtype=np.uint32).view(np.float32)
    return signed, unsigned


DYNAMIC8_SIGNED, DYNAMIC8_UNSIGNED = _load_dynamic_maps()

INT4 = np.array([v if v < 8 else v - 16 for v in range(16)], dtype=np.float32)
INT8 = np.arange(256, dtype=np.int32).astype(np.uint8).view(np.int8).astype(np.float32)


def cell_entries(midpoints: np.ndarray, firsts: np.ndarray, lasts: np.ndarray):
    """For cells ``[firsts[i], lasts[i]]`` (float32, inclusive): how many midpoints lie below each
    cell, and the midpoints inside it padded with +inf to the fullest cell's count. Then the
    number of midpoints strictly below a value ``v`` of cell ``i`` is
    ``below[i] + sum(v > inside[i])``, exactly."""
    below = np.sum(midpoints[None, :] < firsts[:, None], axis=1).astype(np.int32)
    within = (midpoints[None, :] >= firsts[:, None]) & (midpoints[None, :] <= lasts[:, None])
    inside = np.full((len(firsts), max(1, int(within.sum(1).max()))), np.inf, np.float32)
    for row, mask in zip(inside, within):
        row[:mask.sum()] = midpoints[mask]
    return below, inside


@dataclasses.dataclass(frozen=True)
class QType:
    """What a qtype is: its table, its width in bits and how it scales."""

    name: str
    bits: int
    values: np.ndarray  # float32 [2**bits], indexed by the raw stored code
    is_integer: bool  # uniform grid: round(x / scale); else nearest table level of x / absmax

    @property
    def qmax(self) -> int:
        """Largest magnitude of a symmetric integer code (7 for int4, 127 for int8)."""
        return 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        """Smallest signed integer code (-8 for int4, -128 for int8): affine codes use it."""
        return -(2 ** (self.bits - 1))

    @functools.cached_property
    def sorted_order(self) -> np.ndarray:
        """Raw codes sorted by value. Stable, as bitsandbytes' order is: FP4's +0 (code 0) sorts
        before -0 (code 8), so 0.0 codes as 0 and a tiny positive value as 8, bit for bit."""
        return np.argsort(self.values, kind="stable").astype(np.int32)

    @functools.cached_property
    def midpoints(self) -> np.ndarray:
        """float32 midpoints between consecutive sorted levels: the decision thresholds."""
        s = self.values[self.sorted_order]
        return ((s[:-1] + s[1:]) / np.float32(2)).astype(np.float32)

    @functools.cached_property
    def cell_lookup(self) -> tuple[int, np.ndarray, np.ndarray] | None:
        """A uniform grid over [-1, 1] in which each cell holds at most one midpoint.

        Returns ``(cells, cell_midpoint, cell_code)``: for a scaled value ``s``, the cell is
        ``j = floor((s + 1) * cells / 2 + 0.5)`` (``cells + 1`` of them, shifted by half a cell so
        that no midpoint sits on an edge) and the code is ``cell_code[2 * j + (s > cell_midpoint[j])]``.
        Every midpoint is at least 1% of a cell from an edge, so float rounding of ``j`` (a few
        ulps) never moves ``s`` across a midpoint: the result equals the midpoint count exactly.
        None for tables whose midpoints are too close for 4096 cells.
        """
        mids = self.midpoints.astype(np.float64)
        for cells in (128, 256, 512, 1024, 2048, 4096):
            pos = (mids + 1) * (cells / 2) + 0.5
            cell = np.floor(pos).astype(int)
            if np.bincount(cell).max() > 1 or np.min(np.abs(pos - np.round(pos))) < 0.01:
                continue
            cell_mid = np.full(cells + 1, 2.0, np.float32)  # 2.0: no midpoint in the cell
            cell_mid[cell] = self.midpoints
            below = np.array([np.sum(mids < (j - 0.5) / (cells / 2) - 1) for j in range(cells + 1)])
            counts = np.stack([below, below + 1], -1).clip(0, len(mids)).reshape(-1)
            return cells, cell_mid, self.sorted_order[counts].astype(np.uint8)
        return None

    @functools.cached_property
    def bit_cells(self) -> tuple[int, int, int, np.ndarray, np.ndarray]:
        """Cells keyed by a float32's bits, for tables too dense near 0 for a uniform grid.

        Returns ``(shift, low, high, below, inside)``: a value's cell is its magnitude bits
        ``>> shift`` (its exponent and top mantissa bits) clipped to ``[low, high]``, minus
        ``low``, plus ``high - low + 1`` for negative values; its midpoint count is
        ``below[cell] + sum(value > inside[cell])`` (``inside`` padded with +inf). The cells'
        limits are exact float32 values, so the count equals the number of midpoints strictly
        below for every non-NaN float32. Cells narrow enough for at most 4 midpoints each.
        """
        mids = self.midpoints
        mags = np.abs(mids[mids != 0]).view(np.uint32)
        for mantissa_bits in range(3, 11):
            shift = 23 - mantissa_bits
            low, high = int(mags.min() >> shift) - 1, int(mags.max() >> shift) + 1
            starts = np.arange(low, high + 1, dtype=np.int64) << shift
            starts[0] = 0
            ends = np.append(starts[1:] - 1, 0x7F800000)  # top cell: up to +inf (NaN apart)
            as_float = lambda bits: bits.astype(np.uint32).view(np.float32)
            firsts = np.concatenate([as_float(starts), -as_float(ends)])
            lasts = np.concatenate([as_float(ends), -as_float(starts)])
            below, inside = cell_entries(mids, firsts, lasts)
            if inside.shape[1] <= 4:
                return shift, low, high, below, inside
        raise ValueError(f"{self.name}: midpoints too close for float-bit cells")

    @functools.cached_property
    def zero_code(self) -> int:
        """The raw code of 0.0: fills the odd last nibble and codes all-zero blocks."""
        return int(np.flatnonzero(self.values == 0)[0])



QTYPES: dict[str, QType] = {
    "nf4": QType("nf4", 4, NF4, is_integer=False),
    "fp4": QType("fp4", 4, FP4, is_integer=False),
    "int4": QType("int4", 4, INT4, is_integer=True),
    "int8": QType("int8", 8, INT8, is_integer=True),
    "dynamic8": QType("dynamic8", 8, DYNAMIC8_SIGNED, is_integer=False),
}


def get_qtype(name: str) -> QType:
    """The QType called ``name``; ValueError listing the valid names otherwise."""
    try:
        return QTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown qtype {name!r}; valid qtypes are {sorted(QTYPES)}") from None
