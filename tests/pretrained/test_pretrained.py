import json
import re

import pytest
import torch
from safetensors import safe_open
from tolerances import rel_diff

from speechmapper_tune import pretrained
from speechmapper_tune.checkpoint.projector_io import CheckpointManager, load_projector
from speechmapper_tune.models.projector import speechmapper_tiny


def _run(tmp_path):
    torch.manual_seed(0)
    model = speechmapper_tiny()
    run = tmp_path / "run"
    folder = CheckpointManager(run).save(7, model, {"stage": 2, "llm": {"dim": 32}}, {"step": 7})
    (run / "metrics.jsonl").write_text(json.dumps({"step": 7, "val_ce": 1.5}) + "\n")
    return model, folder


def test_export_writes_fp16_weights_config_curve_and_provenance(tmp_path):
    model, folder = _run(tmp_path)
    notes = tmp_path / "notes.md"
    notes.write_text("tune run speechmapper_adapt --config x\n")
    root = tmp_path / "shipped"
    out = pretrained.export_projector(folder, "demo_proj", provenance=notes, root=root, summary="measured: 1% WER")
    assert sorted(p.name for p in out.iterdir()) == [
        "PROVENANCE.md",
        "metrics.jsonl",
        "projector.safetensors",
        "projector_config.json",
    ]
    with safe_open(str(out / "projector.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    loaded, meta = load_projector(out)
    assert meta["step"] == 7 and meta["stage"] == 2 and meta["shipped"]["dtype"] == "fp16"
    assert meta["shipped"]["summary"] == "measured: 1% WER"
    x, lengths = torch.randn(2, 40, 16), torch.tensor([40, 25])
    model.eval(), loaded.eval()
    with torch.no_grad():
        (a, la), (b, lb) = model(x, lengths), loaded(x, lengths)
    assert torch.equal(la, lb)
    assert rel_diff(b, a) < 1e-2  # fp16 weights: rounding only
    # re-export replaces the folder in one swap, leaving no temporary folders behind
    pretrained.export_projector(folder, "demo_proj", root=root)
    assert sorted(p.name for p in root.iterdir()) == ["demo_proj"]
    assert not (root / "demo_proj" / "PROVENANCE.md").exists()


def test_export_carries_the_lora_adapters_in_fp16(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    meta = {"stage": 2, "llm": {"dim": 32}, "lora": {"rank": 4}}
    folder = CheckpointManager(tmp_path / "run").save(3, speechmapper_tiny(), meta, {"step": 3})
    adapters = {
        "layers.0.attn.q_proj.lora_a.weight": torch.randn(4, 32),
        "layers.0.attn.q_proj.lora_b.weight": torch.randn(32, 4),
    }
    save_file(adapters, str(folder / "lora_adapters.safetensors"))
    out = pretrained.export_projector(folder, "lora_proj", root=tmp_path / "shipped")
    shipped = load_file(str(out / "lora_adapters.safetensors"))
    assert shipped.keys() == adapters.keys()
    for k, v in adapters.items():
        assert (
            shipped[k].dtype == torch.float16 and rel_diff(shipped[k].float(), v) <= 1e-3
        )  # fp16: half an ulp is 4.9e-4 of the largest value
    (folder / "lora_adapters.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="trained with LoRA adapters but has no lora_adapters.safetensors"):
        pretrained.export_projector(folder, "lora_proj2", root=tmp_path / "shipped")


def test_unknown_shipped_name_lists_what_exists():
    with pytest.raises(FileNotFoundError, match="no shipped projector named 'nope'"):
        pretrained.shipped_projector("nope")


COMMANDS = {
    "smollm2_135m_whisper_base_stage1": "speechmapper_pretrain --config smollm2_135M/stage1_full",
    "smollm2_135m_whisper_base_stage2": "speechmapper_adapt --config smollm2_135M/stage2_self_ce",
    "smollm2_135m_whisper_base_stage2_asr": "speechmapper_adapt --config smollm2_135M/stage2_asr_full",
    "smollm2_135m_whisper_base_stage2_asr_lora": "speechmapper_adapt --config smollm2_135M/stage2_asr_full",
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_shipped_projectors_load_and_say_how_they_were_made(name):
    assert name in pretrained.available()
    folder = pretrained.shipped_projector(name)
    model, meta = load_projector(folder)
    cfg = meta["projector"]
    assert (cfg["input_dim"], cfg["output_dim"]) == (512, 576)  # Whisper base -> SmolLM2-135M
    assert meta["llm"]["dim"] == 576 and meta["llm"]["pad_id"] == 16 and meta["shipped"]["dtype"] == "fp16"
    provenance = (pretrained.ROOT / name / "PROVENANCE.md").read_text()
    assert f"tune run {COMMANDS[name]}" in provenance
    assert re.match(r"measured: .*\d%", meta["shipped"]["summary"])  # what `speechmapper list` says it does
    curve = [json.loads(l) for l in (pretrained.ROOT / name / "metrics.jsonl").read_text().splitlines()]
    assert curve[-1]["step"] == meta["step"]
    x = torch.randn(1, 100, 512)
    with torch.no_grad():
        out, n = model.eval()(x, torch.tensor([100]))
    assert out.shape == (1, int(n), 576) and torch.isfinite(out).all()


def test_shipped_stage2_projectors_record_the_prompt_they_were_trained_with():
    from speechmapper_tune.demo import _trained_prefix

    _, meta = load_projector(pretrained.shipped_projector("smollm2_135m_whisper_base_stage2_asr"))
    assert meta["sigma"] == 0.0 and meta["prompt"]["assistant_prefix"] == "Transcript:"
    assert _trained_prefix(pretrained.shipped_projector("smollm2_135m_whisper_base_stage2_asr")) == "Transcript:"
    assert _trained_prefix(pretrained.shipped_projector("smollm2_135m_whisper_base_stage2")) == ""


def test_shipped_lora_specialist_carries_adapters_that_fit_smollm2():
    from safetensors.torch import load_file

    from speechmapper_tune.checkpoint.projector_io import lora_weights_file

    folder = pretrained.shipped_projector("smollm2_135m_whisper_base_stage2_asr_lora")
    _, meta = load_projector(folder)
    assert meta["lora"] == {
        "alpha": 16,
        "apply_to_mlp": False,
        "attn_modules": ["q_proj", "v_proj"],
        "dropout": 0.0,
        "rank": 8,
    }
    adapters = load_file(str(lora_weights_file(folder)))
    # SmolLM2-135M: 30 layers; q 576 -> 576, v 576 -> 192 (3 KV heads of 64); rank 8
    assert len(adapters) == 30 * 2 * 2 and {v.dtype for v in adapters.values()} == {torch.float16}
    assert adapters["layers.0.attn.q_proj.lora_a.weight"].shape == (8, 576)
    assert adapters["layers.0.attn.v_proj.lora_b.weight"].shape == (192, 8)
    assert all(torch.isfinite(v).all() for v in adapters.values())
    assert any(
        k.endswith("lora_b.weight") and v.abs().sum() > 0 for k, v in adapters.items()
    )  # trained, not the zero init
