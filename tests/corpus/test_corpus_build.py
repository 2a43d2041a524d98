"""A real build through the library (every installed engine), resume, and the recipe CLI."""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
from corpus_helpers import needs, plain_sentences, write_wordnet
from documented_variants import fixture_config
from lhotse import CutSet, load_manifest

from speechmapper_tune.corpus import CorpusSettings, build_corpus, load_audio_manifest

REPO = Path(__file__).resolve().parents[2]
ALL_TRAIN = ["espeak-ng:en-us+m3", "flite:kal", "festival:voice_kal_diphone"]
ALL_TEST = ["flite:slt", "espeak-ng:en-us+f5", "festival:voice_cmu_us_slt_arctic_hts"]
PROGRAMS = {"espeak-ng": "espeak-ng", "flite": "flite", "festival": "festival"}


def installed(voices):
    return [v for v in voices if shutil.which(PROGRAMS[v.split(":")[0]])]


def tiny_settings(tmp_path, num_workers=0):
    """Two sentences per train voice, one per dev/test voice, on a fake WordNet."""
    train, test = installed(ALL_TRAIN), installed(ALL_TEST)
    if not train or not test:
        pytest.skip("no TTS engine installed (apt-get install espeak-ng flite festival ...)")
    wordnet = write_wordnet(tmp_path / "wordnet", plain_sentences(40))
    return CorpusSettings.from_dict(
        {
            "output_dir": str(tmp_path / "corpus"),
            "seed": 1,
            "num_workers": num_workers,
            "chunk_size": 2,
            "progress": False,
            "wordnet_dir": str(wordnet),
            "splits": {
                "train": {"sentences": 2 * len(train), "voices": train},
                "dev": {"sentences": len(train)},
                "test": {"sentences": len(test), "voices": test},
            },
        }
    )


def test_build_manifests_and_resume(tmp_path):
    settings = tiny_settings(tmp_path, num_workers=2)
    out = Path(settings.output_dir)
    stale = out / "audio" / "train" / ".left.wav.123.tmp"  # what a killed run leaves
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    result = build_corpus(settings)
    n = sum(len(u) for u in result.plan.values())
    assert result.report.synthesized == n and not result.report.failed
    assert not stale.exists()

    for split, utts in result.plan.items():
        cuts = load_manifest(out / "manifests" / f"cuts_{split}.jsonl.gz")
        assert isinstance(cuts, CutSet) and len(cuts) == len(utts)
        rows = [json.loads(line) for line in (out / "manifests" / f"{split}.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == [c.id for c in cuts]
        for cut, row, utt in zip(cuts, rows, utts):
            sup = cut.supervisions[0]
            assert sup.text == utt.text == row["text"] and sup.language == "en"
            assert sup.custom["engine"] == row["engine"] == utt.voice.engine
            assert sup.custom["voice"] == row["voice"] and sup.custom["split"] == split == row["split"]
            assert sup.custom["written"] == utt.tts_text  # the text as read: written-form targets
            info = sf.info(str(out / "manifests" / row["audio"]))
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert abs(info.duration - cut.duration) < 1e-6 and 0.5 < cut.duration < 10
            assert cut.load_audio().shape == (1, cut.num_samples)
        # Both manifests read back through load_audio_manifest (the mirror by relative paths).
        mirror = load_audio_manifest(out / "manifests" / f"{split}.jsonl")
        assert [c.id for c in mirror] == [c.id for c in cuts]
        assert [c.supervisions[0].custom["voice"] for c in mirror] == [u.voice.spec for u in utts]
        assert len(load_audio_manifest(out / "manifests" / f"cuts_{split}.jsonl.gz")) == len(utts)
    engines = {u.voice.engine for utts in result.plan.values() for u in utts}
    assert engines == {v.split(":")[0] for v in installed(ALL_TRAIN + ALL_TEST)}
    info = json.loads((out / "corpus_info.json").read_text())
    assert info["splits"]["test"]["utterances"] == len(result.plan["test"])

    # Resume: nothing new; then a deleted and a truncated wav are made again.
    settings.num_workers = 0
    again = build_corpus(settings)
    assert (again.report.synthesized, again.report.skipped_existing) == (0, n)
    first, second = result.plan["train"][0], result.plan["dev"][0]
    (out / first.audio_relpath).unlink()
    data = (out / second.audio_relpath).read_bytes()
    (out / second.audio_relpath).write_bytes(data[: len(data) // 2])
    third = build_corpus(settings)
    assert (third.report.synthesized, third.report.skipped_existing) == (2, n - 2)
    assert (out / second.audio_relpath).read_bytes() == data  # same request, same audio


@pytest.mark.e2e
@needs("espeak-ng", "flite", "festival")
def test_recipe_cli_tiny_config(tmp_path):
    if not Path("/usr/share/wordnet/data.noun").is_file():
        pytest.skip("wordnet-base not installed")
    out = tmp_path / "tiny"
    cmd = [
        sys.executable,
        "recipes/speechmapper_corpus.py",
        "--config",
        fixture_config("corpus/tts_en_tiny"),
        f"output_dir={out}",
        "engines.flite.binary=no-such-flite",
    ]
    proc = subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no-such-flite" in proc.stderr  # the flite voices were skipped with a warning
    rows = {}
    for split in ("train", "dev", "test"):
        with gzip.open(out / "manifests" / f"cuts_{split}.jsonl.gz", "rt") as f:
            rows[split] = [json.loads(line) for line in f]
    assert len(rows["train"]) == 6 and len(rows["dev"]) == 3 and len(rows["test"]) == 3
    engines = {r["supervisions"][0]["custom"]["engine"] for split in rows.values() for r in split}
    assert engines == {"espeak-ng", "festival"}
