"""A tiny stage-1 run killed with kill -9 at random points, one of them inside a checkpoint save, and
resumed each time: its metrics and final weights equal those of an uninterrupted run exactly."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from speechmapper_tune.checkpoint.projector_io import CheckpointManager, load_projector

pytestmark = pytest.mark.e2e
STEPS = 24
COMMON = [
    "run",
    "speechmapper_pretrain",
    "--config",
    "tiny/stage1",
    f"max_steps={STEPS}",
    f"lr_scheduler.num_training_steps={STEPS}",
    "log_every_n_steps=1",
    "val_every_n_steps=6",
    "save_every_n_steps=4",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
# `tune` with every fsync slowed down: a tiny checkpoint's save then lasts long enough to be killed inside
SLOW_SAVES = """import os, sys, time
from torchtune._cli.tune import main
_fsync = os.fsync
os.fsync = lambda fd: (time.sleep(0.05), _fsync(fd))[1]
sys.argv[0] = "tune"
sys.exit(main())
"""


def _metrics(out):
    path = out / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.is_file() else []


def _last_step(out):
    try:
        return max((r["step"] for r in _metrics(out)), default=0)
    except json.JSONDecodeError:  # read while a line was being written
        return 0


def _saving(out, since):
    """Whether a checkpoint save begun after ``since`` is under way (a killed save's folder is older)."""
    return any(p.stat().st_mtime > since for p in (out / "checkpoints").glob(".tmp-step_*"))


def _run_and_kill(tmp_path, out, ready, delay, deadline=60.0):
    """Start the run (resuming); once ``ready(start)`` holds, wait ``delay`` s and kill -9 it; return its exit code."""
    wrapper = tmp_path / "slow_saves_tune.py"
    wrapper.write_text(SLOW_SAVES)
    proc = subprocess.Popen(
        [sys.executable, str(wrapper), *COMMON, f"output_dir={out}", "resume=True"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    start = time.time()
    try:
        while proc.poll() is None and time.time() < start + deadline:
            try:
                if ready(start):
                    break
            except FileNotFoundError:  # a folder renamed or pruned while it was looked at
                pass
            time.sleep(0.002)
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_runs_killed_at_random_points_and_resumed_equal_an_uninterrupted_run(tmp_path, tune):
    rng = random.Random(0)
    full, part = tmp_path / "full", tmp_path / "part"
    tune([*COMMON, f"output_dir={full}"], cwd=tmp_path)
    shutil.copytree(full / "data", part / "data")  # same synthetic data, no regeneration

    step = rng.randint(2, 10)
    code = _run_and_kill(tmp_path, part, lambda start: _last_step(part) >= step, rng.uniform(0, 0.05))
    assert code == -signal.SIGKILL  # mid-training, between saves or in one
    code = _run_and_kill(tmp_path, part, lambda start: _saving(part, start), rng.uniform(0, 0.1))
    assert code == -signal.SIGKILL and list((part / "checkpoints").glob(".tmp-step_*"))  # while step_N was written
    code = _run_and_kill(tmp_path, part, lambda start: _saving(part, start), rng.uniform(0.1, 0.3))
    assert code == -signal.SIGKILL  # late in a save: around the rename, the pointer or the pruning
    tune([*COMMON, f"output_dir={part}", "resume=True"], cwd=tmp_path)

    a, b = _metrics(full), _metrics(part)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    timing = {"vectors_per_second"}
    for ra, rb in zip(a, b):  # same kernels, same machine, same data order: exact
        assert {k: v for k, v in ra.items() if k not in timing} == {k: v for k, v in rb.items() if k not in timing}
    assert CheckpointManager(part).latest().name == f"step_{STEPS}"
    wa, _ = load_projector(full / "checkpoints" / f"step_{STEPS}")
    wb, _ = load_projector(part / "checkpoints" / f"step_{STEPS}")
    for (n, p), q in zip(wa.state_dict().items(), wb.state_dict().values()):
        assert torch.equal(p, q), n
