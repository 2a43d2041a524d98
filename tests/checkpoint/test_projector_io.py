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
