"""bench/stage1_curve.py: subsets of manifests (also from the shards of an unfinished extraction), config
checks, and a two-point tiny curve that runs, resumes as done, and reports a table and a plot."""

import gzip
import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
from documented_variants import fixture_config

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("stage1_curve", REPO / "bench" / "stage1_curve.py")
curve = importlib.util.module_from_spec(spec)
spec.loader.exec_module(curve)


def write_cuts(path, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps({"id": i}) + "\n" for i in ids)


def ids_of(path):
    return [json.loads(l)["id"] for l in gzip.open(path, "rt")]


def test_subset_from_the_finished_shards_then_from_the_manifest(tmp_path):
    manifest = tmp_path / "train" / "cuts.jsonl.gz"
    write_cuts(manifest.parent / "shards" / "cuts-00000.jsonl.gz", ["a", "b"])
    assert curve.subset_manifest(manifest, 3) is None  # 2 extracted so far
    write_cuts(manifest.parent / "shards" / "cuts-00001.jsonl.gz", ["c", "d"])
    sub = curve.subset_manifest(manifest, 3)
    assert sub == manifest.parent / "cuts_first3.jsonl.gz" and ids_of(sub) == ["a", "b", "c"]
    write_cuts(manifest, ["a", "b", "c", "d"])
    assert ids_of(curve.subset_manifest(manifest, 4)) == ["a", "b", "c", "d"]
    assert curve.subset_manifest(manifest, None) == manifest
    with pytest.raises(ValueError, match="holds 4 utterances, fewer than sentences=9"):
        curve.subset_manifest(manifest, 9)


@pytest.mark.parametrize(
    "point, message",
    [
        ({"name": "a", "data": "x", "steps": 2, "epochs": 1}, "exactly one of steps, epochs, steps_of"),
        ({"name": "a", "data": "y", "steps": 2}, "data='y' is not one of"),
        ({"name": "a", "data": "x", "steps_of": "b"}, "must name an earlier point"),
        ({"name": "a", "data": "x", "steps": 2, "lr": 1}, "unknown keys \\['lr'\\]"),
        ({"name": "a", "data": "x", "steps": 2, "start_step": -1}, "start_step=-1 must be a step count"),
    ],
)
def test_curve_config_errors_name_the_point(tmp_path, point, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        json.dumps(
            {
                "base_config": "tiny/stage1",
                "output_dir": "o",
                "dev_manifest": "d",
                "data": {"x": {"manifest": "m"}},
                "points": [point],
            }
        )
    )
    with pytest.raises(ValueError, match=message):
        curve.load_curve(str(cfg))


def test_state_written_by_two_processes_keeps_both_figures(tmp_path):
    """A runner's state and a --test run beside it: each save keeps what the other wrote since."""
    runner = curve.State(tmp_path)
    runner.point("a").update(status="running", steps=10)
    runner.save()
    tester = curve.State(tmp_path)
    tester.point("a")["test"] = {"wer": 1.0}
    tester.save()
    st = runner.point("a")
    st["status"] = "done"
    runner.save()
    kept = {"status": "done", "steps": 10, "test": {"wer": 1.0}, "cpu_s": 0.0, "wall_s": 0.0}
    assert curve.State(tmp_path).data == {"a": kept}
    assert st is runner.point("a") and st["test"] == {"wer": 1.0}


def test_a_warm_started_point_is_drawn_from_its_start_step(tmp_path):
    """``start_step``: the point's own steps 0..N plotted after the step its init checkpoint was at."""
    results = tmp_path / "results"
    results.mkdir()
    metrics = [{"step": 0, "val_token_acc": 0.2}, {"step": 250, "val_token_acc": 0.25}]
    (results / "decay.json").write_text(json.dumps({"state": {"status": "done", "steps": 250}, "metrics": metrics}))
    cfg = {
        "base_config": "tiny/stage1",
        "output_dir": str(tmp_path / "curve"),
        "results_dir": str(results),
        "dev_manifest": "d",
        "data": {"x": {"manifest": "m"}},
        "points": [{"name": "decay", "data": "x", "steps": 250, "start_step": 9500}],
    }
    (row,) = curve.summarize(cfg)
    assert row["curve"] == [(9500, 0.2), (9750, 0.25)] and row["step"] == 250  # the table keeps its own steps


def test_cpu_seconds_read_from_proc_match_getrusage():
    """The polled figure (``/proc/<pid>/stat``) against the kernel's own account of this process."""
    import resource
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", "sum(range(10**7))"], check=True)  # a waited-for child's seconds
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # and some of this process's own
        pass
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    expected = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime  # waited-for children count too
    polled = curve.process_cpu_s(os.getpid())
    assert polled == pytest.approx(expected, rel=0.05, abs=0.05)  # ticks of 10 ms, and the read itself
    assert curve.process_cpu_s(2**22 + 1) is None  # above pid_max's default: no such process


def test_a_killed_run_counts_its_polled_seconds_once(tmp_path):
    """The runner died with the machine: its last poll joins the totals when the point runs again, once."""
    state = curve.State(tmp_path)
    st = state.point("a")
    st.update(cpu_s=100.0, wall_s=60.0, running_cpu_s=30.0, running_wall_s=20.0, status="running")
    state.save()
    st = curve.State(tmp_path).point("a")
    curve.fold_unaccounted(st)
    assert (st["cpu_s"], st["wall_s"], st["running_cpu_s"], st["running_wall_s"]) == (130.0, 80.0, 0.0, 0.0)
    curve.fold_unaccounted(st)
    assert (st["cpu_s"], st["wall_s"]) == (130.0, 80.0)


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"end_wer": {"overrides": ["prompt=null"]}}, "end_wer needs config"),
        ({"reference": "b"}, "reference='b' names no point"),
    ],
)
def test_curve_settings_errors(tmp_path, setting, message):
    cfg = tmp_path / "c.yaml"
    plan = {"base_config": "b", "output_dir": "o", "dev_manifest": "d", "data": {"x": {"manifest": "m"}}}
    cfg.write_text(json.dumps({**plan, "points": [{"name": "a", "data": "x", "steps": 2}], **setting}))
    with pytest.raises(ValueError, match=message):
        curve.load_curve(str(cfg))


def test_shipped_curve_config_loads():
    cfg = curve.load_curve(curve.DEFAULT_CONFIG)
    assert (
        cfg["reference"] == "v46_3k"
        and cfg["end_wer"]["config"] == "smollm2_135M/generate"
        and "prompt=null" in cfg["end_wer"]["overrides"]
    )
    assert len(cfg["points"]) >= 10 and {"voices", "sentences", "capacity", "levers", "classifier"} <= {
        p.get("group") for p in cfg["points"]
    }


@pytest.mark.e2e
def test_tiny_curve_runs_resumes_and_reports(tmp_path, trained):
    from omegaconf import OmegaConf

    from speechmapper_tune.configs import resolve_config

    data = trained / "data"
    base = OmegaConf.load(resolve_config("tiny/stage1"))
    del base["prepare"]  # the trained fixture's data and tiny LLM instead
    base.llm.checkpoint = base.llm.tokenizer = str(data / "llm")
    OmegaConf.save(base, tmp_path / "base.yaml")
    cfg = tmp_path / "curve.yaml"
    cfg.write_text(
        json.dumps(
            {
                "base_config": str(tmp_path / "base.yaml"),
                "output_dir": str(tmp_path / "curve"),
                "results_dir": str(tmp_path / "results"),
                "dev_manifest": str(data / "val.jsonl.gz"),
                "test_manifest": str(data / "val.jsonl.gz"),  # the same split: test figures must equal dev's
                "data": {"tiny": {"manifest": str(data / "train.jsonl.gz"), "voices": 1}},
                "reference": "first100",
                "end_wer": {"config": fixture_config("tiny/generate"), "overrides": [f"llm.checkpoint={data / 'llm'}"]},
                "common": ["val_every_n_steps=2", "save_every_n_steps=2", "log_every_n_steps=1"],
                "points": [
                    {"name": "first100", "data": "tiny", "sentences": 100, "epochs": 1, "group": "g"},
                    {
                        "name": "sampled",
                        "data": "tiny",
                        "sentences": 100,
                        "steps_of": "first100",
                        "group": "g",
                        "overrides": ["loss.classifier_weight=1", "loss.classifier_negatives=8"],
                    },
                ],
            }
        )
    )
    curve.main(["--config", str(cfg), "--wait", "0", "--nice", "0"])
    state = json.loads((tmp_path / "curve" / "state.json").read_text())
    steps = state["first100"]["steps"]
    assert state["first100"]["batches_per_epoch"] == steps >= 1 and state["sampled"]["steps"] == steps
    assert all(s["status"] == "done" and s["cpu_s"] > 0 for s in state.values())
    # each end point decoded once on dev (tiny/generate: its first 10 items), scored as speechmapper_eval scores ASR
    from speechmapper_tune.metrics import asr_scores

    rows = [json.loads(l) for l in (tmp_path / "curve" / "sampled" / "dev_generation" / "generations.jsonl").open()]
    assert state["sampled"]["dev_wer_n"] == len(rows) == 10 and state["sampled"]["dev_wer_step"] == steps
    wer = asr_scores([r["reference"] for r in rows], [r["hypothesis"] for r in rows])["wer"]
    assert state["sampled"]["dev_wer"] == pytest.approx(wer, rel=1e-9)
    table = (tmp_path / "curve" / "curve.md").read_text()
    assert "| first100 | g | 100 | 1 |" in table and "| sampled |" in table
    assert f"| {state['sampled']['dev_wer']:.1f} ({state['sampled']['dev_wer_stuck']}) |" in table
    assert (tmp_path / "curve" / "curve.png").stat().st_size > 1000
    metrics = [json.loads(l) for l in (tmp_path / "curve" / "sampled" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_token_acc_seen_0_9" in m or "val_token_share_seen_0_9" in m for m in metrics)
    curve.main(["--config", str(cfg), "--wait", "0", "--nice", "0"])  # everything done: nothing runs again
    assert json.loads((tmp_path / "curve" / "state.json").read_text()) == state
    kept = json.loads((tmp_path / "results" / "sampled.json").read_text())
    assert kept["state"] == state["sampled"] and "-core" in kept["machine"]
    assert [m["step"] for m in kept["metrics"] if "val_token_acc" in m] == [
        m["step"] for m in metrics if "val_token_acc" in m
    ]
    # the test split, once: the recipe's validation-only run and the same decoding (here on the dev items again)
    curve.main(["--config", str(cfg), "--test", "sampled", "--nice", "0"])
    test = json.loads((tmp_path / "curve" / "state.json").read_text())["sampled"]["test"]
    last = [m for m in metrics if "val_token_acc" in m][-1]
    assert test["step"] == steps and abs(test["token_acc"] - last["val_token_acc"]) <= 1e-6
    assert test["wer"] == pytest.approx(state["sampled"]["dev_wer"], rel=1e-9) and test["n"] == 10
    with pytest.raises(SystemExit, match="scored already"):
        curve.main(["--config", str(cfg), "--test", "sampled", "--nice", "0"])
    table = (tmp_path / "curve" / "curve.md").read_text()
    # a new machine: no runs folder, only the committed results; nothing runs, the table still shows both points
    import shutil

    shutil.rmtree(tmp_path / "curve")
    curve.main(["--config", str(cfg), "--wait", "0", "--nice", "0"])
    assert not (tmp_path / "curve" / "first100").exists()
    assert table == (tmp_path / "curve" / "curve.md").read_text()
