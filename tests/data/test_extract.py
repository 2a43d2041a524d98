import numpy as np
import pytest
import soundfile as sf
from lhotse import MonoCut, Recording

from speechmapper_tune.data.extract import BadAudio, average_frames, load_cut_audio


def test_average_frames_by_hand():
    x = np.arange(10, dtype=np.float32).reshape(5, 2)  # rows (0,1) (2,3) (4,5) (6,7) (8,9)
    np.testing.assert_allclose(average_frames(x, 2), [[1, 2], [5, 6], [8, 9]])
    np.testing.assert_allclose(average_frames(x, 1), x)
    np.testing.assert_allclose(average_frames(x, 3), [[2, 3], [7, 8]])


def _cut(path, duration=None):
    rec = Recording.from_file(str(path))
    return MonoCut(id=rec.id, start=0.0, duration=duration or rec.duration, channel=0, recording=rec)


def test_stereo_8k_is_mixed_down_and_resampled(tmp_path):
    t = np.arange(8000) / 8000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 440 * t)], 1).astype(np.float32) * 0.5
    sf.write(tmp_path / "a.wav", stereo, 8000)
    audio = load_cut_audio(_cut(tmp_path / "a.wav"), max_duration=30)
    assert audio.dtype == np.float32 and abs(audio.size - 16000) <= 2
    assert 0.3 < np.abs(audio).max() < 0.6


def test_bad_audio_reasons(tmp_path):
    sf.write(tmp_path / "long.wav", np.zeros(16000 * 3, np.float32), 16000)
    with pytest.raises(BadAudio, match="too long"):
        load_cut_audio(_cut(tmp_path / "long.wav"), max_duration=2)
    nan = np.zeros(1600, np.float32)
    nan[5] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    with pytest.raises(BadAudio, match="NaN"):
        load_cut_audio(_cut(tmp_path / "nan.wav"), max_duration=30)
    good = _cut(tmp_path / "long.wav")
    (tmp_path / "long.wav").write_bytes(b"RIFF garbage")
    with pytest.raises(BadAudio, match="unreadable audio"):
        load_cut_audio(good, max_duration=30)


def test_truncated_wav_is_skipped_naming_the_file(tmp_path):
    path = tmp_path / "cut_short.wav"
    sf.write(path, np.full(16000 * 2, 0.1, np.float32), 16000, subtype="PCM_16")
    whole = _cut(path)  # a manifest made before the file was cut short
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadAudio, match=rf"truncated audio {path}: .*2.00 s.*1.00 s"):
        load_cut_audio(whole, max_duration=30)
    with pytest.raises(BadAudio, match=rf"truncated audio {path}"):  # a manifest made after: the header still tells
        load_cut_audio(_cut(path), max_duration=30)


def test_fewer_frames_than_the_cut_asks_for_is_a_skip(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, np.full(16000, 0.1, np.float32), 16000)
    long_cut = _cut(path, duration=2.0)  # the manifest says 2 s, the (complete) file holds 1 s
    with pytest.raises(BadAudio, match=rf"{path}: read 1.00 s of the 2.00 s"):
        load_cut_audio(long_cut, max_duration=30)


def _latin1_line(path, lineno, text):
    lines = path.read_bytes().split(b"\n")
    lines[lineno - 1] = lines[lineno - 1].replace(b'"hello"', f'"{text}"'.encode("latin-1"))
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize("lineno", [1, 2])
def test_a_non_utf8_byte_in_a_jsonl_audio_manifest_names_the_line(tmp_path, lineno):
    from speechmapper_tune.corpus import load_audio_manifest

    sf.write(tmp_path / "a.wav", np.zeros(1600, np.float32), 16000)
    manifest = tmp_path / "audio.jsonl"
    manifest.write_text(
        "".join(f'{{"id": "u{i}", "audio": "a.wav", "text": "hello"}}\n' for i in range(3)), encoding="utf-8"
    )
    _latin1_line(manifest, lineno, "caf\u00e9")
    with pytest.raises(ValueError, match=rf"{manifest}, line {lineno}: not UTF-8 text"):
        load_audio_manifest(manifest)


def test_a_non_utf8_byte_in_a_lhotse_audio_manifest_names_the_line(tmp_path):
    from lhotse import CutSet, SupervisionSegment

    from speechmapper_tune.corpus import load_audio_manifest

    sf.write(tmp_path / "a.wav", np.zeros(1600, np.float32), 16000)
    rec = Recording.from_file(str(tmp_path / "a.wav"))
    sup = lambda i: SupervisionSegment(id=f"u{i}", recording_id=rec.id, start=0, duration=0.1, text="hello")
    cuts = CutSet.from_cuts(
        [MonoCut(id=f"u{i}", start=0, duration=0.1, channel=0, recording=rec, supervisions=[sup(i)]) for i in range(3)]
    )
    manifest = tmp_path / "cuts.jsonl"
    cuts.to_file(str(manifest))
    _latin1_line(manifest, 3, "caf\u00e9")
    with pytest.raises(ValueError, match=rf"{manifest}, line 3: not UTF-8 text"):
        load_audio_manifest(manifest)
