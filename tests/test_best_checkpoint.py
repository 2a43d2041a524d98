"""best_checkpoint: the best validation's checkpoint kept through pruning, early stopping, and a resume of a
stopped run that stays stopped (BestValidation, CheckpointManager's ``best`` pointer, both recipes)."""

import json

import pytest
from documented_variants import recipe_and_config

from speechmapper_tune.checkpoint.projector_io import CheckpointManager, load_projector
from speechmapper_tune.models.projector import speechmapper_tiny
from speechmapper_tune.training import BestValidation


def test_best_value_counts_and_patience():
    best = BestValidation("val_token_acc", "max", patience=2)
    assert best.update(10, {"val_token_acc": 0.1}) and best.step == 10
    assert not best.update(20, {"val_token_acc": 0.1})  # equal is not better
    assert not best.should_stop(20)
    assert best.update(30, {"val_token_acc": 0.2}) and best.since == 0
    assert not best.update(40, {"val_token_acc": 0.15}) and not best.update(50, {"val_token_acc": 0.19})
    assert best.should_stop(50) and best.stopped_at == 50 and best.describe() == "val_token_acc 0.2 at step 30"
    again = BestValidation("val_token_acc", "max", patience=2)
    again.load_state_dict(best.state_dict())
    assert again.state_dict() == {"value": 0.2, "step": 30, "since": 2, "stopped_at": 50}
    low = BestValidation("val_loss", "min")
    assert (
        low.update(1, {"val_loss": 3.0}) and low.update(2, {"val_loss": 2.0}) and not low.update(3, {"val_loss": 2.5})
    )
    assert not low.should_stop(3)  # no patience: never stops


def test_save_or_stop_saves_when_due_on_a_new_best_and_at_the_stop():
    best, saved = BestValidation("val_token_acc", patience=2), []
    decide = [
        best.save_or_stop(step, best.update(step, {"val_token_acc": acc}), due, saved.append)
        for step, acc, due in ((1, 0.1, False), (2, 0.1, True), (3, 0.1, False))
    ]
    assert decide == [False, False, True] and saved == [True, False, False]  # best; due; the stop
    assert best.stopped_at == 3 and best.should_stop(4) and best.stopped_at == 3  # the first stop is kept


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"metric": "val_loss", "mode": "lowest"}, "mode='lowest': expected max or min"),
        ({"patience": 3}, "patience=3: needs best_checkpoint.metric"),
        ({"metric": "val_loss", "patience": 0}, "patience=0"),
    ],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BestValidation(**kwargs)


def test_settings_that_could_never_act_are_refused_and_an_unknown_metric_named():
    with pytest.raises(ValueError, match="needs validation data"):
        BestValidation("val_loss").check(False, 10)
    with pytest.raises(ValueError, match="patience=2 needs val_every_n_steps"):
        BestValidation("val_loss", patience=2).check(True, 0)
    with pytest.raises(KeyError, match="'val_acc' is not a validation figure: \\['val_loss'\\]"):
        BestValidation("val_acc").update(1, {"val_loss": 1.0})


def test_pruning_keeps_the_best_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    model = speechmapper_tiny()
    assert mgr.best() is None
    for step, best in ((10, True), (20, False), (30, False)):
        mgr.save(step, model, {"stage": 1}, {"step": step}, best=best)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert kept == ["step_10", "step_30"] and mgr.best().name == "step_10" and mgr.latest().name == "step_30"
    mgr.save(40, model, {"stage": 1}, {"step": 40}, best=True)  # a new best: the old one is pruned
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_40"]
    assert mgr.best() == mgr.latest()


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "recipe, config, cls",
    [("speechmapper_pretrain", "tiny/stage1", "PretrainRecipe"), ("speechmapper_adapt", "tiny/stage2", "AdaptRecipe")],
)
def test_a_run_stops_after_patience_keeps_its_best_and_stays_stopped_when_resumed(tmp_path, recipe, config, cls):
    """A figure that never changes (each validation's share of pad positions is the same data's): the first
    validation is the best, two more without a better one stop the run at step 6 of 10."""
    metric = "val_token_share_seen_0_9" if recipe == "speechmapper_pretrain" else "val_ce"
    overrides = {
        "output_dir": str(tmp_path),
        "max_steps": 10,
        "metric_loggers": [],
        "val_every_n_steps": 2,
        "save_every_n_steps": 0,
        "keep_last_n_checkpoints": 1,
        "validate_at_start": False,
        "best_checkpoint": {"metric": metric, "mode": "max", "patience": 2},
        "optimizer": {"lr": 0.0},  # nothing moves: every validation equals the first
    }
    module, cfg = recipe_and_config(recipe, config, overrides)
    run = getattr(module, cls)(cfg)
    run.setup()
    run.train()
    run.cleanup()
    vals = [r["step"] for r in _rows(tmp_path) if metric in r]
    assert vals == [2, 4, 6]
    mgr = CheckpointManager(tmp_path)
    assert mgr.best().name == "step_2" and mgr.latest().name == "step_6"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_2", "step_6"]
    assert load_projector(mgr.best())[1]["step"] == 2
    state = mgr.load_state(mgr.latest())["best"]
    assert state["step"] == 2 and state["since"] == 2 and state["stopped_at"] == 6
    module, cfg = recipe_and_config(recipe, config, {**overrides, "resume": True})
    run = getattr(module, cls)(cfg)
    run.setup()
    run.train()  # stays stopped: no step, no validation, no checkpoint
    run.cleanup()
    assert [r["step"] for r in _rows(tmp_path) if metric in r] == [2, 4, 6] and mgr.latest().name == "step_6"
