"""`tune run speechmapper_adapt` with SpeechLLM's recipe: the light adapter + the classifier regularizer."""

import json

import pytest
from documented_variants import variant_args

from speechmapper_tune.checkpoint.projector_io import load_projector
from speechmapper_tune.models.light_adapter import LightAdapter

pytestmark = pytest.mark.e2e


def metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_light_adapter_with_regularizer_trains_in_stage_2(tmp_path, tune):
    out = tmp_path / "s2"
    tune(
        [
            "run",
            "speechmapper_adapt",
            *variant_args("tiny/stage2_light"),
            f"output_dir={out}",
            "max_steps=16",
            "log_every_n_steps=4",
            "val_every_n_steps=16",
            "save_every_n_steps=16",
            "validate_at_start=True",
        ],
        cwd=tmp_path,
    )
    rows = [r for r in metrics(out) if "loss" in r]
    assert all("regularizer" in r for r in rows)
    assert rows[-1]["regularizer"] < rows[0]["regularizer"] and rows[-1]["loss"] < rows[0]["loss"]
    val = [r for r in metrics(out) if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 16] and val[-1]["val_regularizer"] < val[0]["val_regularizer"]
    model, meta = load_projector(out / "checkpoints" / "step_16")
    assert isinstance(model, LightAdapter) and meta["projector"]["kind"] == "light" and meta["stage"] == 2


def test_regularizer_off_logs_no_regularizer(tmp_path, tune):
    out = tmp_path / "off"
    tune(
        [
            "run",
            "speechmapper_adapt",
            *variant_args("tiny/stage2_light"),
            f"output_dir={out}",
            "max_steps=2",
            "log_every_n_steps=1",
            "val_every_n_steps=0",
            "save_every_n_steps=0",
            "loss.regularizer_weight=0",
        ],
        cwd=tmp_path,
    )
    assert not any("regularizer" in r for r in metrics(out))
