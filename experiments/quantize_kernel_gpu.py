"""The single-pass Hopper quantize kernel on the GPU: bit-exactness, then speed vs the XLA path.

    PYTHONPATH=. python3 experiments/quantize_kernel_gpu.py
1. Codes and float32 absmax of the kernel against the XLA path run on the CPU, on inputs with an
   all-zero block, a block of tiny values, heavy tails and values on the code midpoints; and the
   whole NF4 + double-quant QArray on the GPU against the CPU's.
2. CUPTI time over 4 rotating bf16 inputs (more than the L2): the kernel alone, `jq.quantize`
   NF4 + DQ (kernel + XLA's nested step), the XLA path alone (kernel switched off), and a one-pass
   copy (`x + 1`); bandwidth = bytes read + written over time.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from gpu_timing import per_call_us

import jaxquant as jq
from jaxquant._src import codebooks
from jaxquant._src.kernels import quantize_mgpu as QK
from jaxquant._src.testing import awkward_bf16

cpu = jax.devices("cpu")[0]
rng = np.random.default_rng(0)


def awkward(shape):
    return np.asarray(awkward_bf16(rng, shape))


for shape in [(64, 512), (3, 4096), (4096, 14336)]:
    x = awkward(shape)
    for qtype in ("nf4", "fp4"):
        codes, absmax = QK.quantize_blocks(jnp.asarray(x), qtype)
        ref = jq.quantize(jax.device_put(x, cpu), qtype, 64)
        same = (np.array_equal(np.asarray(codes), np.asarray(ref.codes).reshape(-1))
                and np.array_equal(np.asarray(absmax).view(np.uint32),
                                   np.asarray(ref.scale).reshape(-1).view(np.uint32)))
        if not same:
            c, r = np.asarray(codes), np.asarray(ref.codes).reshape(-1)
            bad = np.flatnonzero(c != r)
            print(f"{shape} {qtype}: kernel != CPU XLA path: {bad.size} bytes differ, first at "
                  f"{bad[:4]}: {c[bad[:4]]} vs {r[bad[:4]]}; absmax equal: "
                  f"{np.array_equal(np.asarray(absmax), np.asarray(ref.scale).reshape(-1))}", flush=True)
        else:
            print(f"{shape} {qtype}: kernel == CPU XLA path", flush=True)
    q, ref = jq.quantize(jnp.asarray(x), "nf4", 64, double_quant=True), \
        jq.quantize(jax.device_put(x, cpu), "nf4", 64, double_quant=True)
    assert np.array_equal(np.asarray(q.codes), np.asarray(ref.codes))
    assert np.array_equal(np.asarray(q.scale.codes), np.asarray(ref.scale.codes))
    print(f"{shape} nf4 + DQ QArray: codes and nested codes == CPU; offset {float(q.scale.offset):.9g} "
          f"vs {float(ref.scale.offset):.9g}", flush=True)


def fp4_midpoint_check(x):
    """The kernel's reciprocal against IEEE: run the kernel with FP4's (sorted) midpoints, whose
    simple fractions (5/6, 7/12, ...) a ratio of two bf16 numbers often hits exactly, and compare
    the midpoint counts with numpy's x * float32(1 / absmax). NF4 alone cannot tell: its
    midpoints are rarely hit, so a reciprocal one ulp off changed no NF4 code on 58M values."""
    import types
    fp4 = codebooks.get_qtype("fp4")
    get_qtype = QK.codebooks.get_qtype
    QK.codebooks.get_qtype = lambda name: types.SimpleNamespace(midpoints=fp4.midpoints, sorted_order=np.arange(16))
    jax.clear_caches()
    try:
        codes = np.asarray(QK.quantize_blocks(jnp.asarray(x), "nf4")[0])
    finally:
        QK.codebooks.get_qtype = get_qtype
        jax.clear_caches()
    blocks = np.asarray(x, np.float32).reshape(-1, 64)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    scaled = blocks * (np.float32(1) / np.maximum(absmax, np.finfo(np.float32).tiny))
    count = np.searchsorted(fp4.midpoints, scaled, side="left").astype(np.uint8).reshape(-1, 2)
    want = (count[:, 0] << 4) | count[:, 1]
    return int((codes != want).sum()), want.size


for shape in [(4096, 14336)]:
    bad, total = fp4_midpoint_check(np.asarray(jax.random.normal(jax.random.key(7), shape, jnp.bfloat16)))
    print(f"{shape} kernel with FP4 midpoints vs numpy (IEEE reciprocal): {bad} of {total} bytes differ", flush=True)


def seconds(f, xs):
    return per_call_us(f, [(x,) for x in xs]) / 1e6


print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}; TB/s = bytes read + written / time")
for k, n in [(4096, 4096), (4096, 14336)]:
    xs = [jax.random.normal(jax.random.key(i), (k, n), jnp.bfloat16) for i in range(4)]
    q = jq.quantize(xs[0], "nf4", 64, double_quant=True, check_finite=False)
    in_bytes, out_bytes = xs[0].nbytes, jq.nbytes(q)
    t_kernel = seconds(lambda x: QK.quantize_blocks(x, "nf4"), xs)
    t_full = seconds(lambda x: jq.quantize(x, "nf4", 64, double_quant=True, check_finite=False), xs)
    t_plain = seconds(lambda x: jq.quantize(x, "nf4", 64, check_finite=False), xs)  # ANCHORS' case
    t_fp4 = seconds(lambda x: jq.quantize(x, "fp4", 64, check_finite=False), xs)
    can_use, QK.can_use = QK.can_use, lambda *a: False
    jax.clear_caches()
    t_xla = seconds(lambda x: jq.quantize(x, "nf4", 64, double_quant=True, check_finite=False), xs)
    t_xla_plain = seconds(lambda x: jq.quantize(x, "nf4", 64, check_finite=False), xs)
    t_xla_fp4 = seconds(lambda x: jq.quantize(x, "fp4", 64, check_finite=False), xs)
    QK.can_use = can_use
    jax.clear_caches()
    t_copy = seconds(lambda x: x + jnp.asarray(1, x.dtype), xs)
    search = QK._search
    QK._search = lambda scaled, *_: jnp.zeros(scaled.shape, jnp.int32)
    jax.clear_caches()
    t_probe = seconds(lambda x: QK.quantize_blocks(x, "nf4"), xs)  # no code computation
    QK._search = search
    jax.clear_caches()
    # (session 6 also timed session 4's binary search here: results/quantize_kernel_h100_session6.log)
    print(f"{k}x{n}: kernel with the cell table {t_kernel * 1e6:.1f} us, without a code search "
          f"{t_probe * 1e6:.1f} us", flush=True)
    copy = 2 * in_bytes / t_copy / 1e12
    kernel_bytes = in_bytes + n * k // 2 + n * k // 64 * 4
    print(f"{k}x{n}: copy {copy:.2f} TB/s | kernel alone {t_kernel * 1e6:6.1f} us "
          f"{kernel_bytes / t_kernel / 1e12:.2f} TB/s ({kernel_bytes / t_kernel / 1e12 / copy:.0%}) | "
          f"quantize NF4+DQ {t_full * 1e6:6.1f} us {(in_bytes + out_bytes) / t_full / 1e12:.2f} TB/s "
          f"({(in_bytes + out_bytes) / t_full / 1e12 / copy:.0%}) | XLA path {t_xla * 1e6:6.1f} us "
          f"{(in_bytes + out_bytes) / t_xla / 1e12:.2f} TB/s ({(in_bytes + out_bytes) / t_xla / 1e12 / copy:.0%})"
          f" | NF4 without DQ: quantize {t_plain * 1e6:.1f} us ({kernel_bytes / t_plain / 1e12 / copy:.0%}), "
          f"XLA path {t_xla_plain * 1e6:.1f} us ({kernel_bytes / t_xla_plain / 1e12 / copy:.0%}) | FP4: kernel "
          f"{t_fp4 * 1e6:.1f} us ({kernel_bytes / t_fp4 / 1e12 / copy:.0%}), XLA path {t_xla_fp4 * 1e6:.1f} us",
          flush=True)

# tile variants (kernel alone, 4096x14336): blocks per step, steps per CTA, pipeline stages
if os.environ.get("SKIP_VARIANTS"):
    raise SystemExit
xs = [jax.random.normal(jax.random.key(i), (4096, 14336), jnp.bfloat16) for i in range(4)]
kernel_bytes = xs[0].nbytes * 5 // 4 + xs[0].size // 16
ref_codes = np.asarray(jq.quantize(jax.device_put(xs[0], cpu), "nf4", 64).codes)
for tile, steps, stages in [(64, 8, 4), (128, 4, 4), (128, 8, 2), (64, 16, 2), (192, 4, 3)]:
    QK.TILE_BLOCKS, QK.STEPS_PER_CTA, QK.STAGES = tile, steps, stages
    jax.clear_caches()
    try:
        codes, absmax = QK.quantize_blocks(xs[0], "nf4")
        ok = np.array_equal(np.asarray(codes), ref_codes)
        t = seconds(lambda x: QK.quantize_blocks(x, "nf4"), xs)
        print(f"tile {tile} blocks, {steps} steps/CTA, {stages} stages: {t * 1e6:6.1f} us "
              f"({kernel_bytes / t / 1e12:.2f} TB/s), codes == CPU: {ok}", flush=True)
    except Exception as e:  # noqa: BLE001 (a variant that fails to compile is a finding)
        print(f"tile {tile} blocks, {steps} steps/CTA, {stages} stages: {type(e).__name__}: {str(e)[:100]}")
