import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TUNE = str(Path(sys.executable).parent / "tune")


def run_tune(args, cwd, env=None, timeout=600, check=True):
    """Run the real `tune` CLI in a subprocess; return the CompletedProcess."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **(env or {})}
    proc = subprocess.run([TUNE, *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"tune {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def run_tune_in_process(args, cwd, monkeypatch, capfd):
    """``tune ARGS`` through torchtune's own CLI entry point, in this process: for runs that stop at their
    settings, where a subprocess would spend ~5 s importing torchtune (torchao, datasets) for a sub-second check.
    Returns a CompletedProcess like ``run_tune``'s (exit status, captured stdout and stderr)."""
    from torchtune._cli.tune import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["tune", *[str(a) for a in args]])
    monkeypatch.setattr(sys, "path", list(sys.path))  # `tune run` appends the working directory
    capfd.readouterr()
    log = logging.StreamHandler(sys.stderr)  # what the recipe logs, on stderr as in a subprocess
    log.setLevel(logging.INFO)
    logging.getLogger().addHandler(log)
    try:
        code = main()
    except SystemExit as e:
        code = e.code
    finally:
        logging.getLogger().removeHandler(log)
    out, err = capfd.readouterr()
    code = code if isinstance(code, int) else (0 if code is None else 1)
    return subprocess.CompletedProcess(["tune", *args], code, out, err)


def pytest_configure(config):
    """Under pytest-xdist each worker gets one thread: two workers x torch's default threads would oversubscribe."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Longest files first, so the two xdist workers finish together instead of one running the
    reduced demo (minutes) alone at the end: the demo, then files with end-to-end runs, then the rest
    (stable order within each group; `make test` passes --no-loadscope-reorder to keep it)."""

    def cost_rank(item):
        path = item.nodeid.split("::")[0]
        if path.endswith("test_demo_e2e.py"):
            return 0
        return 1 if path in e2e_files else 2

    e2e_files = {i.nodeid.split("::")[0] for i in items if i.get_closest_marker("e2e")}
    items.sort(key=cost_rank)


@pytest.fixture(scope="session")
def tune():
    return run_tune


@pytest.fixture
def tune_in_process(monkeypatch, capfd):
    return lambda args, cwd: run_tune_in_process(args, cwd, monkeypatch, capfd)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With SPEECHMAPPER_REQUIRE_SYSDEPS=1 (CI as root, where `make` installs them), a test
    skipped for a missing engine or package fails instead: nothing silently goes untested."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("SPEECHMAPPER_REQUIRE_SYSDEPS") == "1":
        report.outcome = "failed"
        report.longrepr = f"skipped, but SPEECHMAPPER_REQUIRE_SYSDEPS=1: {report.longrepr}"
