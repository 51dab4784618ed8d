import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant._src import codebooks


def test_seed_int8_affine_example():
    x = np.array([0.7, -1.4, 2.5, -0.8, 1.9, -1.0, 0.3, 2.1, -0.5, 0.0], np.float32)
    q = jq.quantize(x, qtype="int8", block_size=None, zero_point=True)
    np.testing.assert_allclose(q.scale, [(2.5 + 1.4) / 255], rtol=1e-6)
    assert q.zero_point.tolist() == [-36]
    codes = jq.unpack_codes(q)
    assert codes.dtype == jnp.int8 and codes[:3].tolist() == [10, -128, 127]
    y = jq.dequantize(q)
    assert abs(float(y[0]) - 0.704) < 5e-4 and abs(float(y[1]) + 1.407) < 5e-4
    assert float(y[9]) == 0.0  # the zero point makes 0.0 exact


def test_nf4_packing_example_from_bitsandbytes():
    q = jq.quantize(np.array([-1, 1, 0, .5, -.5, .25, .1, -.1], np.float32), "nf4")
    assert bytes(np.asarray(q.codes)) == bytes.fromhex("0f7c2a86")


@pytest.mark.parametrize("qtype,expected", [("nf4", 0.0728), ("fp4", 0.0965)])
def test_mean_error_matches_bitsandbytes_table(qtype, expected):
    x = jax.random.normal(jax.random.key(0), (1024, 1024))
    err = jnp.abs(jq.dequantize(jq.quantize(x, qtype, 64)) - x).mean()
    assert abs(float(err) - expected) < 1e-3


def test_all_zero_blocks_dequantize_to_exact_zero():
    x = np.ones(64 * 3 + 5, np.float32)
    x[64:128] = 0
    x[-5:] = 0
    for qtype in jq.QTYPES:
        q = jq.quantize(x, qtype, 64)
        y = np.asarray(jq.dequantize(q))
        assert np.all(y[64:128] == 0) and np.all(y[-5:] == 0) and np.all(np.isfinite(y)), qtype
    q = jq.quantize(x, "nf4", 64)
    assert float(q.scale[1]) == 0 and np.asarray(q.codes)[32:64].tolist() == [0x77] * 32


def test_axis_minus_one_equals_axis_none_when_rows_are_whole_blocks(rng):
    x = rng.standard_normal((6, 128)).astype(np.float32)
    a, b = jq.quantize(x, "nf4", 64, axis=None), jq.quantize(x, "nf4", 64, axis=-1)
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes).reshape(-1))
    np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale).reshape(-1))
    np.testing.assert_array_equal(jq.dequantize(a), jq.dequantize(b))


def test_axis_zero_blocks_run_down_columns(rng):
    x = rng.standard_normal((128, 3)).astype(np.float32)
    q = jq.quantize(x, "int8", 64, axis=0)
    assert q.scale.shape == (3, 2)
    np.testing.assert_allclose(q.scale[1, 0], np.abs(x[:64, 1]).max() / 127, rtol=1e-6)


def test_block_size_none_is_per_tensor_or_per_channel(rng):
    x = rng.standard_normal((5, 7)).astype(np.float32)
    assert jq.quantize(x, "int8", None).scale.shape == (1,)
    per_channel = jq.quantize(x, "int8", None, axis=0)
    assert per_channel.scale.shape == (7, 1)
    np.testing.assert_allclose(per_channel.scale[:, 0], np.abs(x).max(0) / 127, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtype_round_trip_and_override(dtype, rng):
    x = jnp.asarray(rng.standard_normal((3, 100)), dtype)
    q = jq.quantize(x, "nf4", 32, axis=1)
    assert q.dtype == dtype and jq.dequantize(q).dtype == dtype
    assert jq.dequantize(q, dtype=jnp.float32).dtype == jnp.float32


def test_symmetric_int_codes_are_rounded_scaled_values(rng):
    x = rng.standard_normal(256).astype(np.float32)
    q = jq.quantize(x, "int4", 64)
    codes = np.asarray(jq.unpack_codes(q)).astype(np.int32)
    scale = np.repeat(np.asarray(q.scale), 64)
    np.testing.assert_array_equal(codes, np.clip(np.round(x / scale), -7, 7))


def test_double_quant_constants_and_bits(rng):
    x = rng.standard_normal((512, 256)).astype(np.float32)
    plain = jq.quantize(x, "nf4", 64, axis=0)
    dq = jq.quantize(x, "nf4", 64, axis=0, double_quant=True)
    assert isinstance(dq.scale, jq.QArray) and dq.scale.qtype == "dynamic8"
    assert dq.scale.block_size == 256 and dq.scale.offset.shape == ()
    np.testing.assert_array_equal(np.asarray(plain.codes), np.asarray(dq.codes))  # same 4-bit bytes
    absmax = np.asarray(plain.scale)
    np.testing.assert_allclose(float(dq.scale.offset), absmax.mean(), rtol=1e-6)
    rebuilt = np.asarray(jq.dequantize(dq.scale))
    assert np.abs(rebuilt - absmax).max() < 0.02 * absmax.max()
    assert jq.bits_per_param(plain) == 4.5
    assert abs(jq.bits_per_param(dq) - 4.127) < 1e-3


def test_affine_double_quant_quantizes_scales_keeps_int8_zero_points(rng):
    x = (rng.standard_normal((256, 64)) + 0.5).astype(np.float32)
    q = jq.quantize(x, "int4", 32, axis=0, zero_point=True, double_quant=True)
    assert isinstance(q.scale, jq.QArray) and q.zero_point.dtype == jnp.int8
    err = np.abs(np.asarray(jq.dequantize(q)) - x).max()
    assert err < 0.6 * (x.max() - x.min()) / 15


# ---------------------------------------------------------------- pytree behaviour

def test_qarray_passes_through_jit_eval_shape_device_put_tree_map(rng):
    x = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    q = jq.quantize(x, "nf4", 32, axis=0, double_quant=True)
    y = jax.jit(jq.dequantize)(q)
    np.testing.assert_array_equal(y, jq.dequantize(q))
    abstract = jax.eval_shape(lambda a: jq.quantize(a, "nf4", 32, axis=0, double_quant=True), x)
    assert jax.tree.structure(abstract) == jax.tree.structure(q)
    assert jq.nbytes(abstract) == jq.nbytes(q)
    moved = jax.device_put(q, jax.devices()[1])
    np.testing.assert_array_equal(jq.dequantize(moved), y)
    doubled = jax.tree.map(lambda a: a, q)
    assert doubled == q or jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), doubled, q))


def test_block_size_change_retraces():
    traces = []

    @jax.jit
    def f(q):
        traces.append(q.block_size)
        return jq.dequantize(q)

    x = jnp.ones((128,), jnp.float32)
    f(jq.quantize(x, "nf4", 64))
    f(jq.quantize(x, "nf4", 64))
    f(jq.quantize(x, "nf4", 32))
    assert traces == [64, 32]


def test_scan_over_stacked_layers(rng):
    ws = [rng.standard_normal((64, 16)).astype(np.float32) for _ in range(3)]
    qs = [jq.quantize(w, "nf4", 32, axis=0, double_quant=True) for w in ws]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *qs)

    def step(h, q):
        return h @ jq.dequantize(q)[:, :16].T @ jnp.ones((64, 16), jnp.float32) / 64, None

    h0 = jnp.ones((2, 16), jnp.float32)
    out, _ = jax.lax.scan(step, h0, stacked)
    ref = h0
    for q in qs:
        ref, _ = step(ref, q)
    np.testing.assert_allclose(out, ref, rtol=1e-5)


def test_quantize_under_jit_defines_nonfinite_blocks_as_nan():
    x = jnp.array([1.0, jnp.nan, 2.0, 3.0, jnp.inf, 1.0, 0.5, 0.25], jnp.float32)
    q = jax.jit(lambda a: jq.quantize(a, "nf4", 2))(x)
    y = np.asarray(jq.dequantize(q))
    assert np.isnan(np.asarray(q.scale)).tolist() == [True, False, True, False]
    assert np.isnan(y).tolist() == [True, True, False, False, True, True, False, False]


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("x", [np.arange(8), np.ones(8, bool), np.ones(8, np.complex64),
                               jnp.arange(8, dtype=jnp.int8)])
def test_non_float_input_is_type_error(x):
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        jq.quantize(x)


def test_nonfinite_concrete_input_names_count_and_place():
    x = np.ones((4, 8), np.float32)
    x[1, 2] = np.nan
    x[3, 7] = np.inf
    with pytest.raises(ValueError, match=r"2 non-finite value\(s\).*\(1, 2\), \(3, 7\)"):
        jq.quantize(x)


@pytest.mark.parametrize("kwargs,match", [
    (dict(block_size=0), "block_size must be a positive int"),
    (dict(block_size=-64), "block_size must be a positive int"),
    (dict(block_size=2.5), "block_size must be a positive int"),
    (dict(qtype="int2"), "valid qtypes are"),
    (dict(axis=2), r"axis must be None or an int in \[-2, 2\)"),
    (dict(axis=-3), r"axis must be None or an int"),
    (dict(qtype="nf4", zero_point=True), "zero_point=True needs an integer qtype"),
    (dict(nested_block_size=0, double_quant=True), "nested_block_size must be a positive int"),
])
def test_bad_config_is_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jq.quantize(np.ones((4, 64), np.float32), **kwargs)


@pytest.mark.parametrize("shape,axis", [((0,), None), ((0, 8), 1), ((3, 0), 1), ((3, 0), 0)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_empty_arrays_round_trip(shape, axis, double_quant):
    x = np.zeros(shape, np.float32)
    q = jq.quantize(x, "nf4", 64, axis=axis, double_quant=double_quant)
    y = jq.dequantize(q)
    assert y.shape == shape and y.dtype == np.float32
    assert jq.nbytes(q) == (4 if double_quant else 0)  # nothing stored but the nested offset


def test_validate_rejects_altered_leaves(rng):
    q = jq.quantize(rng.standard_normal((64, 32)).astype(np.float32), "nf4", 32, axis=0,
                    double_quant=True)
    bad = [
        dataclasses.replace(q, codes=q.codes[:, :-1]),
        dataclasses.replace(q, codes=q.codes.astype(jnp.int8)),
        dataclasses.replace(q, scale=dataclasses.replace(q.scale, codes=q.scale.codes[:-1])),
        dataclasses.replace(q, scale=jnp.ones((3,), jnp.float32)),
        dataclasses.replace(q, zero_point=jnp.zeros((32, 2), jnp.int8)),
        dataclasses.replace(q, shape=(64, 33)),
        dataclasses.replace(q, block_size=0),
    ]
    for b in bad:
        with pytest.raises(ValueError, match="inconsistent QArray"):
            jq.dequantize(b)
    with pytest.raises(ValueError, match="unknown qtype"):
        jq.validate(dataclasses.replace(q, qtype="nf5"))
    with pytest.raises(TypeError, match="expected a jaxquant.QArray"):
        jq.dequantize(np.ones(3))


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
def test_gpu_cell_lookup_gives_the_same_codes_as_compares(qtype):
    """The GPU path (a table over a uniform grid) against the CPU path (midpoint compares), on
    random values and on every midpoint and cell edge +-64 ulps."""
    from jaxquant._src.encode import code_by_cells, code_by_sum
    qt = codebooks.QTYPES[qtype]
    cells = qt.cell_lookup[0]
    edges = ((np.arange(cells + 2) - 0.5) / (cells / 2) - 1).astype(np.float32)
    probes = [np.random.default_rng(0).uniform(-1, 1, 200_000).astype(np.float32),
              np.array([-1, 1, 0, -0.0], np.float32)]
    for p in np.concatenate([qt.midpoints, edges]):
        ulp = np.spacing(np.float32(max(abs(p), 1e-30)))
        probes.append(p + np.arange(-64, 65, dtype=np.float32) * ulp)
    s = jnp.asarray(np.clip(np.concatenate(probes), -1, 1).astype(np.float32))
    np.testing.assert_array_equal(code_by_cells(s, qt), code_by_sum(s, qt))


@pytest.mark.parametrize("qtype,shape,bs,axis,dq", [
    ("nf4", (64, 96), 64, 0, True),  # whole blocks: the packed even/odd path
    ("fp4", (3, 256), 32, None, False),
    ("nf4", (5, 100), 64, 1, True),  # partial last block: the interleaving path
])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16bit_dequantize_is_the_float32_result_rounded_once(qtype, shape, bs, axis, dq, dtype, rng):
    q = jq.quantize(rng.standard_normal(shape).astype(np.float32), qtype, bs, axis=axis,
                    double_quant=dq)
    got = np.asarray(jq.dequantize(q, dtype=dtype))
    want = np.asarray(jq.dequantize(q, dtype=jnp.float32).astype(dtype))
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("qtype,zero_point", [("nf4", False), ("fp4", False), ("int4", False),
                                              ("int4", True), ("int8", True), ("dynamic8", False)])
@pytest.mark.parametrize("shape,axis,block", [((128, 96), 0, 64), ((4, 64, 6), 1, 32), ((64, 3, 5), 0, 16)])
def test_in_place_blocks_equal_the_moved_rows(qtype, zero_point, shape, axis, block, rng):
    """The off-CPU formulation for a middle block axis (reduce where the blocks lie, move only the
    codes) is bit-exact with the CPU's (move the axis last first), non-finite blocks included."""
    from jaxquant._src import encode
    from jaxquant._src.config import QuantConfig
    from jaxquant._src.quantize import quantize_array

    x = rng.standard_normal(shape).astype(np.float32) * np.where(rng.random(shape) < 0.05, 30, 1)
    x.reshape(-1)[7] = np.nan
    x = jnp.asarray(x, jnp.bfloat16)
    cfg = QuantConfig(qtype, block, axis, zero_point).validated(x.ndim)
    ref = quantize_array(x, cfg)  # on CPU: the rows path
    codes, scale, zp = jax.jit(encode.quantize_in_place, static_argnames=("cfg", "block_size"))(
        x, cfg=cfg, block_size=block)
    np.testing.assert_array_equal(codes, ref.codes)
    np.testing.assert_array_equal(np.asarray(scale).view(np.uint32), np.asarray(ref.scale).view(np.uint32))
    if zero_point:
        np.testing.assert_array_equal(zp, ref.zero_point)
    else:
        assert zp is None


@pytest.mark.parametrize("qtype,zero_point", [("nf4", False), ("fp4", False), ("int4", False),
                                              ("int4", True), ("int8", True), ("dynamic8", False)])
def test_off_cpu_division_gives_the_cpu_bytes(qtype, zero_point, monkeypatch, rng):
    """Off the CPU the block reciprocals come from division.long_divide (XLA GPU's own float32
    division is within 2 ulp, and moved 40,722 FP4 codes of a 4096x14336 weight): it must give
    the CPU's bytes, on an input whose x / absmax often lands on a midpoint. Nudging the
    reciprocal by one ulp (what the GPU did) changes codes, so the input does probe the ties."""
    from jaxquant._src import division

    x = jnp.asarray(rng.standard_normal((256, 320)), jnp.bfloat16)  # bf16 ratios: simple fractions
    kw = dict(qtype=qtype, block_size=64, zero_point=zero_point, double_quant=not zero_point)
    leaves = lambda q: [np.asarray(v) for v in jax.tree.leaves(q)]
    want = [leaves(jq.quantize(x, axis=a, **kw)) for a in (None, 1)]
    for divide, same in [(division.exact_divide, True),
                         (lambda n, d: jnp.nextafter(division.exact_divide(n, d), np.float32(np.inf)), False)]:
        monkeypatch.setattr(division, "divide", divide)
        jax.clear_caches()
        got = [leaves(jq.quantize(x, axis=a, **kw)) for a in (None, 1)]
        equal = all(np.array_equal(g, w) for gs, ws in zip(got, want) for g, w in zip(gs, ws))
        if same or qtype in ("fp4", "int4", "int8"):  # NF4 / dynamic8 midpoints are rarely hit
            assert equal == same, (qtype, same)
    jax.clear_caches()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dequantize_into_writes_the_values_into_the_donated_buffer(dtype, rng):
    """Same values as dequantize, in the donated buffer's memory (no fresh allocation: that is
    what makes it 3x faster on the CPU), and the donated array is gone."""
    q = jq.quantize(jnp.asarray(rng.standard_normal((96, 130)), jnp.float32), "nf4", 64, axis=0,
                    double_quant=True)
    out = jnp.full((96, 130), 7.0, dtype)
    address = out.unsafe_buffer_pointer()
    got = jq.dequantize_into(q, out)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jq.dequantize(q, dtype)))
    assert got.dtype == dtype and got.unsafe_buffer_pointer() == address
    assert out.is_deleted()


def test_dequantize_into_rejects_a_wrong_buffer():
    q = jq.quantize(jnp.ones((64, 8)), "nf4")
    with pytest.raises(ValueError, match=r"shape \(8, 64\)"):
        jq.dequantize_into(q, jnp.zeros((8, 64)))
    with pytest.raises(TypeError, match="float"):
        jq.dequantize_into(q, jnp.zeros((64, 8), jnp.int32))
    with pytest.raises(TypeError, match="float"):
        jq.dequantize_into(q, np.zeros((64, 8), np.float32))


@pytest.mark.parametrize("qtype", ["dynamic8", "fp4", "nf4"])
def test_bit_cells_count_the_midpoints_below_like_the_search(qtype, rng):
    """The GPU's code search for dynamic8 (``encode.count_by_bit_cells``: one gather of the value's
    cell by its float bits, <= 4 compares) equals the CPU's binary search on values at and
    around every midpoint and every cell limit, random values over several decades, zeros,
    +-1, +-inf and NaN. (Subnormals are left out: XLA:CPU flushes them to zero.)"""
    from jaxquant._src import codebooks, encode

    qt = codebooks.get_qtype(qtype)
    mids = qt.midpoints
    shift, low, high, below, inside = qt.bit_cells
    starts = (np.arange(low, high + 2, dtype=np.int64) << shift).astype(np.uint32).view(np.float32)
    around = lambda v, k: (np.asarray(v, np.float32).view(np.int32)[:, None]
                           + np.arange(-k, k + 1)).astype(np.int32).view(np.float32).ravel()
    v = np.concatenate([
        around(mids, 3), around(np.concatenate([starts, -starts]), 2),
        rng.uniform(-1, 1, 20_000).astype(np.float32),
        (rng.standard_normal(20_000) * 10.0 ** rng.integers(-7, 1, 20_000)).astype(np.float32),
        np.array([0, -0.0, 1, -1, np.inf, -np.inf, np.nan, 2, -2], np.float32)])
    v = v[(np.abs(v) >= np.finfo(np.float32).tiny) | (v == 0) | np.isnan(v)]
    want = np.asarray(encode.count_by_search(jnp.asarray(v), qt))
    np.testing.assert_array_equal(np.asarray(encode.count_by_bit_cells(jnp.asarray(v), qt)), want)
    assert set(want[np.isnan(v)].tolist()) == {len(mids)}  # NaN counts above every midpoint
    assert inside.shape[1] <= 4 and below.max() <= len(mids)


@pytest.mark.parametrize("qtype", ["nf4", "fp4", "dynamic8"])
def test_a_partial_last_block_divides_as_bitsandbytes_does(qtype, rng):
    """bitsandbytes scales whole blocks by ``x * (1 / absmax)`` and the partial last block by
    ``x / absmax``: numpy's float32 ops written out are the reference. Values whose ratio to the
    absmax is a midpoint make the two roundings give other codes (checked, so the test can fail);
    XLA:CPU rewrote that division into the reciprocal, the GPU did not."""
    qt = codebooks.get_qtype(qtype)
    bf16 = lambda v: np.asarray(jnp.asarray(v, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))
    whole = bf16(rng.standard_normal((512, 64)))
    absmax = bf16(rng.uniform(0.5, 4, (512, 1)))  # each partial block: its absmax, then values
    on_midpoints = (rng.choice(qt.midpoints, (512, 35)) * absmax).astype(np.float32)  # ratio: a midpoint
    part = np.concatenate([absmax, on_midpoints], 1)
    x = np.concatenate([whole, part], 1)
    amax = lambda b: np.maximum(np.abs(b).max(1, keepdims=True), np.float32(np.finfo(np.float32).tiny))
    code = lambda s: qt.sorted_order[np.sum(np.clip(s, -1, 1)[..., None] > qt.midpoints, -1)]
    by_reciprocal = part * (np.float32(1) / amax(part))
    want = np.concatenate([code(whole * (np.float32(1) / amax(whole))), code(part / amax(part))], 1)
    assert (code(by_reciprocal) != want[:, 64:]).any()  # the input probes the difference
    got = jq.quantize(jnp.asarray(x), qtype, 64, axis=1)
    raw = np.asarray(got.codes)
    if qt.bits == 4:
        raw = np.stack([raw >> 4, raw & 0xF], -1).reshape(512, -1)[:, :100]
    np.testing.assert_array_equal(raw, want)
