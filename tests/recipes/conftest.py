"""Fixtures shared by the recipe tests."""

import pytest


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tune):
    """A finished 20-step tiny stage-1 run (its data, tiny LLM and checkpoints/step_20); tests only read it."""
    out = tmp_path_factory.mktemp("s1")
    tune(
        [
            "run",
            "speechmapper_pretrain",
            "--config",
            "tiny/stage1",
            f"output_dir={out}",
            "max_steps=20",
            "val_every_n_steps=0",
            "save_every_n_steps=0",
        ],
        cwd=out,
    )
    return out
