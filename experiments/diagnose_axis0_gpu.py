"""Where the GPU's axis-0 quantize differs from the CPU's (diagnosis for quantize_axis0_gpu.py).

    PYTHONPATH=. python3 experiments/diagnose_axis0_gpu.py OUTDIR     # K=128 for a quick CPU run
Per qtype, on a 4096x14336 bf16 normal input: differing codes / constants / zero points of the
GPU's in-place path and of the GPU's rows path (x.T along its last axis) against the CPU, with
the first differing elements; writes the optimized HLO of each GPU quantize to OUTDIR.
"""

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq

cpu = jax.devices("cpu")[0]
out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp")
x = jax.random.normal(jax.random.key(1), (int(__import__("os").environ.get("K", 4096)), 14336), jnp.bfloat16)
xc = jax.device_put(x, cpu)
xf = np.asarray(xc, np.float32)


def summary(name, got, ref, qtype):
    codes_g, codes_r = np.asarray(got.codes), np.asarray(ref.codes)
    sg, sr = np.asarray(got.scale).view(np.uint32), np.asarray(ref.scale).view(np.uint32)
    zp = 0 if ref.zero_point is None else int((np.asarray(got.zero_point) != np.asarray(ref.zero_point)).sum())
    bad = np.argwhere(codes_g != codes_r)
    print(f"{name:<10} {qtype:<9} bytes differ {len(bad)} of {codes_r.size}; constants differ "
          f"{int((sg != sr).sum())}; zero points differ {zp}", flush=True)
    per_byte = 2 if codes_r.shape[-1] * 2 == xf.shape[0] else 1  # 4-bit: two k per byte
    for n, kb in bad[:4]:  # codes (N, K / per_byte)
        k = per_byte * kb
        scale_r, scale_g = np.asarray(ref.scale)[n, k // 64], np.asarray(got.scale)[n, k // 64]
        vals = xf[k:k + per_byte, n]
        print(f"    n={n} k={k}: x={vals} scale cpu={scale_r!r} gpu={scale_g!r} "
              f"x/scale={vals.astype(np.float64) / np.float64(scale_r)} "
              f"byte gpu={codes_g[n, kb]:#04x} cpu={codes_r[n, kb]:#04x}", flush=True)
    bad_s = np.argwhere(sg != sr)[:2]
    for n, b in bad_s:
        print(f"    constant n={n} block={b}: gpu={np.asarray(got.scale)[n, b]!r} cpu={np.asarray(ref.scale)[n, b]!r}")


print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
for qtype, zp in [("nf4", False), ("fp4", False), ("int4", False), ("int4", True), ("int8", True),
                  ("dynamic8", False)]:
    kw = dict(qtype=qtype, block_size=64, zero_point=zp, check_finite=False)
    ref = jq.quantize(xc, axis=0, **kw)
    got = jq.quantize(x, axis=0, **kw)
    summary("in place", got, ref, qtype + ("+zp" if zp else ""))
    rows = jq.quantize(x.T, axis=1, **kw)
    summary("rows", rows, ref, qtype + ("+zp" if zp else ""))
    for axis in (0, 1):
        hlo = jax.jit(lambda a: jq.quantize(a, axis=axis, **kw)).lower(x if axis == 0 else x.T).compile().as_text()
        (out / f"hlo_{qtype}{'_zp' if zp else ''}_axis{axis}.txt").write_text(hlo)
