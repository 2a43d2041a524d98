"""load_audio_manifest: lhotse CutSet, RecordingSet+SupervisionSet, JSON lines, LibriSpeech folder."""

import json

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

from speechmapper_tune.corpus.manifest_io import load_audio_manifest

SR = 16000


def tone(path, seconds, fmt=None):
    t = np.arange(int(SR * seconds)) / SR
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), SR, format=fmt)
    return path


@pytest.fixture
def wavs(tmp_path):
    (tmp_path / "wav").mkdir()
    return [tone(tmp_path / "wav" / "a.wav", 1.0), tone(tmp_path / "wav" / "b.wav", 0.5)]


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_plain_jsonl_relative_paths_and_custom_fields(tmp_path, wavs):
    manifest = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"id": "u1", "audio": "wav/a.wav", "text": "hello world", "lang": "en", "voice": "flite:slt"},
            "",
            {"id": "u2", "audio": str(wavs[1]), "text": "second one", "duration": 9.9},
        ],
    )
    cuts = load_audio_manifest(manifest)
    assert [c.id for c in cuts] == ["u1", "u2"]
    assert cuts["u1"].duration == pytest.approx(1.0) and cuts["u2"].duration == pytest.approx(0.5)
    sup1, sup2 = cuts["u1"].supervisions[0], cuts["u2"].supervisions[0]
    assert (sup1.text, sup1.language, sup1.custom) == ("hello world", "en", {"voice": "flite:slt"})
    assert sup2.language is None and cuts["u1"].load_audio().shape == (1, SR)


@pytest.mark.parametrize(
    "row, message",
    [
        ("{not json", "line 2: invalid JSON"),
        ('["a list"]', "line 2: expected a JSON object"),
        ({"id": "u2", "text": "no audio"}, "line 2: field 'audio'"),
        ({"id": "u1", "audio": "wav/b.wav", "text": "x"}, "line 2: id 'u1' already used on line 1"),
        ({"id": "u2", "audio": "wav/b.wav", "text": "x", "lang": 3}, "line 2: field 'lang'"),
    ],
)
def test_plain_jsonl_errors_name_file_and_line(tmp_path, wavs, row, message):
    manifest = write_jsonl(tmp_path / "bad.jsonl", [{"id": "u1", "audio": "wav/a.wav", "text": "ok"}, row])
    with pytest.raises(ValueError, match=f"bad.jsonl, {message}"):
        load_audio_manifest(manifest)


def test_missing_or_unreadable_audio_is_flagged_per_item_not_fatal(tmp_path, wavs):
    (tmp_path / "wav" / "junk.wav").write_bytes(b"not audio")
    manifest = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"id": "u1", "audio": "wav/a.wav", "text": "ok"},
            {"id": "u2", "audio": "wav/missing.wav", "text": "x"},
            {"id": "u3", "audio": "wav/junk.wav", "text": "y"},
        ],
    )
    cuts = {c.id: c for c in load_audio_manifest(manifest)}
    assert not (cuts["u1"].supervisions[0].custom or {}).get("audio_error")
    assert "missing.wav does not exist" in cuts["u2"].supervisions[0].custom["audio_error"]
    assert "unreadable audio" in cuts["u3"].supervisions[0].custom["audio_error"]


def lhotse_sets(wavs):
    recs = RecordingSet.from_recordings(Recording.from_file(w, recording_id=w.stem) for w in wavs)
    sups = SupervisionSet.from_segments(
        SupervisionSegment(id=r.id, recording_id=r.id, start=0, duration=r.duration, text=f"text {r.id}") for r in recs
    )
    return recs, sups


def test_lhotse_cutset(tmp_path, wavs):
    recs, sups = lhotse_sets(wavs)
    CutSet.from_manifests(recordings=recs, supervisions=sups).to_file(tmp_path / "cuts.jsonl.gz")
    cuts = load_audio_manifest(tmp_path / "cuts.jsonl.gz")
    assert sorted(c.supervisions[0].text for c in cuts) == ["text a", "text b"]


def test_lhotse_recordings_plus_supervisions(tmp_path, wavs):
    recs, sups = lhotse_sets(wavs)
    recs.to_file(tmp_path / "x_recordings_dev.jsonl.gz")
    sups.to_file(tmp_path / "x_supervisions_dev.jsonl.gz")
    explicit = load_audio_manifest(
        tmp_path / "x_supervisions_dev.jsonl.gz", supervisions=tmp_path / "x_recordings_dev.jsonl.gz"
    )
    sibling = load_audio_manifest(tmp_path / "x_recordings_dev.jsonl.gz")
    for cuts in (explicit, sibling):
        assert sorted((c.id, c.supervisions[0].text) for c in cuts) == [("a", "text a"), ("b", "text b")]
    recs.to_file(tmp_path / "lonely.jsonl.gz")
    with pytest.raises(ValueError, match="lonely.jsonl.gz holds a RecordingSet"):
        load_audio_manifest(tmp_path / "lonely.jsonl.gz")


def librispeech(root):
    chapter = root / "dev-clean" / "84" / "121123"
    chapter.mkdir(parents=True)
    tone(chapter / "84-121123-0000.flac", 0.8, "FLAC")
    tone(chapter / "84-121123-0001.flac", 0.4, "FLAC")
    (chapter / "84-121123.trans.txt").write_text("84-121123-0000 GO DO YOU HEAR\n84-121123-0001 BUT IN LESS\n")
    return root


def test_librispeech_root_and_part_folder(tmp_path):
    root = librispeech(tmp_path / "LibriSpeech")
    for folder in (root, root / "dev-clean"):
        cuts = load_audio_manifest(folder)
        assert sorted((c.id, c.supervisions[0].text, c.supervisions[0].language) for c in cuts) == [
            ("84-121123-0000", "GO DO YOU HEAR", "en"),
            ("84-121123-0001", "BUT IN LESS", "en"),
        ]
        assert cuts["84-121123-0001"].duration == pytest.approx(0.4)


def test_unknown_inputs(tmp_path):
    with pytest.raises(ValueError, match="not a LibriSpeech-style folder"):
        load_audio_manifest(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_audio_manifest(tmp_path / "nope.jsonl")
    (tmp_path / "junk.txt").write_text("hello\n")
    with pytest.raises(ValueError, match="junk.txt is neither a lhotse manifest"):
        load_audio_manifest(tmp_path / "junk.txt")
