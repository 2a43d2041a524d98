"""`tune run speechmapper_pretrain` with the levers beyond the paper: written-form targets and CTC."""

import json

import pytest

pytestmark = pytest.mark.e2e


def test_written_targets_and_ctc_train_and_log(tmp_path, tune):
    out = tmp_path / "run"
    proc = tune(["run", "speechmapper_pretrain", "--config", "tiny/stage1", f"output_dir={out}", "max_steps=6",
                 "log_every_n_steps=2", "val_every_n_steps=0", "data.target_text=written", "loss.ctc_weight=0.5"],
                cwd=tmp_path)
    assert "train: written-form targets" in proc.stderr + proc.stdout
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert train and all(r["ctc"] > 0 and r["objective"] > r["loss"] for r in train)
    assert any("val_ctc" in r for r in rows)


def test_a_bad_target_text_stops_at_setup(tmp_path, tune):
    proc = tune(["run", "speechmapper_pretrain", "--config", "tiny/stage1", f"output_dir={tmp_path / 'run'}",
                 "max_steps=2", "data.target_text=cased"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "data.target_text='cased'" in proc.stderr
