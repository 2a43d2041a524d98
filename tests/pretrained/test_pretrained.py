import json

import pytest
import torch
from safetensors import safe_open

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
    out = pretrained.export_projector(folder, "demo_proj", provenance=notes, root=root)
    assert sorted(p.name for p in out.iterdir()) == ["PROVENANCE.md", "metrics.jsonl", "projector.safetensors",
                                                      "projector_config.json"]
    with safe_open(str(out / "projector.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    loaded, meta = load_projector(out)
    assert meta["step"] == 7 and meta["stage"] == 2 and meta["shipped"]["dtype"] == "fp16"
    x, lengths = torch.randn(2, 40, 16), torch.tensor([40, 25])
    model.eval(), loaded.eval()
    with torch.no_grad():
        (a, la), (b, lb) = model(x, lengths), loaded(x, lengths)
    assert torch.equal(la, lb)
    assert (a - b).abs().max() < 1e-2 * a.abs().max()  # fp16 rounding only
    # re-export replaces the folder in one swap, leaving no temporary folders behind
    pretrained.export_projector(folder, "demo_proj", root=root)
    assert sorted(p.name for p in root.iterdir()) == ["demo_proj"]
    assert not (root / "demo_proj" / "PROVENANCE.md").exists()


def test_unknown_shipped_name_lists_what_exists():
    with pytest.raises(FileNotFoundError, match="no shipped projector named 'nope'"):
        pretrained.shipped_projector("nope")
