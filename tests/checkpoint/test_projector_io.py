import torch

from speechmapper_tune.checkpoint.projector_io import (
    CheckpointManager,
    embedding_fingerprint,
    fingerprint_matches,
    load_projector,
    read_projector_meta,
    save_projector,
)
from speechmapper_tune.models.projector import speechmapper_tiny


def test_save_load_round_trip(tmp_path):
    model = speechmapper_tiny().eval()
    save_projector(tmp_path / "p", model, {"stage": 1, "llm": {"dim": 32}})
    loaded, meta = load_projector(tmp_path / "p")
    assert meta["stage"] == 1 and meta["projector"]["input_dim"] == 16
    x = torch.randn(1, 40, 16)
    assert torch.equal(model(x)[0], loaded.eval()(x)[0])  # fp32 weights round-trip bit for bit


def test_fp16_shipping_loads_back_as_fp32(tmp_path):
    model = speechmapper_tiny()
    save_projector(tmp_path / "p", model, {}, dtype=torch.float16)
    loaded, _ = load_projector(tmp_path / "p")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def test_manager_latest_prune_and_no_temp_left(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    model = speechmapper_tiny()
    for step in (10, 20, 30):
        mgr.save(step, model, {"stage": 1}, {"step": step})
    assert mgr.latest().name == "step_30"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_20", "step_30"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert mgr.load_state(mgr.latest())["step"] == 30
    assert read_projector_meta(mgr.latest())["step"] == 30


def test_a_half_written_checkpoint_is_invisible(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(10, speechmapper_tiny(), {}, {"step": 10})
    (tmp_path / "checkpoints" / ".tmp-step_20").mkdir()  # a job killed mid-save
    assert mgr.latest().name == "step_10"


def test_fingerprint_tells_tables_apart():
    a = torch.randn(100, 8)
    assert embedding_fingerprint(a) == embedding_fingerprint(a.clone())
    assert embedding_fingerprint(a) != embedding_fingerprint(torch.randn(100, 8))


def test_fingerprint_holds_across_a_bf16_copy_and_accepts_the_older_fp32_hash():
    import hashlib

    a = torch.randn(1000, 8)
    assert embedding_fingerprint(a) == embedding_fingerprint(a.to(torch.bfloat16))  # a GPU-side / bf16 checkpoint copy
    rows = a[:: 1000 // 64][:64].contiguous()
    legacy = hashlib.sha256(rows.numpy().round(5).tobytes()).hexdigest()[:16]  # how checkpoints before it were hashed
    assert legacy != embedding_fingerprint(a)
    assert fingerprint_matches(legacy, a) and fingerprint_matches(embedding_fingerprint(a), a.to(torch.bfloat16))
    assert fingerprint_matches(None, a)  # none recorded
    b = torch.randn(1000, 8)
    assert not fingerprint_matches(embedding_fingerprint(b), a) and not fingerprint_matches(legacy, b)


class Killed(BaseException):
    """Stands for a kill -9 at one point of a save: nothing after it runs."""


def _kill_at(monkeypatch, n):
    """Make the ``n``-th rename or folder removal of the next save the point where the job dies."""
    import os
    import shutil

    calls = {"n": 0}

    def dying(fn):
        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                raise Killed
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(os, "replace", dying(os.replace))
    monkeypatch.setattr(shutil, "rmtree", dying(shutil.rmtree))
    return calls


def _assert_complete(folder):
    assert {"projector.safetensors", "projector_config.json", "recipe_state.pt"} <= {p.name for p in folder.iterdir()}


def test_a_save_killed_at_any_point_leaves_latest_on_a_complete_checkpoint(tmp_path, monkeypatch):
    model = speechmapper_tiny()
    for step, _resave in ((30, False), (20, True)):  # a new step, and the step latest names saved again
        n = 1
        while True:
            root = tmp_path / f"{step}_{n}"
            mgr = CheckpointManager(root, keep_last=2)
            for s in (10, 20):
                mgr.save(s, model, {"stage": 1}, {"step": s})
            with monkeypatch.context() as m:
                calls = _kill_at(m, n)
                try:
                    mgr.save(step, model, {"stage": 1}, {"step": step})
                    killed = False
                except Killed:
                    killed = True
            folder = CheckpointManager(root).latest()
            assert folder is not None, (step, n)
            _assert_complete(folder)
            assert mgr.load_state(folder)["step"] in ({20, step} if killed else {step})
            if not killed:
                assert calls["n"] < n
                break
            n += 1


def test_latest_falls_back_to_the_newest_complete_step_when_the_pointer_is_broken(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    for step in (10, 20, 30):
        mgr.save(step, speechmapper_tiny(), {"stage": 1}, {"step": step})
    root = tmp_path / "checkpoints"
    (root / "latest").write_text("step_40\n")  # names a folder that is not there
    assert mgr.latest().name == "step_30"
    assert "step_40" in caplog.text and "step_30" in caplog.text
    (root / "step_30" / "recipe_state.pt").unlink()  # a step folder without its state is not complete
    assert mgr.latest().name == "step_20"
    (root / "latest").unlink()
    assert mgr.latest().name == "step_20"
    for step in (10, 20):
        (root / f"step_{step}" / "projector.safetensors").unlink()
    assert mgr.latest() is None


def test_latest_is_silent_without_checkpoints(tmp_path, caplog):
    assert CheckpointManager(tmp_path).latest() is None
    assert not caplog.text


class _Payload:
    """What a planted recipe_state.pt could hold: unpickling it would call ``Path.touch``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return Path.touch, (Path(self.marker),)


def test_a_pickled_payload_in_the_recipe_state_does_not_run(tmp_path):
    import pytest

    mgr = CheckpointManager(tmp_path)
    folder = mgr.save(10, speechmapper_tiny(), {"stage": 1}, {"step": 10})
    marker = tmp_path / "payload_ran"
    torch.save({"step": 10, "optimizer": _Payload(marker)}, folder / "recipe_state.pt")
    with pytest.raises(ValueError, match="recipe_state.pt") as err:
        mgr.load_state(folder)
    assert str(folder / "recipe_state.pt") in str(err.value)
    assert not marker.exists()


def test_the_demo_reads_the_recipe_state_as_data(tmp_path):
    import pytest

    from speechmapper_tune.demo import _final

    mgr = CheckpointManager(tmp_path)
    folder = mgr.save(10, speechmapper_tiny(), {"stage": 1}, {"step": 10, "config": {"max_steps": 10}})
    assert _final(tmp_path) == folder
    marker = tmp_path / "payload_ran"
    torch.save({"step": 10, "config": {"max_steps": 10}, "x": _Payload(marker)}, folder / "recipe_state.pt")
    with pytest.raises(ValueError, match="recipe_state.pt"):
        _final(tmp_path)
    assert not marker.exists()


def test_rng_state_survives_a_checkpoint_exactly(tmp_path):
    import random

    import numpy as np

    from speechmapper_tune.checkpoint.projector_io import rng_state, set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.randn(), torch.rand(1)  # numpy caches a gaussian: part of its state
    mgr = CheckpointManager(tmp_path)
    folder = mgr.save(1, speechmapper_tiny(), {}, {"step": 1, "rng": rng_state()})
    expected = (random.random(), np.random.randn(3).tolist(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(mgr.load_state(folder)["rng"])
    got = (random.random(), np.random.randn(3).tolist(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_a_truncated_weights_file_is_named_in_the_error(tmp_path):
    import pytest

    save_projector(tmp_path / "p", speechmapper_tiny(), {})
    weights = tmp_path / "p" / "projector.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="projector.safetensors") as err:
        load_projector(tmp_path / "p")
    assert str(weights) in str(err.value)


def test_a_projector_without_a_fingerprint_is_loaded_with_a_warning(tmp_path, caplog):
    import pytest

    from speechmapper_tune.checkpoint.projector_io import check_projector_fits

    table = torch.randn(50, 32)
    meta = {"projector": {"output_dim": 32}, "llm": {"fingerprint": None, "checkpoint": "/llm"}}
    check_projector_fits(meta, table, "ckpt")
    assert "ckpt" in caplog.text and "fingerprint" in caplog.text
    caplog.clear()
    check_projector_fits({"projector": {"output_dim": 32}}, table, "ckpt")  # no llm record at all
    assert "fingerprint" in caplog.text
    caplog.clear()
    check_projector_fits({**meta, "llm": {"fingerprint": embedding_fingerprint(table)}}, table, "ckpt")
    assert not caplog.text
    with pytest.raises(ValueError, match="another LLM"):
        check_projector_fits(
            {**meta, "llm": {"fingerprint": embedding_fingerprint(torch.randn(50, 32))}}, table, "ckpt"
        )


def test_a_new_run_is_refused_in_a_folder_with_checkpoints(tmp_path):
    import pytest

    mgr = CheckpointManager(tmp_path)
    mgr.refuse_existing_run()  # nothing there yet
    mgr.save(10, speechmapper_tiny(), {}, {"step": 10})
    with pytest.raises(FileExistsError, match="resume=True") as err:
        mgr.refuse_existing_run()
    assert "output_dir" in str(err.value) and "step_10" in str(err.value)
