"""`tune run speechmapper_extract` on real Whisper tiny.en weights, with bad items and a resume."""

import json

import numpy as np
import pytest
import soundfile as sf
from documented_variants import variant_args

from speechmapper_tune.data import iter_features

pytestmark = pytest.mark.e2e


def _write_manifest(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i, sec in enumerate([1.0, 2.5, 1.7]):
        t = np.arange(int(16000 * sec)) / 16000
        wave = (0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.01 * rng.normal(size=t.size)).astype(np.float32)
        sf.write(tmp_path / f"ok{i}.wav", wave, 16000)
        rows.append({"id": f"ok{i}", "audio": f"ok{i}.wav", "text": f"utterance number {i}"})
    (tmp_path / "broken.wav").write_bytes(b"not a wav file")
    rows.append({"id": "broken", "audio": "broken.wav", "text": "x"})
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    rows.append({"id": "empty", "audio": "empty.wav", "text": "y"})
    sf.write(tmp_path / "long.wav", np.zeros(16000 * 40, np.float32), 16000)
    rows.append({"id": "long", "audio": "long.wav", "text": "z"})
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_extract_skips_bad_audio_and_resumes(tmp_path, tune):
    manifest = _write_manifest(tmp_path)
    out = tmp_path / "feats"
    args = [
        "run",
        "speechmapper_extract",
        *variant_args("features/whisper_tiny_en"),
        f"manifest={manifest}",
        f"output_dir={out}",
        "shard_size=2",
    ]
    tune(args, cwd=tmp_path)
    feats = dict(iter_features(out / "cuts.jsonl.gz"))
    assert sorted(feats) == ["ok0", "ok1", "ok2"]
    # 50 frames/s averaged by 2: 25 frames per second of audio
    assert [feats[k].shape for k in ("ok0", "ok1", "ok2")] == [(25, 384), (63, 384), (43, 384)]
    failures = {json.loads(l)["id"]: json.loads(l)["reason"] for l in (out / "failures.jsonl").read_text().splitlines()}
    assert set(failures) == {"broken", "empty", "long"}
    assert "unreadable" in failures["broken"] and "empty" in failures["empty"] and "too long" in failures["long"]
    first = (out / "shards" / "feats-00000.safetensors").stat().st_mtime_ns
    proc = tune(args, cwd=tmp_path)  # every chunk done: nothing recomputed, encoder not even loaded
    assert "3 chunks already done" in proc.stderr + proc.stdout
    assert (out / "shards" / "feats-00000.safetensors").stat().st_mtime_ns == first
    (out / "shards" / "cuts-00001.jsonl.gz").unlink()  # as if killed during chunk 1
    tune(args, cwd=tmp_path)
    assert sorted(dict(iter_features(out / "cuts.jsonl.gz"))) == ["ok0", "ok1", "ok2"]


def test_extract_shards_chunks_across_two_ranks(tmp_path, tune):
    manifest = _write_manifest(tmp_path)
    out = tmp_path / "ddp"
    tune(
        [
            "run",
            "--nproc_per_node",
            "2",
            "speechmapper_extract",
            *variant_args("features/whisper_tiny_en"),
            f"manifest={manifest}",
            f"output_dir={out}",
            "shard_size=1",
        ],
        cwd=tmp_path,
    )
    assert sorted(dict(iter_features(out / "cuts.jsonl.gz"))) == ["ok0", "ok1", "ok2"]
    assert len(list((out / "shards").glob("cuts-*.jsonl.gz"))) == 6  # one chunk per item, split over the ranks
    failures = [json.loads(l)["id"] for l in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(failures) == ["broken", "empty", "long"]
