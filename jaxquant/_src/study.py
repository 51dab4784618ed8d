"""Quantize a dict of real weights with several data types and measure storage and error."""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxquant._src.memory import nbytes
from jaxquant._src.config import QuantConfig
from jaxquant._src.dequantize import dequantize_array
from jaxquant._src.quantize import quantize_array


@dataclasses.dataclass(frozen=True)
class Variant:
    """A data-type spec such as ``nf4``, ``nf4+dq`` (double quant) or ``int4+zp`` (affine)."""

    name: str
    qtype: str
    double_quant: bool = False
    zero_point: bool = False

    @classmethod
    def parse(cls, spec: str) -> "Variant":
        base, *flags = spec.strip().lower().split("+")
        unknown = set(flags) - {"dq", "zp"}
        if unknown:
            raise ValueError(f"unknown suffix {sorted(unknown)} in {spec!r}; use +dq (double quant) "
                             f"and/or +zp (affine, int4/int8 only)")
        return cls(spec.strip().lower(), base, "dq" in flags, "zp" in flags)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _quantize_and_error(w: jax.Array, cfg: QuantConfig):
    q = quantize_array(w, cfg)
    err = dequantize_array(q, np.dtype(np.float32)) - w.astype(jnp.float32)
    return q, jnp.sum(err * err), jnp.sum(jnp.abs(err))


def quantize_weights(weights: dict[str, np.ndarray], variants: list[Variant], block_size: int,
                     axes: dict[str, int], progress: bool = True) -> list[dict]:
    """For each variant, quantize every weight in ``axes`` along its axis and sum up.

    Weights not in ``axes`` (norms) are counted as stored in bfloat16. Returns one row per variant:
    ``bytes``, ``bits_per_param``, ``rel_rms_error`` (sqrt of squared error over squared norm, over
    the quantized weights), ``sqnr_db``, ``mean_abs_error``, ``seconds``.
    """
    params = sum(w.size for w in weights.values())
    kept = sum(2 * w.size for name, w in weights.items() if name not in axes)
    signal = sum(float(np.sum(np.square(weights[n], dtype=np.float64))) for n in axes)
    count = sum(weights[n].size for n in axes)
    bar = tqdm(total=len(variants) * len(axes), desc="quantizing", disable=not progress, leave=False)
    rows = []
    for v in variants:
        start, stored, sq, ab = time.perf_counter(), kept, 0.0, 0.0
        for name, axis in axes.items():
            bar.set_postfix_str(f"{v.name} {name}")
            cfg = QuantConfig(v.qtype, block_size, axis, v.zero_point, v.double_quant).validated(weights[name].ndim)
            q, e2, e1 = _quantize_and_error(jnp.asarray(weights[name], jnp.bfloat16), cfg)
            stored, sq, ab = stored + nbytes(q), sq + float(e2), ab + float(e1)
            bar.update()
        rel = (sq / signal) ** 0.5
        rows.append(dict(dtype=v.name, bytes=stored, bits_per_param=8 * stored / params,
                         rel_rms_error=rel, sqnr_db=-20 * np.log10(rel) if rel else float("inf"),
                         mean_abs_error=ab / count, seconds=time.perf_counter() - start))
    bar.close()
    return rows


def format_rows(rows: list[dict], params: int) -> str:
    lines = [f"{'data type':<10} {'stored MB':>10} {'bits/param':>11} {'rel. RMS err':>13} "
             f"{'SQNR dB':>8} {'mean |err|':>11} {'time s':>7}",
             f"{'bfloat16':<10} {2 * params / 1e6:>10.1f} {16.0:>11.3f} {'(reference)':>13}"]
    for r in rows:
        lines.append(f"{r['dtype']:<10} {r['bytes'] / 1e6:>10.1f} {r['bits_per_param']:>11.3f} "
                     f"{r['rel_rms_error']:>13.4f} {r['sqnr_db']:>8.2f} {r['mean_abs_error']:>11.2e} "
                     f"{r['seconds']:>7.2f}")
    return "\n".join(lines)
