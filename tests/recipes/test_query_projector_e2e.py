"""`tune run` stage 1 then stage 2 with the query projector (the tiny/stage1_query and tiny/stage2_query
variants of docs/recipes.md: tiny/stage1 and tiny/stage2 with the query projector's overrides)."""

import json
import shutil

import pytest
from documented_variants import variant_args

from speechmapper_tune.checkpoint.projector_io import load_projector
from speechmapper_tune.models.query_projector import QueryProjector

pytestmark = pytest.mark.e2e


def metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_query_projector_trains_in_stage_1_then_stage_2(tmp_path, tune):
    s1 = tmp_path / "s1"
    tune(
        [
            "run",
            "speechmapper_pretrain",
            *variant_args("tiny/stage1_query"),
            f"output_dir={s1}",
            "max_steps=12",
            "log_every_n_steps=4",
            "val_every_n_steps=12",
            "save_every_n_steps=12",
        ],
        cwd=tmp_path,
    )
    rows = [r for r in metrics(s1) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["skipped"] == 0  # every target fits its query count
    model, meta = load_projector(s1 / "checkpoints" / "step_12")
    assert isinstance(model, QueryProjector) and meta["projector"]["kind"] == "query"

    s2 = tmp_path / "s2"
    shutil.copytree(s1 / "data", s2 / "data")  # same tiny LLM: the checkpoint's fingerprint matches
    tune(
        [
            "run",
            "speechmapper_adapt",
            *variant_args("tiny/stage2_query"),
            f"output_dir={s2}",
            "from_scratch=False",
            f"projector_checkpoint={s1}/checkpoints/step_12",
            "max_steps=6",
            "log_every_n_steps=2",
            "val_every_n_steps=6",
            "save_every_n_steps=6",
        ],
        cwd=tmp_path,
    )
    rows = [r for r in metrics(s2) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"]  # CE + MSE: six steps are too few for CE alone to fall reliably
    model, meta = load_projector(s2 / "checkpoints" / "step_6")
    assert isinstance(model, QueryProjector) and meta["stage"] == 2


def test_query_projector_from_the_command_line_on_the_conv_config(tmp_path, tune):
    out = tmp_path / "s2"
    tune(
        [
            "run",
            "speechmapper_adapt",
            "--config",
            "tiny/stage2",
            f"output_dir={out}",
            "max_steps=2",
            "val_every_n_steps=0",
            "save_every_n_steps=2",
            "model._component_=speechmapper_tune.models.query_projector.query_projector",
            "model.model_dim=32",
            "model.num_heads=2",
            "model.window_frames=6",
        ],
        cwd=tmp_path,
    )
    model, _ = load_projector(out / "checkpoints" / "step_2")
    assert isinstance(model, QueryProjector) and model.config.window_frames == 6
