"""Hugging Face checkpoints in and out (jaxquant.models.hf), against files transformers wrote.

tests/data/hf_tiny/ was written by scripts/make_hf_fixtures.py with transformers 5.17 and
bitsandbytes 0.50.2 (meta.json says on which device): a tiny LlamaForCausalLM in bf16 (sharded),
NF4 + double quant, FP4 and LLM.int8, each with transformers' logits on fixed tokens and the
sha256 of bitsandbytes' own dequantization of every quantized weight. No torch needed here.
"""

import hashlib
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

import jaxquant as jq
from jaxquant.models import hf

DATA = pathlib.Path(__file__).parent / "data" / "hf_tiny"
TOLERANCE = {"float": 2e-2, "nf4_dq": 3e-2, "fp4": 3e-2, "int8": 3e-2}  # relative, bf16 compute


@pytest.fixture(scope="module")
def loaded():
    return {v: hf.load(DATA / v) for v in TOLERANCE}


def logits_of(model, params, tokens):
    return np.asarray(jq.flax.apply(model, params, jnp.asarray(tokens)))


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def linear(params, module: str):
    _, _, i, parent, leaf = module.split(".")
    return params["params"][f"layers_{i}"][parent][leaf]["kernel"]


def tensors(folder) -> dict:
    out = {}
    for f in sorted(pathlib.Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "numpy") as h:
            out |= {k: h.get_tensor(k) for k in h.keys()}
    return out


@pytest.mark.parametrize("variant", list(TOLERANCE))
def test_logits_match_transformers(loaded, variant):
    model, params = loaded[variant]
    ref = np.load(DATA / variant / "reference.npz")
    got = logits_of(model, params, ref["tokens"])
    assert got.shape == ref["logits"].shape == (2, 8, 256)
    assert rel(got, ref["logits"]) < TOLERANCE[variant]
    assert (got.argmax(-1) == ref["logits"].argmax(-1)).mean() >= 0.85


@pytest.mark.parametrize("variant,qtype", [("nf4_dq", "nf4"), ("fp4", "fp4")])
def test_4bit_weights_dequantize_exactly_to_bitsandbytes(loaded, variant, qtype):
    _, params = loaded[variant]
    ref = np.load(DATA / variant / "reference.npz")
    names = [k.removeprefix("sha256/") for k in ref.files if k.startswith("sha256/")]
    assert len(names) == 14
    for name in names:
        q = linear(params, name)
        assert isinstance(q, jq.QArray) and (q.qtype, q.axis, q.block_size) == (qtype, 0, 64)
        assert q.double_quant == (variant == "nf4_dq")
        w = np.ascontiguousarray(np.asarray(jq.dequantize(q, jnp.float32)).T) + np.float32(0)
        assert hashlib.sha256(w.tobytes()).hexdigest() == str(ref[f"sha256/{name}"]), name
    full = [k for k in ref.files if k.startswith("dequant/")][0]
    w = np.asarray(jq.dequantize(linear(params, full.removeprefix("dequant/")), jnp.float32)).T
    np.testing.assert_array_equal(w, ref[full])


def test_int8_weights_against_bitsandbytes(loaded):
    """bitsandbytes computes float32((weight * SCB) * float32(1/127)); jaxquant weight * float32(SCB /
    127): the same bf16 weights, the float32 ones within one ulp."""
    _, params = loaded["int8"]
    ref = np.load(DATA / "int8" / "reference.npz")
    raw = tensors(DATA / "int8")
    for key in [k.removeprefix("sha256/") for k in ref.files if k.startswith("sha256/")]:
        w8, scb = raw[f"{key}.weight"].astype(np.float32), raw[f"{key}.SCB"][:, None]
        theirs = (w8 * scb) * np.float32(1 / 127) + np.float32(0)
        assert hashlib.sha256(theirs.tobytes()).hexdigest() == str(ref[f"sha256/{key}"]), key
        q = linear(params, key)
        assert (q.qtype, q.axis, q.block_size, q.shape) == ("int8", 0, w8.shape[1], w8.shape[::-1])
        ours = np.asarray(jq.dequantize(q, jnp.float32)).T
        ulps = np.abs(ours.view(np.int32) - theirs.view(np.int32))
        assert ulps.max() <= 1, key
        np.testing.assert_array_equal(np.asarray(jq.dequantize(q, jnp.bfloat16)).T,
                                      theirs.astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("variant", list(TOLERANCE))
def test_save_then_load_same_bytes_and_logits(loaded, variant, tmp_path):
    model, params = loaded[variant]
    hf.save(tmp_path, model, params, max_shard_size=300_000)
    a, b = tensors(DATA / variant), tensors(tmp_path)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k
    mine = json.loads((DATA / variant / "config.json").read_text())
    theirs = json.loads((tmp_path / "config.json").read_text())
    assert theirs.get("quantization_config") == mine.get("quantization_config")
    for key in ("rope_parameters", "head_dim", "rms_norm_eps", "tie_word_embeddings", "num_key_value_heads"):
        assert theirs[key] == mine[key], key
    tokens = np.load(DATA / variant / "reference.npz")["tokens"]
    np.testing.assert_array_equal(logits_of(*hf.load(tmp_path), tokens), logits_of(model, params, tokens))
    if variant == "float":  # 722 kB of bf16 in 300 kB shards, as transformers sharded it
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == 3 and not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("variant,rule", [("fp4", jq.Rule("kernel$", "fp4", 64, 0, False)),
                                          ("nf4_dq", jq.Rule("kernel$", "nf4", 64, 0, True))])
def test_policy_on_load_quantizes_as_bitsandbytes_did(loaded, variant, rule):
    """The float checkpoint quantized on load by a policy against bitsandbytes' quantization of
    the same weights (which transformers did on the CPU, meta.json): the same bytes, except the
    nested 8-bit codes, where bitsandbytes' CPU build takes a coarse table lookup instead of the
    nearest code (REFERENCE.md) in a few of the 3584 constants."""
    if json.loads((DATA / "meta.json").read_text())["device"] != "cpu":
        pytest.skip("bitsandbytes' CUDA FP4 thresholds differ from its CPU ones (REFERENCE.md)")
    _, ours = hf.load(DATA / "float", policy=jq.Policy((jq.Rule("lm_head", None), rule), min_size=0))
    _, theirs = loaded[variant]
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    differ = 0
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ours)[0], jax.tree.leaves(theirs)):
        a, b = np.asarray(a), np.asarray(b)
        if jax.tree_util.keystr(path).endswith(".scale.codes"):
            differ += int((a != b).sum())
        else:
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert differ <= (10 if rule.double_quant else 0)


def test_policy_quantizing_everything_saves_no_skip_list(tmp_path):
    model, qparams = hf.load(DATA / "float", policy=jq.Policy(min_size=0))
    kernels = [x for x in jax.tree.leaves(qparams, is_leaf=lambda x: isinstance(x, jq.QArray))
               if isinstance(x, jq.QArray)]
    assert len(kernels) == 15  # 14 block linears and the LM head
    hf.save(tmp_path, model, qparams)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["llm_int8_skip_modules"] == [] and config["bnb_4bit_use_double_quant"] is True
    assert "lm_head.weight.quant_state.bitsandbytes__nf4" in tensors(tmp_path)


def test_tied_head_and_v4_config(loaded, tmp_path):
    config = json.loads((DATA / "float" / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config |= {"rope_theta": rope["rope_theta"], "torch_dtype": config.pop("dtype"), "tie_word_embeddings": True}
    shutil.copytree(DATA / "float", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    model, params = hf.load(tmp_path / "ckpt", dtype=jnp.float32)  # lm_head.weight is ignored
    assert model.config.tie_embeddings and "lm_head" not in params["params"]
    assert params["params"]["embed_tokens"]["embedding"].dtype == jnp.float32
    hf.save(tmp_path / "out", model, params)
    assert "lm_head.weight" not in tensors(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True


def broken(tmp_path, variant="float"):
    folder = tmp_path / variant
    shutil.copytree(DATA / variant, folder)
    return folder


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text()) | changes
    (folder / "config.json").write_text(json.dumps(config))


def test_bad_input_errors_name_file_and_key(tmp_path):
    folder = broken(tmp_path)
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(jq.CheckpointError, match="model-00002-of-00003.safetensors: missing"):
        hf.load(folder)

    folder = broken(tmp_path / "a", "nf4_dq")
    raw = tensors(folder)
    del raw["model.layers.1.mlp.up_proj.weight.absmax"]
    from safetensors.numpy import save_file
    save_file(raw, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(jq.CheckpointError, match=r"model\.safetensors: model\.layers\.1\.mlp\.up_proj.*absmax"):
        hf.load(folder)

    folder = broken(tmp_path / "b", "fp4")
    edit_config(folder, intermediate_size=320)
    with pytest.raises(jq.CheckpointError, match=r"model\.safetensors.*gate_proj.weight.*\[256, 128\].*\[320, 128\]"):
        hf.load(folder)

    folder = broken(tmp_path / "c", "int8")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(jq.CheckpointError, match="model.safetensors: not a readable safetensors file"):
        hf.load(folder)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(jq.CheckpointError, match="model.safetensors: not a readable safetensors file"):
        hf.load(folder)

    folder = broken(tmp_path / "d")
    edit_config(folder, hidden_size=64)
    with pytest.raises(jq.CheckpointError, match="model.embed_tokens.weight.*config.json needs"):
        hf.load(folder)


def test_unsupported_models_and_methods(tmp_path):
    folder = broken(tmp_path, "nf4_dq")
    edit_config(folder, quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(NotImplementedError, match="quant_method='gptq'"):
        hf.load(folder)
    edit_config(folder, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(NotImplementedError, match="'MistralForCausalLM'.*supported: LlamaForCausalLM"):
        hf.load(folder)
    edit_config(folder, architectures=["LlamaForCausalLM"],
                rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0})
    with pytest.raises(NotImplementedError, match="rope_type='llama3'"):
        hf.load(folder)
    model, params = hf.load(DATA / "float")
    qparams = jq.quantize_tree(params, jq.Policy((jq.Rule("kernel$", "int4"),), min_size=0))
    with pytest.raises(NotImplementedError, match="int4"):
        hf.save(tmp_path / "out", model, qparams)
    assert not (tmp_path / "out" / "config.json").exists()


def test_cli_hf(tmp_path, capsys):
    """``python -m jaxquant --hf PATH``: a float checkpoint is quantized by the policy, a 4-bit one
    used as stored (its dequantization is the float reference); bad input exits 2 naming it."""
    from jaxquant import cli
    args = cli.build_parser().parse_args(["--hf", str(DATA / "float"), "--no-progress"])
    is_q = lambda x: isinstance(x, jq.QArray)
    name, config, tok, params, qparams = cli._load_hf(args, cli._policy(args))
    assert config.layers == 2 and not config.tie_embeddings and tok.encode("ab").ids == [97, 98]
    assert not any(map(is_q, jax.tree.leaves(params, is_leaf=is_q)))
    assert sum(map(is_q, jax.tree.leaves(qparams, is_leaf=is_q))) == 15
    args.hf = str(DATA / "fp4")
    _, _, _, params, qparams = cli._load_hf(args, cli._policy(args))
    kernel = qparams["params"]["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert kernel.qtype == "fp4" and params["params"]["layers_1"]["mlp"]["down_proj"]["kernel"].dtype == jnp.bfloat16
    assert cli.main(["--hf", str(tmp_path), "--no-progress"]) == 2
    assert f"{tmp_path}/config.json: missing" in capsys.readouterr().err
