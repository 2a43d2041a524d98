"""`tune run speechmapper_adapt` on the tiny config: from a stage-1 checkpoint, resume, config errors."""

import json
import shutil

import pytest
from documented_variants import fixture_config

from speechmapper_tune.checkpoint.projector_io import load_projector, read_projector_meta

pytestmark = pytest.mark.e2e
FIELDS = ("loss", "ce", "mse", "lr", "grad_norm", "val_loss", "val_ce", "val_mse")


def metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, tune):
    out = tmp_path_factory.mktemp("s1")
    tune(
        [
            "run",
            "speechmapper_pretrain",
            "--config",
            "tiny/stage1",
            f"output_dir={out}",
            "max_steps=30",
            "val_every_n_steps=0",
            "save_every_n_steps=0",
        ],
        cwd=out,
    )
    return out


def _stage2_dir(tmp_path, stage1, name):
    out = tmp_path / name
    shutil.copytree(stage1 / "data", out / "data")  # same tiny LLM: the checkpoint's fingerprint matches
    return out


def test_adapt_from_stage1_learns_and_resumes_exactly(tmp_path, tune, stage1):
    common = [
        "run",
        "speechmapper_adapt",
        "--config",
        "tiny/stage2",
        "from_scratch=False",
        f"projector_checkpoint={stage1}/checkpoints/step_30",
        "log_every_n_steps=2",
        "val_every_n_steps=6",
        "save_every_n_steps=6",
        "loss.sigma=0.5",
    ]
    full, part = _stage2_dir(tmp_path, stage1, "full"), _stage2_dir(tmp_path, stage1, "part")
    tune([*common, f"output_dir={full}", "max_steps=12"], cwd=tmp_path)
    tune([*common, f"output_dir={part}", "max_steps=6"], cwd=tmp_path)
    tune([*common, f"output_dir={part}", "max_steps=12", "resume=True"], cwd=tmp_path)
    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in FIELDS:
            if k in ra:
                assert rb[k] == ra[k], (ra["step"], k)  # same kernels, same machine, same data order: exact
    val = [r for r in a if "val_ce" in r]
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    meta = read_projector_meta(full / "checkpoints" / "step_12")
    assert meta["stage"] == 2 and meta["init"]["stage"] == 1 and meta["sigma"] == 0.5
    assert meta["prompt"]["instruction"] == "red"  # the training prompt travels with the projector
    load_projector(full / "checkpoints" / "step_12")


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.sigma=1.5", "sigma=1.5"),
        ("loss.alpha=0", "alpha=0"),
        ("llm.pad_id=500", "llm.pad_id=500 is outside the vocabulary"),
    ],
)
def test_config_errors(tmp_path, tune_in_process, stage1, override, message):
    out = _stage2_dir(tmp_path, stage1, "o")
    proc = tune_in_process(
        ["run", "speechmapper_adapt", "--config", "tiny/stage2", f"output_dir={out}", override], tmp_path
    )
    assert proc.returncode != 0 and message in proc.stderr


def test_projector_for_another_llm_is_refused_before_loading_it(tmp_path, tune_in_process, stage1):
    out = tmp_path / "other"  # its prepare writes a tiny LLM with another seed: another embedding table
    proc = tune_in_process(
        [
            "run",
            "speechmapper_adapt",
            "--config",
            "tiny/stage2",
            f"output_dir={out}",
            "prepare.seed=7",
            "from_scratch=False",
            f"projector_checkpoint={stage1}/checkpoints/step_30",
        ],
        tmp_path,
    )
    assert proc.returncode != 0
    assert "was trained for another LLM" in proc.stderr
    assert "Loading frozen LLM" not in proc.stderr + proc.stdout


def test_instruction_data_with_asr_mixed_in(tmp_path, tune, stage1):
    from lhotse import CutSet

    out = _stage2_dir(tmp_path, stage1, "sqa")
    cuts = list(CutSet.from_file(out / "data" / "train.jsonl.gz"))[:30]
    rows = [
        {"id": f"q{i}", "features": c.id, "instruction": "red", "answer": c.supervisions[0].text.split()[0]}
        for i, c in enumerate(cuts)
    ]
    rows.append({"id": "lost", "features": "no-such-utterance", "instruction": "red", "answer": "x"})
    (out / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = tune(
        [
            "run",
            "speechmapper_adapt",
            "--config",
            "tiny/stage2",
            f"output_dir={out}",
            "max_steps=3",
            f"data.train.instructions={out}/qa.jsonl",
            "data.train.asr_mix_ratio=1.0",
            "data.train.task=sqa",
            "loss.sigma=0.0",
            "val_every_n_steps=0",
        ],
        cwd=tmp_path,
    )
    log = proc.stderr + proc.stdout
    assert "train: 60 examples" in log  # 30 SQA + 30 ASR (probability 0.5, section 4.2)
    assert "features id not in the feature manifest: 1" in log
    assert (out / "checkpoints" / "step_3" / "projector.safetensors").is_file()


def test_lora_adapters_train_save_and_resume(tmp_path, tune, stage1):
    from safetensors.torch import load_file

    out = _stage2_dir(tmp_path, stage1, "lora")
    args = [
        "run",
        "speechmapper_adapt",
        "--config",
        "tiny/stage2",
        f"output_dir={out}",
        "val_every_n_steps=0",
        "save_every_n_steps=2",
        "lora={rank: 4, alpha: 8, dropout: 0.0, attn_modules: [q_proj, v_proj], apply_to_mlp: False}",
    ]
    proc = tune([*args, "max_steps=2"], cwd=tmp_path)
    assert "+ LoRA 896 parameters" in proc.stderr + proc.stdout  # rank 4 on q (32->32) and v (32->16), 2 layers
    first = load_file(str(out / "checkpoints" / "step_2" / "lora_adapters.safetensors"))
    assert first and all("lora_" in k for k in first)
    tune([*args, "max_steps=4", "resume=True"], cwd=tmp_path)
    second = load_file(str(out / "checkpoints" / "step_4" / "lora_adapters.safetensors"))
    assert first.keys() == second.keys()
    assert any(not (first[k] == second[k]).all() for k in first)  # adapters kept training after the resume
    meta = read_projector_meta(out / "checkpoints" / "step_4")
    assert meta["lora"]["rank"] == 4


def test_generate_loads_the_lora_adapters_trained_with_the_projector(tmp_path, tune, stage1):
    out = _stage2_dir(tmp_path, stage1, "lora_gen")
    tune(
        [
            "run",
            "speechmapper_adapt",
            "--config",
            "tiny/stage2",
            f"output_dir={out}",
            "val_every_n_steps=0",
            "max_steps=2",
            "save_every_n_steps=2",
            "lora={rank: 4, alpha: 8, dropout: 0.0, attn_modules: [q_proj, v_proj], apply_to_mlp: False}",
        ],
        cwd=tmp_path,
    )
    ckpt = out / "checkpoints" / "step_2"
    args = [
        "run",
        "speechmapper_generate",
        "--config",
        fixture_config("tiny/generate"),
        f"projector_checkpoint={ckpt}",
        f"manifest={out}/data/val.jsonl.gz",
        f"llm.checkpoint={out}/data/llm",
        "max_new_tokens=4",
        "max_items=4",
    ]
    proc = tune([*args, f"output_dir={tmp_path}/gen"], cwd=tmp_path)
    assert f"LoRA adapters (rank 4) loaded from {ckpt}/lora_adapters.safetensors" in proc.stderr + proc.stdout
    assert len((tmp_path / "gen" / "generations.jsonl").read_text().splitlines()) == 4
    (ckpt / "lora_adapters.safetensors").unlink()
    proc = tune([*args, f"output_dir={tmp_path}/gen2"], cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "was trained with LoRA adapters but has no lora_adapters.safetensors" in proc.stderr


def test_a_new_run_from_a_lora_checkpoint_goes_on_with_its_adapters(tmp_path, tune, stage1):
    from safetensors.torch import load_file

    lora = "lora={rank: 4, alpha: 8, dropout: 0.0, attn_modules: [q_proj, v_proj], apply_to_mlp: False}"
    first, second = _stage2_dir(tmp_path, stage1, "lora_a"), _stage2_dir(tmp_path, stage1, "lora_b")
    common = [
        "run",
        "speechmapper_adapt",
        "--config",
        "tiny/stage2",
        "val_every_n_steps=0",
        "save_every_n_steps=2",
        "max_steps=2",
    ]
    tune([*common, f"output_dir={first}", lora], cwd=tmp_path)
    ckpt = first / "checkpoints" / "step_2"
    proc = tune(
        [
            *common,
            f"output_dir={second}",
            f"projector_checkpoint={ckpt}",
            "from_scratch=False",
            lora,
            "optimizer.lr=0.0",
        ],
        cwd=tmp_path,
    )  # lr 0: the new run's adapters must equal the loaded ones
    assert f"LoRA adapters from {ckpt}/lora_adapters.safetensors" in proc.stderr + proc.stdout
    saved, kept = (
        load_file(str(ckpt / "lora_adapters.safetensors")),
        load_file(str(second / "checkpoints" / "step_2" / "lora_adapters.safetensors")),
    )
    assert saved.keys() == kept.keys() and all((saved[k] == kept[k]).all() for k in saved)
    assert any(k.endswith("lora_b.weight") and saved[k].abs().sum() > 0 for k in saved)  # not the zero init
    proc = tune(
        [*common, f"output_dir={tmp_path}/no_lora", f"projector_checkpoint={ckpt}", "from_scratch=False"], cwd=tmp_path
    )
    assert "was trained with LoRA adapters on the LLM" in proc.stderr + proc.stdout


def test_a_finished_run_resumed_is_left_as_it_is_and_a_new_run_in_its_folder_is_refused(
    tmp_path, tune, tune_in_process, stage1
):
    out = _stage2_dir(tmp_path, stage1, "done")
    args = [
        "run",
        "speechmapper_adapt",
        "--config",
        "tiny/stage2",
        f"output_dir={out}",
        "max_steps=2",
        "val_every_n_steps=0",
        "log_every_n_steps=1",
    ]
    tune(args, cwd=tmp_path)
    files = {p: p.read_bytes() for p in [out / "metrics.jsonl", *(out / "checkpoints").rglob("*")] if p.is_file()}
    proc = tune_in_process([*args, "resume=True"], tmp_path)
    assert proc.returncode == 0 and "nothing to do" in proc.stderr + proc.stdout
    proc = tune_in_process(args, tmp_path)  # resume=False into the same folder
    assert proc.returncode != 0
    assert "pass resume=True to continue that run, or choose a new output_dir" in proc.stderr
    assert "Loading frozen LLM" not in proc.stderr + proc.stdout  # refused before any work
    assert all(p.read_bytes() == b for p, b in files.items())
