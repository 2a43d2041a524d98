"""`tune run speechmapper_pretrain` with the levers beyond the paper: written-form targets and CTC."""

import json
import shutil

import pytest

pytestmark = pytest.mark.e2e


def test_written_targets_and_ctc_train_and_log(tmp_path, tune):
    out = tmp_path / "run"
    proc = tune(
        [
            "run",
            "speechmapper_pretrain",
            "--config",
            "tiny/stage1",
            f"output_dir={out}",
            "max_steps=6",
            "log_every_n_steps=2",
            "val_every_n_steps=0",
            "data.target_text=written",
            "loss.ctc_weight=0.5",
        ],
        cwd=tmp_path,
    )
    assert "train: written-form targets" in proc.stderr + proc.stdout
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    assert train and all(r["ctc"] > 0 and r["objective"] > r["loss"] for r in train)
    assert any("val_ctc" in r for r in rows)


def test_a_bad_target_text_stops_at_setup(tmp_path, tune):
    proc = tune(
        [
            "run",
            "speechmapper_pretrain",
            "--config",
            "tiny/stage1",
            f"output_dir={tmp_path / 'run'}",
            "max_steps=2",
            "data.target_text=cased",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0 and "data.target_text='cased'" in proc.stderr


def test_sampled_classifier_resumes_exactly_and_validation_splits_accuracy_by_training_count(tmp_path, tune):
    common = [
        "run",
        "speechmapper_pretrain",
        "--config",
        "tiny/stage1",
        "lr_scheduler.num_training_steps=8",
        "log_every_n_steps=2",
        "val_every_n_steps=4",
        "save_every_n_steps=4",
        "loss.classifier_weight=1",
        "loss.classifier_negatives=8",
        "loss.classifier_neighbours=2",
        "loss.ctc_weight=0.5",
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    tune([*common, f"output_dir={full}", "max_steps=8"], cwd=tmp_path)
    shutil.copytree(full / "data", part / "data")
    tune([*common, f"output_dir={part}", "max_steps=4"], cwd=tmp_path)
    tune([*common, f"output_dir={part}", "max_steps=8", "resume=True"], cwd=tmp_path)
    a, b = (
        [
            {k: v for k, v in json.loads(l).items() if k != "vectors_per_second"}
            for l in (o / "metrics.jsonl").read_text().splitlines()
        ]
        for o in (full, part)
    )
    assert a == b  # the candidate draws come from the checkpointed RNG: the same rows after a resume
    train, val = [r for r in a if "loss" in r], [r for r in a if "val_loss" in r]
    assert all(r["classifier_ce"] > 0 and r["ctc"] > 0 for r in train)
    shares = [k for k in val[-1] if k.startswith("val_token_share_seen_")]
    assert len(shares) == 4 and sum(val[-1][k] for k in shares) == pytest.approx(1.0)
    # the buckets recombine to the overall accuracy (which weights batches by output vectors, not by
    # word tokens: equal up to that weighting)
    seen = [k for k in val[-1] if k.startswith("val_token_acc_seen_")]
    hits = sum(val[-1][k] * val[-1][k.replace("_acc_", "_share_")] for k in seen)
    assert hits == pytest.approx(val[-1]["val_token_acc"], abs=0.01)
