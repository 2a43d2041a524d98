"""`tune run --nproc_per_node 2 speechmapper_adapt` (FSDP2 on gloo) against one process on tiny/stage2.

Two ranks with gradient_accumulation_steps=1 take, step for step, the batches one process takes with
gradient_accumulation_steps=2 (rank r reads every 2nd batch), and their averaged gradients are the
one-process accumulated ones, so the losses agree up to summation order; resuming a 2-process run
gives the uninterrupted run's losses. The projector has no dropout here: its random masks come from
each process's own generator, so they would differ between the 1- and 2-process runs.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tolerances import FP32_SHALLOW, assert_close_to_scale

from speechmapper_tune.checkpoint.projector_io import load_projector
from speechmapper_tune.data.features import SafetensorsShardWriter, read_feature_array
from speechmapper_tune.data.manifest import load_feature_items
from speechmapper_tune.data.sampler import ShuffledBatchSampler
from speechmapper_tune.data.synthetic import prepare_tiny_stage1

pytestmark = pytest.mark.e2e
LORA = "lora={rank: 4, alpha: 8, dropout: 0.0, attn_modules: [q_proj, v_proj], apply_to_mlp: True}"
COMMON = [
    "--config",
    "tiny/stage2",
    "model.dropout=0.0",
    "batch_size=6",
    "max_steps=4",
    "log_every_n_steps=1",
    "val_every_n_steps=0",
    "save_every_n_steps=2",
    "loss.sigma=0.5",
]
FIELDS = ("loss", "ce", "mse", "grad_norm")


def _adapt(tune, out, *extra, nproc=1, items_per_step=12):
    launch = ["run", "--nproc_per_node", str(nproc)] if nproc > 1 else ["run"]
    accum = f"gradient_accumulation_steps={items_per_step // (6 * nproc)}"  # the same items a step either way
    return tune(
        [*launch, "speechmapper_adapt", *COMMON, accum, f"output_dir={out}", *extra], cwd=out.parent, timeout=300
    )


def _rows(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def _first_step(out):
    """The first training step's row (a step-0 validation row may come before it)."""
    return next(r for r in _rows(out) if "ce" in r)


def _assert_same_curves(actual, expected):
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for k in FIELDS + ("val_loss", "val_ce", "val_mse"):
        a = [r[k] for r in actual if k in r]
        e = [r[k] for r in expected if k in r]
        assert len(a) == len(e) > 0, k
        # fp32 through 2 layers, gradients summed in another order (reduce-scatter): relative to each curve's scale
        assert_close_to_scale(torch.tensor(a), torch.tensor(e), FP32_SHALLOW, k)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, tune):
    """One process, and two processes with activation checkpointing (same values, recomputed), LoRA on."""
    root = tmp_path_factory.mktemp("dist_lora")
    _adapt(tune, root / "one", LORA)
    proc = _adapt(tune, root / "two", LORA, "enable_activation_checkpointing=True", nproc=2)
    return root, proc.stdout + proc.stderr


def test_two_processes_match_one_without_lora(tmp_path, tune):
    """Each rank accumulates 2 micro-batches (gradients reduced once, after the second), as one process does 4."""
    _adapt(tune, tmp_path / "one", items_per_step=24)
    proc = _adapt(tune, tmp_path / "two", nproc=2, items_per_step=24)
    assert "FSDP: the SpeechLM sharded over 2 ranks" in proc.stdout + proc.stderr
    _assert_same_curves(_rows(tmp_path / "two"), _rows(tmp_path / "one"))
    one, _ = load_projector(tmp_path / "one" / "checkpoints" / "step_4")
    two, _ = load_projector(tmp_path / "two" / "checkpoints" / "step_4")  # full tensors, the one-process format
    for (name, a), b in zip(one.state_dict().items(), two.state_dict().values()):
        # Adam divides by sqrt(v): a near-zero gradient's rounding moves a weight by up to lr, hence the tensor's own scale x lr
        assert_close_to_scale(b, a, 1e-3, name)


def test_two_processes_match_one_with_lora(lora_runs):
    root, log = lora_runs
    assert "FSDP: the SpeechLM sharded over 2 ranks" in log
    _assert_same_curves(_rows(root / "two"), _rows(root / "one"))
    a = load_file(str(root / "one" / "checkpoints" / "step_4" / "lora_adapters.safetensors"))
    b = load_file(str(root / "two" / "checkpoints" / "step_4" / "lora_adapters.safetensors"))
    assert sorted(a) == sorted(b)  # same names: no activation-checkpoint wrapper, no shard in them
    for k in a:
        assert b[k].shape == a[k].shape
        assert_close_to_scale(b[k], a[k], 1e-3, k)
    state = torch.load(root / "two" / "checkpoints" / "step_4" / "recipe_state.pt", weights_only=True)
    ref = torch.load(root / "one" / "checkpoints" / "step_4" / "recipe_state.pt", weights_only=True)
    assert [s["exp_avg"].shape for s in state["optimizer"]["state"].values()] == [
        s["exp_avg"].shape for s in ref["optimizer"]["state"].values()
    ]  # optimizer state gathered whole


def test_two_process_resume_matches_uninterrupted(lora_runs, tune):
    """The 2-process run as if killed after its step-2 checkpoint: resumed, it logs the uninterrupted steps 3-4."""
    root, _ = lora_runs
    part = root / "part"
    shutil.copytree(root / "two", part)
    shutil.rmtree(part / "checkpoints" / "step_4")
    (part / "checkpoints" / "latest").write_text("step_2")
    (part / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(part) if r["step"] <= 2))
    _adapt(tune, part, LORA, "enable_activation_checkpointing=True", "resume=True", nproc=2)
    _assert_same_curves(_rows(part), _rows(root / "two"))


def test_ranks_read_the_one_process_global_batch():
    """Rank r's k-th batch of B, over N ranks, together make the one-process k-th batch of N*B."""
    one = ShuffledBatchSampler(400, 12, seed=3).epoch_batches(1)
    ranks = [ShuffledBatchSampler(400, 6, seed=3, rank=r, world_size=2).epoch_batches(1) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for k, batch in enumerate(one):
        assert ranks[0][k] + ranks[1][k] == batch


def test_a_batch_one_rank_cannot_load_is_passed_over_by_both(tmp_path, tune):
    """Rank 1's first batch holds only unreadable (NaN) items: both ranks pass over that micro-batch
    (rank 0 alone would wait in FSDP's all-gather for ever) and the run goes on."""
    out = tmp_path / "run"
    data = prepare_tiny_stage1(
        str(out / "data"), feature_dim=16, llm_dim=32, num_train=400, num_val=40
    )  # as tiny/stage2
    items = load_feature_items(data["train_manifest"])
    bad = {items[i].id for i in ShuffledBatchSampler(len(items), 6, seed=0, rank=1, world_size=2).epoch_batches(0)[0]}
    writer = SafetensorsShardWriter(items[0].storage_path)
    for it in items:
        frames = read_feature_array(it.storage_type, it.storage_path, it.storage_key)
        writer.write(it.storage_key, np.full_like(frames, np.nan) if it.id in bad else frames)
    writer.close()
    proc = _adapt(tune, out, "max_steps=3", "save_every_n_steps=0", nproc=2)
    log = proc.stdout + proc.stderr
    assert all(f"skipping {i}" in log for i in bad)
    state = torch.load(out / "checkpoints" / "step_3" / "recipe_state.pt", weights_only=True)
    assert state["sampler"]["consumed"] == 4  # rank 0 read 4 batches for 3 steps: it passed over its first one too


def test_nf4_llm_two_processes_match_one(lora_runs, tune):
    """llm.quantize=nf4: the frozen layer weights held in 4-bit NormalFloat (torchao), quantized the same way
    whatever the number of ranks, so 2 sharded processes again take one process's steps."""
    root, _ = lora_runs
    one, two = root / "nf4_one", root / "nf4_two"
    _adapt(tune, one, LORA, "llm.quantize=nf4", "max_steps=2")
    proc = _adapt(tune, two, LORA, "llm.quantize=nf4", "max_steps=2", nproc=2)
    assert "NF4: 14 frozen LLM weights quantized" in proc.stdout + proc.stderr  # 7 projections x 2 layers
    _assert_same_curves(_rows(two), _rows(one))
    plain = _first_step(root / "one")["ce"]  # the same first batch through the unquantized LLM
    assert abs(_first_step(one)["ce"] - plain) > 1e-3 * plain  # quantization changed the weights (measured: 5e-3 of CE)
    assert json.loads((two / "checkpoints" / "step_2" / "projector_config.json").read_text())["llm_quantize"] == "nf4"
