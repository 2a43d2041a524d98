"""`tune run speechmapper_adapt` with the behaviour-alignment term (loss.kl_ratio): logged, recorded, resumed exactly."""

import json
import shutil

import pytest

from speechmapper_tune.checkpoint.projector_io import read_projector_meta

pytestmark = pytest.mark.e2e


def metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_kl_plus_mse_trains_and_resumes_exactly(tmp_path, tune, trained):
    common = ["run", "speechmapper_adapt", "--config", "tiny/stage2", "from_scratch=False",
              f"projector_checkpoint={trained}/checkpoints/step_20", "log_every_n_steps=1", "val_every_n_steps=3",
              "save_every_n_steps=3", "loss.sigma=0.5", "loss.kl_ratio=1.0", "loss.kl_temperature=2.0",
              "batch_size=4", "gradient_accumulation_steps=1", "data.val.max_items=8"]
    full, part = tmp_path / "full", tmp_path / "part"
    for out in (full, part):
        shutil.copytree(trained / "data", out / "data")  # the tiny LLM the stage-1 checkpoint was trained for
    tune([*common, f"output_dir={full}", "max_steps=6"], cwd=tmp_path)
    tune([*common, f"output_dir={part}", "max_steps=3"], cwd=tmp_path)
    tune([*common, f"output_dir={part}", "max_steps=6", "resume=True"], cwd=tmp_path)
    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra == {**rb, **{k: ra[k] for k in ("tokens_per_second",) if k in ra}}, ra["step"]  # exact, timing aside
    train = [r for r in a if "kl" in r]
    assert len(train) == 6 and all(r["kl"] > 0 for r in train)
    assert any("val_kl" in r for r in a)
    meta = read_projector_meta(full / "checkpoints" / "step_6")
    assert (meta["kl_ratio"], meta["kl_temperature"], meta["sigma"]) == (1.0, 2.0, 0.5)
