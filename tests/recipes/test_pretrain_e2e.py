"""End-to-end runs of `tune run speechmapper_pretrain` on the self-contained tiny config."""

import json
import shutil

import pytest
import torch

from speechmapper_tune.checkpoint.projector_io import load_projector

pytestmark = pytest.mark.e2e
LOSS_FIELDS = ("loss", "mse", "mse_word", "mse_pad", "cosine", "lr", "grad_norm")


def metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_tiny_stage1_learns(tmp_path, tune):
    out = tmp_path / "run"
    tune(["run", "speechmapper_pretrain", "--config", "tiny/stage1", f"output_dir={out}", "max_steps=80"], cwd=tmp_path)
    rows = [r for r in metrics(out) if "loss" in r]
    assert rows[0]["step"] == 1
    assert rows[-1]["loss"] < rows[0]["loss"] / 5, (rows[0]["loss"], rows[-1]["loss"])
    val = [r for r in metrics(out) if "val_loss" in r]
    assert val and val[-1]["val_cosine"] > 0.3
    model, meta = load_projector(out / "checkpoints" / "step_80")
    assert meta["stage"] == 1 and meta["step"] == 80 and meta["llm"]["dim"] == model.output_dim == 32


def test_resume_logs_the_same_losses_as_an_uninterrupted_run(tmp_path, tune):
    common = [
        "run",
        "speechmapper_pretrain",
        "--config",
        "tiny/stage1",
        "lr_scheduler.num_training_steps=24",
        "log_every_n_steps=2",
        "val_every_n_steps=8",
        "save_every_n_steps=8",
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    tune([*common, f"output_dir={full}", "max_steps=24"], cwd=tmp_path)
    shutil.copytree(full / "data", part / "data")  # same synthetic data, no regeneration
    tune([*common, f"output_dir={part}", "max_steps=16"], cwd=tmp_path)
    tune([*common, f"output_dir={part}", "max_steps=24", "resume=True"], cwd=tmp_path)
    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in LOSS_FIELDS + ("val_loss", "val_cosine"):
            if k in ra:
                assert rb[k] == ra[k], (ra["step"], k)  # same kernels, same machine, same data order: exact
    wa, _ = load_projector(full / "checkpoints" / "step_24")
    wb, _ = load_projector(part / "checkpoints" / "step_24")
    for (n, p), q in zip(wa.state_dict().items(), wb.state_dict().values()):
        assert torch.equal(p, q), n


def test_two_process_ddp_on_cpu(tmp_path, tune):
    out = tmp_path / "ddp"
    tune(
        [
            "run",
            "--nproc_per_node",
            "2",
            "speechmapper_pretrain",
            "--config",
            "tiny/stage1",
            f"output_dir={out}",
            "max_steps=12",
            "log_every_n_steps=4",
            "val_every_n_steps=0",
        ],
        cwd=tmp_path,
    )
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 4, 8, 12]
    assert (out / "checkpoints" / "step_12" / "projector.safetensors").is_file()
    state = torch.load(out / "checkpoints" / "step_12" / "recipe_state.pt", weights_only=True)  # plain data
    assert state["sampler"]["world_size"] == 2 and len(state["rng"]) == 2


def test_a_finished_run_resumed_is_left_as_it_is_and_a_new_run_in_its_folder_is_refused(
    tmp_path, tune, tune_in_process
):
    out = tmp_path / "run"
    args = [
        "run",
        "speechmapper_pretrain",
        "--config",
        "tiny/stage1",
        f"output_dir={out}",
        "max_steps=2",
        "log_every_n_steps=1",
    ]
    tune(args, cwd=tmp_path)
    files = {p: p.read_bytes() for p in [out / "metrics.jsonl", *(out / "checkpoints").rglob("*")] if p.is_file()}
    proc = tune_in_process([*args, "resume=True"], tmp_path)
    assert proc.returncode == 0 and "nothing to do" in proc.stderr + proc.stdout
    assert all(p.read_bytes() == b for p, b in files.items())  # no second validation line, no checkpoint rewritten
    proc = tune_in_process(args, tmp_path)  # resume=False into the same folder
    assert proc.returncode != 0
    assert "pass resume=True to continue that run, or choose a new output_dir" in proc.stderr
    assert all(p.read_bytes() == b for p, b in files.items())  # its metrics are not wiped


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.alpha=12", "alpha=12"),
        ("llm.pad_id=999", "llm.pad_id=999 is outside the vocabulary"),
        ("model.output_dim=48", "model.output_dim=48 but the embedding table"),
        ("dtype=fp16", "dtype='fp16'"),
    ],
)
def test_config_errors_stop_before_training(tmp_path, tune_in_process, override, message):
    proc = tune_in_process(
        ["run", "speechmapper_pretrain", "--config", "tiny/stage1", f"output_dir={tmp_path}/o", override], cwd=tmp_path
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_dry_run_prints_parameter_count(tmp_path, tune):
    proc = tune(
        ["run", "speechmapper_pretrain", "--config", "tiny/stage1", f"output_dir={tmp_path}/o", "dry_run=True"],
        cwd=tmp_path,
    )
    info = json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][-1])
    assert info == {"dry_run": True, "parameters": info["parameters"], "vocab_size": 42, "llm_dim": 32}
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_init_projector_starts_from_another_run_and_names_a_different_architecture(
    tmp_path, tune, tune_in_process, trained
):
    """A warm start reads another projector's weights: its step-0 validation equals that projector's own
    validation on the same data (same weights, same batches); a differently shaped model is refused by name."""
    source = trained / "checkpoints" / "step_20"
    common = [
        "run",
        "speechmapper_pretrain",
        "--config",
        "tiny/stage1",
        f"init_projector={source}",
        "validate_at_start=True",
        "val_every_n_steps=0",
        "save_every_n_steps=0",
    ]
    shutil.copytree(trained / "data", tmp_path / "warm" / "data")
    tune([*common, f"output_dir={tmp_path / 'warm'}", "max_steps=2"], cwd=tmp_path)
    rows = metrics(tmp_path / "warm")
    first = [r for r in rows if "val_loss" in r][0]
    own = [r for r in metrics(trained) if "val_loss" in r][-1]  # the source run's final validation
    assert first["step"] == 0 and own["step"] == 20
    for k in ("val_loss", "val_cosine", "val_token_acc"):
        assert abs(first[k] - own[k]) <= 1e-5 * max(1.0, abs(own[k])), (k, first[k], own[k])
    shutil.copytree(trained / "data", tmp_path / "wide" / "data")
    err = tune_in_process([*common, f"output_dir={tmp_path / 'wide'}", "max_steps=1", "model.num_layers=2"], tmp_path)
    assert err.returncode != 0 and "num_layers" in err.stderr and str(source) in err.stderr
