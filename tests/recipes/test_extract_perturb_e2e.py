"""`tune run speechmapper_extract` with perturbed copies, on real Whisper tiny.en weights."""

import json

import numpy as np
import pytest
import soundfile as sf
from documented_variants import variant_args

from speechmapper_tune.data import iter_features
from speechmapper_tune.data.manifest import load_feature_items

pytestmark = pytest.mark.e2e


def test_extract_with_perturbed_copies_resumes_to_the_same_features(tmp_path, tune, tune_in_process):
    rows = []
    for i, sec in enumerate([1.0, 1.6]):
        t = np.arange(int(16000 * sec)) / 16000
        sf.write(tmp_path / f"u{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 80 * i) * t)).astype(np.float32), 16000)
        rows.append({"id": f"u{i}", "audio": f"u{i}.wav", "text": f"Utterance number {i}."})
    manifest = tmp_path / "in.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "feats"
    args = [
        "run",
        "speechmapper_extract",
        *variant_args("features/whisper_tiny_en"),
        f"manifest={manifest}",
        f"output_dir={out}",
        "shard_size=4",
        "sfm.window=trimmed",
        "perturb.speeds=[0.9,1.1]",
        "perturb.noise_snr_db=[null,20]",
        "perturb.noise=pink",
    ]
    proc = tune(args, cwd=tmp_path)
    assert "2 utterances + 8 perturbed copies in 3 chunks" in proc.stderr + proc.stdout
    items = {it.id: it for it in load_feature_items(out / "cuts.jsonl.gz")}
    suffixes = ["", "_sp0.9", "_sp0.9_snr20", "_sp1.1", "_sp1.1_snr20"]
    assert list(items) == [f"u{i}{s}" for i in range(2) for s in suffixes]
    assert all(it.written == f"Utterance number {it.id[1]}." for it in items.values())
    for i, sec in enumerate([1.0, 1.6]):  # 25 frames per second of (perturbed) audio
        for s, speed in (("", 1.0), ("_sp0.9", 0.9), ("_sp1.1", 1.1), ("_sp1.1_snr20", 1.1)):
            assert abs(items[f"u{i}{s}"].num_frames - 25 * sec / speed) <= 1
    info = json.loads((out / "extract_info.json").read_text())
    assert [p["speed"] for p in info["perturbations"]] == [0.9, 0.9, 1.1, 1.1] and "perturb" not in info["features"]
    before = dict(iter_features(out / "cuts.jsonl.gz"))
    (out / "shards" / "cuts-00001.jsonl.gz").unlink()  # as if killed during chunk 1
    tune(args, cwd=tmp_path)
    after = dict(iter_features(out / "cuts.jsonl.gz"))
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    proc = tune_in_process(args[:-3], tmp_path)  # the same folder without perturbation: refused
    assert proc.returncode != 0 and "extracted with" in proc.stderr
