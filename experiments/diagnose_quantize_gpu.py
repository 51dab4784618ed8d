"""On the GPU machine: where GPU quantize first differs from the CPU's, stage by stage.

    PYTHONPATH=. python3 experiments/diagnose_quantize_gpu.py
For each (qtype, axis) of tests/gpu/test_quantize_gpu.py (same inputs, same seed), compares the
first-level codes / constants / zero points, then each step of double quantization fed the
CPU's constants on both devices (the sum, the count, the offset, the centered constants, the
nested codes and scales), and prints the first stage whose bits differ with a few values.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant._src import nested
from jaxquant._src.config import QuantConfig
from jaxquant._src.encode import quantize_rows
from jaxquant._src.quantize import quantize_array

sys.path.insert(0, "tests/gpu")
from test_quantize_gpu import QTYPES, SHAPES, bits, make_input  # noqa: E402


def nested_stages(constants):
    finite = jnp.isfinite(constants)
    total = nested.fixed_order_sum(jnp.where(finite, constants, 0))
    count = jnp.maximum(finite.sum(), 1).astype(jnp.float32)
    offset = total / count
    centered = constants - offset
    codes, scale, _ = quantize_rows(centered, QuantConfig("dynamic8", 256, None), 256)
    return dict(total=total, count=count, offset=offset, centered=centered, codes=codes, scale=scale)


def first_difference(got: dict, want: dict) -> str | None:
    for name in want:
        g, w = np.asarray(bits(got[name])), np.asarray(bits(want[name]))
        if g.shape != w.shape or (g != w).any():
            where = np.argwhere(g != w)[:4] if g.shape == w.shape else "shape"
            gv, wv = np.asarray(got[name], np.float64), np.asarray(want[name], np.float64)
            idx = tuple(where[0]) if len(where) and not isinstance(where, str) else ()
            return (f"{name}: {int((g != w).sum())}/{w.size} differ, first at {where.tolist() if not isinstance(where, str) else where} "
                    f"gpu={gv[idx] if idx or gv.ndim == 0 else '?'} cpu={wv[idx] if idx or wv.ndim == 0 else '?'}")
    return None


def main() -> int:
    cpu, gpu = jax.devices("cpu")[0], jax.devices()[0]  # both the CPU off a GPU machine: a dry run
    print(f"device={gpu.device_kind} jax={jax.__version__}")
    bad = 0
    for axis in (None, 0, -1):
        for qtype, zp in QTYPES:
            rng = np.random.default_rng(1234)
            for shape, dtype, block, dq in SHAPES[axis]:
                x = make_input(rng, shape, dtype)
                cfg = QuantConfig(qtype, block, axis, zp, False, 256).validated(x.ndim)
                run = lambda d, cfg=cfg, x=x: quantize_array(jax.device_put(x, d), cfg)
                want, got = run(cpu), run(gpu)
                first = dict(codes=want.codes, scale=want.scale, zero_point=want.zero_point)
                diff = first_difference(
                    {k: v for k, v in dict(codes=got.codes, scale=got.scale, zero_point=got.zero_point).items()
                     if v is not None}, {k: v for k, v in first.items() if v is not None})
                stage = "first level"
                if diff is None and dq:
                    c = np.asarray(want.scale)
                    ws = jax.jit(nested_stages)(jax.device_put(c, cpu))
                    gs = jax.jit(nested_stages)(jax.device_put(c, gpu))
                    diff, stage = first_difference(gs, ws), "nested"
                if diff:
                    bad += 1
                    print(f"{qtype:8s} zp={zp!s:5s} axis={axis!s:4s} {shape} {np.dtype(dtype).name} "
                          f"b{block} dq={dq}: {stage}: {diff}")
    print("all equal" if not bad else f"{bad} cases differ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
