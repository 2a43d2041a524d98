"""A user's mistake in a recipe's settings: named before anything loads, the message first and alone."""

from __future__ import annotations

import importlib

import pytest
from omegaconf import OmegaConf

from speechmapper_tune.config_schema import check_settings
from speechmapper_tune.configs import resolve_config
from speechmapper_tune.errors import DEBUG_ENV, run_recipe


def check_recipe_config(cfg, recipe):
    """The check ``recipe`` runs first: its config against the schema declared in the recipe file."""
    check_settings(cfg, importlib.import_module(recipe).SCHEMA, recipe)


@pytest.mark.parametrize(
    "config, recipe",
    [
        ("tiny/stage2", "speechmapper_adapt"),
        ("smollm2_135M/stage2_asr_full", "speechmapper_adapt"),
        ("smollm2_135M/stage1", "speechmapper_pretrain"),
    ],
)
def test_wrongly_typed_settings_are_named(config, recipe):
    cfg = OmegaConf.load(resolve_config(config))
    check_recipe_config(cfg, recipe)  # as shipped: no complaint
    cfg.optimizer.lr = "fast"
    cfg.optimizer.amsgrad = "yes"  # a bool keyword
    with pytest.raises(ValueError) as e:
        check_recipe_config(cfg, recipe)
    message = str(e.value)
    assert "optimizer.lr='fast' must be a number (torch.optim.AdamW's default is 0.001)" in message
    assert "optimizer.amsgrad='yes' must be true or false (torch.optim.AdamW's default is False)" in message


def test_numbers_outside_components_and_interpolations():
    cfg = OmegaConf.load(resolve_config("tiny/stage2"))
    cfg.clip_grad_norm = "big"
    cfg.optimizer.lr = "${oc.env:NO_SUCH_VARIABLE,1e-3}"  # an interpolation is checked where it is used
    cfg.optimizer.weight_decay = 0  # an int where the default is a float: a number all the same
    with pytest.raises(ValueError, match=r"^speechmapper_adapt: clip_grad_norm='big' must be a number$"):
        check_recipe_config(cfg, "speechmapper_adapt")


def test_generation_numbers_are_named():
    cfg = OmegaConf.load(resolve_config("smollm2_135M/generate"))
    check_recipe_config(cfg, "speechmapper_generate")
    cfg.length_cap = {"tokens_per_second": "many", "extra": 8}
    with pytest.raises(ValueError, match=r"length_cap.tokens_per_second='many' must be a number$"):
        check_recipe_config(cfg, "speechmapper_generate")


def _fails():
    raise ValueError("speechmapper_adapt: data.train.manifest: /nowhere/cuts.jsonl.gz does not exist")


def test_run_recipe_prints_the_message_first_and_the_traceback_only_when_asked(capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert run_recipe("speechmapper_adapt", lambda: None, _fails) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "speechmapper_adapt: data.train.manifest: /nowhere/cuts.jsonl.gz does not exist",
        f"speechmapper_adapt: (ValueError; set {DEBUG_ENV}=1 for the traceback)",
    ]
    monkeypatch.setenv(DEBUG_ENV, "1")
    assert run_recipe("speechmapper_adapt", _fails) == 1
    lines = capsys.readouterr().err.splitlines()
    assert (
        lines[0].startswith("speechmapper_adapt: data.train.manifest")
        and lines[1] == "Traceback (most recent call last):"
    )
    assert run_recipe("speechmapper_eval", lambda: open("/nowhere/x.jsonl")) == 1  # a message without the recipe's name
    assert capsys.readouterr().err.startswith(
        "speechmapper_eval: error: [Errno 2] No such file or directory: '/nowhere/x.jsonl'"
    )
    assert run_recipe("speechmapper_adapt", lambda: 0) == 0


def test_a_wrongly_typed_value_stops_tune_run_before_data_or_model(tmp_path, tune):
    out = tmp_path / "run"
    proc = tune(
        ["run", "speechmapper_adapt", "--config", "tiny/stage2", f"output_dir={out}", "optimizer.lr=fast"],
        cwd=tmp_path,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-2] == (
        "speechmapper_adapt: optimizer.lr='fast' must be a number (torch.optim.AdamW's default is 0.001)"
    ), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (out / "checkpoints").exists()


def test_an_unreadable_audio_reason_keeps_its_details(tmp_path):
    from lhotse.audio.backend import read_audio

    from speechmapper_tune.errors import error_summary

    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    with pytest.raises(Exception) as e:
        read_audio(str(bad))
    assert str(e.value).splitlines()[0].endswith("Details:")  # lhotse puts the details on the next lines
    summary = error_summary(e.value)
    assert "\n" not in summary and "failed. Details: Exception #0" in summary  # the details follow on the same line
    assert len(error_summary(e.value, 120)) == 120
