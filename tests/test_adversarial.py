"""Bad input never becomes a wrong number: it round-trips exactly, or raises a typed error naming it.

Checkpoints (key collisions, every dtype, header and data damage), bitsandbytes dicts, QArray
metadata, policies and the command line.
"""

import json
import os
import stat

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

import jaxquant as jq
from jaxquant import cli

# ---------------------------------------------------------------- checkpoints: names and dtypes


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return (a.dtype == b.dtype and a.shape == b.shape
            and np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)))


def assert_same_tree(a, b):
    la, ta = jax.tree_util.tree_flatten(a, is_leaf=lambda x: isinstance(x, jq.QArray))
    lb, tb = jax.tree_util.tree_flatten(b, is_leaf=lambda x: isinstance(x, jq.QArray))
    assert ta == tb
    for x, y in zip(la, lb):
        assert type(x) is type(y) or not isinstance(x, jq.QArray)
        for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
            assert same_bits(u, v)


@pytest.fixture
def q(rng):
    return jq.quantize(jnp.asarray(rng.standard_normal((64, 64)), jnp.float32), "nf4", 64, axis=0,
                       double_quant=True)


@pytest.mark.parametrize("make", [
    lambda x, q: {"a/b": x, "a": {"b": 2 * x}},                     # the path 'a/b' twice
    lambda x, q: {"a": q, "a::codes": x, "a::scale::offset": x + 1},  # a QArray field's tensor name
    lambda x, q: {"%2F": x, "/": 2 * x, "%": 3 * x, "": {"": 4 * x}, ":": {"::": q}},
    lambda x, q: {"ünï": {"tab\tnew\nline": x}, "a b": {"0": x, "1": q}},
    lambda x, q: x,                                                   # a bare leaf
    lambda x, q: {},
], ids=["slash", "colons", "escapes", "unicode", "bare", "empty"])
def test_every_key_round_trips_without_target(make, q, tmp_path, rng):
    tree = make(jnp.asarray(rng.standard_normal(5), jnp.float32), q)
    f = tmp_path / "t.safetensors"
    jq.save(f, tree)
    assert_same_tree(jq.load(f), tree)


def test_containers_round_trip_against_a_target(q, tmp_path, rng):
    x = jnp.asarray(rng.standard_normal(3), jnp.float32)
    tree = {"layers": [q, {"w": x}], "pair": (x, 2 * x)}
    f = tmp_path / "t.safetensors"
    jq.save(f, tree)
    assert_same_tree(jq.load(f, jax.eval_shape(lambda: tree)), tree)


def test_keys_that_print_alike_are_refused_before_writing(tmp_path):
    class Key:
        def __init__(self, i):
            self.i = i

        def __lt__(self, other):
            return self.i < other.i

        def __eq__(self, other):
            return self.i == other.i

        def __hash__(self):
            return self.i

        def __str__(self):
            return "k"

    with pytest.raises(ValueError, match="both read 'k'"):
        jq.save(tmp_path / "t.safetensors", {Key(1): np.ones(2), Key(2): np.zeros(2)})
    assert list(tmp_path.iterdir()) == []


JAX_DTYPES = ["bool", "int2", "int4", "int8", "int16", "int32", "int64", "uint2", "uint4", "uint8",
              "uint16", "uint32", "uint64", "float16", "bfloat16", "float32", "float64", "complex64",
              "complex128", "float4_e2m1fn", "float8_e3m4", "float8_e4m3", "float8_e4m3b11fnuz",
              "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu"]


def sample(dtype, rng, shape=(3, 5)) -> np.ndarray:
    if dtype == np.bool_:
        return rng.random(shape) > 0.5
    if jnp.issubdtype(dtype, jnp.integer):
        if dtype.name in ("int2", "int4", "uint2", "uint4"):
            info = ml_dtypes.iinfo(dtype)
            return rng.integers(int(info.min), int(info.max), shape, endpoint=True).astype(dtype)
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    return (4 * rng.standard_normal(shape)).astype(dtype)


@pytest.mark.parametrize("name", JAX_DTYPES)
def test_every_dtype_round_trips_bit_exact(name, tmp_path, rng):
    dtype = np.dtype(jnp.dtype(name))
    x = sample(dtype, rng)
    # never narrowed: only a dtype JAX holds at this precision comes back as a JAX array
    wide = jax.dtypes.canonicalize_dtype(dtype) != dtype
    tree = {"x": x, "scalar": x[0, 0]} | ({} if wide else {"jax": jnp.asarray(x)})
    f = tmp_path / "t.safetensors"
    jq.save(f, tree)
    back = jq.load(f)
    assert back.keys() == tree.keys() and all(same_bits(back[k], tree[k]) for k in tree)
    assert isinstance(back["x"], np.ndarray if wide else jax.Array)


def test_qarray_of_a_narrow_dtype_round_trips(tmp_path, rng):
    x = jnp.asarray(rng.standard_normal((32, 64)), jnp.bfloat16)
    tree = {"bf16": jq.quantize(x), "f16": jq.quantize(x.astype(jnp.float16), "int8", 32, axis=1)}
    jq.save(tmp_path / "t.safetensors", tree)
    assert_same_tree(jq.load(tmp_path / "t.safetensors"), tree)


@pytest.mark.parametrize("bad", [
    {"s": np.array(["text"])},
    {"o": np.array([object()], dtype=object)},
    {"key": jax.random.key(0)},
    {"q": "QARRAY"},
])
def test_refused_leaves_leave_the_existing_file_untouched(bad, q, tmp_path):
    f = tmp_path / "t.safetensors"
    jq.save(f, {"w": q})
    before = f.read_bytes()
    if bad == {"q": "QARRAY"}:
        bad = {"q": jq.QArray(q.codes, q.scale, shape=q.shape, dtype=q.dtype, qtype="int8",
                              block_size=q.block_size, axis=q.axis)}
    with pytest.raises((TypeError, ValueError)):
        jq.save(f, bad)
    assert f.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


def test_file_mode_is_what_open_gives(tmp_path):
    old = os.umask(0o027)
    try:
        f = tmp_path / "new.safetensors"
        jq.save(f, {"x": np.ones(2)})
        assert stat.S_IMODE(f.stat().st_mode) == 0o640
        g = tmp_path / "kept.safetensors"
        g.write_bytes(b"")
        g.chmod(0o604)
        jq.save(g, {"x": np.ones(2)})
        assert stat.S_IMODE(g.stat().st_mode) == 0o604  # a replaced file keeps its mode
    finally:
        os.umask(old)


# ---------------------------------------------------------------- checkpoints: damage


@pytest.fixture
def saved(q, tmp_path, rng):
    f = tmp_path / "t.safetensors"
    jq.save(f, {"w": q, "b": jnp.asarray(rng.standard_normal(16), jnp.bfloat16)})
    return f, f.read_bytes()


def header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def test_every_header_bit_flip_is_a_checkpoint_error(saved):
    f, data = saved
    end = header_end(data)
    undetected = []
    for offset in range(end):  # one flip per byte, the bit rotating: 8 length bytes + the JSON
        bad = bytearray(data)
        bad[offset] ^= 1 << (offset % 8)
        f.write_bytes(bytes(bad))
        try:
            jq.load(f)
            undetected.append(offset)
        except jq.CheckpointError:
            pass
    assert end > 500 and undetected == []


def test_data_bit_flips_fail_the_checksum(saved):
    f, data = saved
    end = header_end(data)
    for offset in np.linspace(end, len(data) - 1, 40).astype(int):
        bad = bytearray(data)
        bad[offset] ^= 1 << (offset % 8)
        f.write_bytes(bytes(bad))
        with pytest.raises(jq.CheckpointError, match="checksum mismatch"):
            jq.load(f)


def test_truncation_at_any_length_is_a_checkpoint_error(saved):
    f, data = saved
    end = header_end(data)
    for n in sorted({0, 1, 7, 8, 9, end // 2, end - 1, end, end + 1, (end + len(data)) // 2, len(data) - 1}):
        f.write_bytes(data[:n])
        with pytest.raises(jq.CheckpointError, match=str(f)):
            jq.load(f)
    f.write_bytes(data + b"\0")  # a trailing byte is as wrong as a missing one
    with pytest.raises(jq.CheckpointError):
        jq.load(f)


def test_unreadable_paths(tmp_path):
    for path in (tmp_path, tmp_path / "missing.safetensors"):
        with pytest.raises(jq.CheckpointError, match="not a readable safetensors file"):
            jq.load(path)


def write_crafted(f, layout, tensors, fmt="jaxquant.tree/1", **extra):
    """A file with a hand-made header (format 1 has no checksum, so the layout checks are reached)."""
    meta = {"format": fmt, **extra}
    if layout is not None:
        meta["layout"] = layout if isinstance(layout, str) else json.dumps(layout)
    safetensors.numpy.save_file(tensors, f, metadata=meta)


@pytest.mark.parametrize("fmt,layout,match", [
    ("jaxquant.tree/2", {"x": "array"}, "checksum mismatch"),           # no checksum in a v2 file
    ("jaxquant.tree/9", {"x": "array"}, "not a jaxquant tree"),
    ("jaxquant.tree/1", None, "not JSON"),
    ("jaxquant.tree/1", "{not json", "not JSON"),
    ("jaxquant.tree/1", [1, 2], "not a JSON object"),
    ("jaxquant.tree/1", {"x": "array", "y": "array"}, "'y' is missing"),
    ("jaxquant.tree/1", {"x": 7}, "layout entry of 'x' is malformed"),
    ("jaxquant.tree/1", {"x": {"raw": "float99"}}, "layout entry of 'x' is malformed"),
    ("jaxquant.tree/1", {"x": {"raw": "float64"}}, "not the raw bytes of float64"),
    ("jaxquant.tree/1", {"x": {"shape": [4], "dtype": "float32"}}, "malformed|missing"),
    ("jaxquant.tree/1", {"x": {"shape": "ab", "dtype": "float32", "qtype": "nf4", "block_size": 4,
                               "axis": None, "zero_point": False, "offset": False}}, "malformed|missing"),
    ("jaxquant.tree/1", {"x": "array", "x/y": "array"}, "under a leaf"),
])
def test_foreign_and_crafted_headers(fmt, layout, match, tmp_path):
    f = tmp_path / "t.safetensors"
    write_crafted(f, layout, {"x": np.ones(3, np.float32), "x/y": np.ones(1, np.float32)}, fmt)
    with pytest.raises(jq.CheckpointError, match=match):
        jq.load(f)


def test_crafted_qarray_metadata_is_a_checkpoint_error(q, tmp_path):
    f = tmp_path / "t.safetensors"
    jq.save(f, {"w": q})
    with safetensors.safe_open(str(f), framework="numpy") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
        layout = json.loads(h.metadata()["layout"])
    for field, value in [("block_size", 0), ("block_size", 32), ("shape", [-64, -64]), ("axis", 5),
                         ("qtype", "nf5"), ("dtype", "int8"), ("block_size", "64"), ("shape", None)]:
        write_crafted(f, {"w": layout["w"] | {field: value}}, tensors)
        with pytest.raises(jq.CheckpointError, match="'w'"):
            jq.load(f)


# ---------------------------------------------------------------- bitsandbytes dicts


@pytest.fixture
def bnb(rng):
    return jq.to_bnb(jq.quantize(jnp.asarray(rng.standard_normal((64, 128)), jnp.bfloat16), "nf4", 64,
                                 double_quant=True))


def with_state(d, **change):
    key = "weight.quant_state.bitsandbytes__nf4"
    state = json.loads(d[key].tobytes()) | change
    return dict(d, **{key: np.frombuffer(json.dumps(state).encode(), np.uint8)})


@pytest.mark.parametrize("change", [
    dict(blocksize=0), dict(blocksize=-64), dict(blocksize=64.0), dict(blocksize="64"), dict(blocksize=True),
    dict(nested_blocksize=0), dict(nested_blocksize=256.5), dict(shape="abc"), dict(shape=[-64, -128]),
    dict(shape=[64.0, 128]), dict(shape=[True, 8192]), dict(shape=None), dict(shape=[2**40, 2**40]),
    dict(nested_offset=float("nan")), dict(nested_offset="0.1"), dict(nested_dtype="float16"),
    dict(dtype="float64"), dict(quant_type=["nf4"]),
])
def test_malformed_quant_state_is_a_value_error(bnb, change):
    with pytest.raises(ValueError, match="from_bnb"):
        jq.from_bnb(with_state(bnb, **change))


def test_from_bnb_refuses_what_is_not_a_dict(bnb):
    with pytest.raises(TypeError, match="dict of arrays"):
        jq.from_bnb(list(bnb.items()))
    with pytest.raises(ValueError, match="expected one key"):
        jq.from_bnb({0: np.zeros(1), **{k: v for k, v in bnb.items() if "quant_state" not in k}})


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_to_bnb_dtype_names_are_read_back(dtype, rng):
    x = jnp.asarray(rng.standard_normal((8, 64)), dtype)
    back = jq.from_bnb(jq.to_bnb(jq.quantize(x, "fp4", 64)))
    assert np.dtype(back.dtype) == np.dtype(jnp.dtype(dtype))


def test_to_bnb_refuses_dtypes_from_bnb_cannot_read(rng):
    q = jq.quantize(jnp.asarray(rng.standard_normal((8, 64)), jnp.float32), "nf4", 64)
    for dtype in (np.float64, jnp.float8_e4m3fn):
        odd = jq.QArray(q.codes, q.scale, shape=q.shape, dtype=np.dtype(dtype), qtype="nf4",
                        block_size=64, axis=None)
        with pytest.raises(TypeError, match="to_bnb"):
            jq.to_bnb(odd)


# ---------------------------------------------------------------- validate


def test_validate_catches_what_shapes_can_show(q):
    replace = lambda **kw: jq.QArray(**{**q.__dict__, **kw})
    nested = q.scale
    for bad in (dict(block_size=32), dict(block_size=0), dict(block_size=64.0), dict(shape=(-64, -64)),
                dict(shape=(64.0, 64)), dict(axis=2), dict(axis=True), dict(dtype=np.dtype(np.int8)),
                dict(dtype="not a dtype"), dict(scale=None), dict(codes=None), dict(zero_point=[1]),
                dict(qtype="int8"),
                dict(scale=jq.QArray(**{**nested.__dict__, "qtype": "int8"})),
                dict(scale=jq.QArray(**{**nested.__dict__, "offset": None}))):
        with pytest.raises(ValueError, match="inconsistent QArray"):
            jq.validate(replace(**bad))
    assert jq.validate(replace(block_size=np.int64(64))).block_size == 64  # as quantize accepts


# ---------------------------------------------------------------- policies and reports


def test_policy_misuse_is_a_typed_error(rng):
    with pytest.raises(ValueError, match="not a valid regular expression"):
        jq.Rule("(kernel")
    with pytest.raises(TypeError, match="rules=\\(Rule"):
        jq.Policy(rules=jq.Rule("kernel"))
    with pytest.raises(TypeError, match="must be Rule objects"):
        jq.Policy(rules=({"pattern": "kernel"},))
    with pytest.raises(ValueError, match="min_size"):
        jq.Policy(min_size=-1)
    assert jq.Policy(rules=[jq.Rule("kernel")]).rules == (jq.Rule("kernel"),)


def test_memory_report_on_mismatched_trees(rng):
    params = {"a": {"kernel": jnp.asarray(rng.standard_normal((64, 64)), jnp.float32)}}
    qparams = jq.quantize_tree(params, jq.Policy(min_size=1))
    with pytest.raises(ValueError, match="same paths.*'b/kernel'"):
        jq.memory_report({"b": params["a"]}, qparams)
    with pytest.raises(ValueError, match="shape"):
        jq.memory_report({"a": {"kernel": jnp.zeros((64, 32))}}, qparams)


# ---------------------------------------------------------------- command line


def run_cli(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["--gen-tokens", "0"], "--gen-tokens: expected an integer >= 1"),
    (["--gen-tokens", "-1"], "--gen-tokens: expected an integer >= 1"),
    (["--layers", "0"], "--layers: expected an integer >= 1"),
    (["--layers", "-3"], "--layers: expected an integer >= 1"),
    (["--layers", "two"], "--layers: expected an integer >= 1, got 'two'"),
    (["--max-tokens", "1"], "--max-tokens: expected an integer >= 2"),
    (["--compare-dtypes", ",,,"], "names no data type"),
    (["--report", "/no/such/folder/r.json"], "does not exist"),
    (["--report", "."], "is a folder"),
    (["--no-such-option"], "unrecognized arguments"),
])
def test_bad_arguments_one_line_exit_2(argv, match, capsys):
    code, err = run_cli(argv, capsys)
    assert code == 2 and match in err and err.count("\n") == 1, err


@pytest.mark.parametrize("rules,match", [
    ('[{"pattern": "(kernel"}]', "not a valid regular expression"),
    ('[]', "quantizes nothing"),
    ('[{"pattern": "kernel", "qtype": null}]', "quantizes nothing"),
    ('{"pattern": "kernel"}', "must be a JSON list of rules"),
    ('[{"pattern": 5}]', "must be a JSON list of rules"),
])
def test_bad_policy_files_one_line_exit_2(rules, match, tmp_path, capsys):
    policy = tmp_path / "p.json"
    policy.write_text(rules)
    code, err = run_cli(["--policy", str(policy)], capsys)
    assert code == 2 and match in err and err.count("\n") == 1, err
