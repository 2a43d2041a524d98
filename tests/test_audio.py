"""A user's audio: formats, rates and channels read the same; long recordings cut in their pauses."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import soxr

from speechmapper_tune.audio import AudioError, read_audio, split_at_pauses

SR = 16000


def _speech_like(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    return (
        0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.standard_normal(t.size)
    ).astype(np.float32)


@pytest.mark.parametrize(
    "fmt, ext, rate, channels",
    [("WAV", "wav", 16000, 1), ("FLAC", "flac", 44100, 2), ("OGG", "ogg", 22050, 1), ("MP3", "mp3", 48000, 2)],
)
def test_formats_rates_and_channels_give_16k_mono(tmp_path, fmt, ext, rate, channels):
    x = _speech_like(1.5, 0)
    data = soxr.resample(x, SR, rate)
    if channels == 2:
        data = np.stack([data, data], 1)
    path = tmp_path / f"a.{ext}"
    sf.write(path, data, rate, format=fmt)
    y = read_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1 and abs(y.size - x.size) <= SR * 0.06  # mp3 adds encoder padding
    if fmt in ("WAV", "FLAC"):  # lossless: the same signal back, up to resampling
        n = min(x.size, y.size)
        assert np.corrcoef(x[:n], y[:n])[0, 1] > 0.99


def test_bad_files_name_themselves(tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(AudioError, match="broken.wav: not a readable audio file"):
        read_audio(bad)
    with pytest.raises(AudioError, match="missing.flac: no such file"):
        read_audio(tmp_path / "missing.flac")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), SR)
    with pytest.raises(AudioError, match="empty.wav: no audio samples"):
        read_audio(tmp_path / "empty.wav")


def test_long_recordings_are_cut_in_the_pauses():
    gap = np.zeros(int(0.6 * SR), np.float32)
    parts = [_speech_like(s, i) for i, s in enumerate([4.0, 5.0, 3.0, 6.0, 4.5])]
    wave = np.concatenate([x for p in parts for x in (p, gap)])
    pauses, pos = [], 0
    for p in parts:
        pos += p.size
        pauses.append((pos, pos + gap.size))
        pos += gap.size
    segments = split_at_pauses(wave, max_seconds=10.0)
    assert len(segments) >= 3 and all(b - a <= 10 * SR for a, b in segments)
    for (_a, b), (c, _) in zip(segments, segments[1:]):
        assert b <= c and any(s <= b and c <= e for s, e in pauses), (b, c)  # each cut falls in a pause
    starts = [0] + [end for _, end in pauses[:-1]]
    speech = np.concatenate([np.arange(s, s + p.size) for p, s in zip(parts, starts)])
    kept = np.zeros(wave.size, bool)
    for a, b in segments:
        kept[a:b] = True
    assert kept[speech].all()  # no speech is lost, only silence at the edges


def test_short_audio_is_one_segment_and_silence_is_dropped():
    x = np.concatenate([np.zeros(SR, np.float32), _speech_like(3.0, 1), np.zeros(SR, np.float32)])
    ((a, b),) = split_at_pauses(x, max_seconds=10.0)
    assert 0.7 * SR <= a <= SR and 4 * SR <= b <= 4.3 * SR  # the silent edges go, a margin stays
    with pytest.raises(ValueError, match="segment bounds"):
        split_at_pauses(x, max_seconds=1.0, min_seconds=2.0)


def _truncated_wav(tmp_path, seconds=2.0, keep=0.5):
    path = tmp_path / "cut_short.wav"
    sf.write(path, _speech_like(seconds, 1), SR, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])  # as an interrupted copy leaves it
    return path


def test_a_truncated_wav_is_read_with_a_warning_naming_it(tmp_path):
    path = _truncated_wav(tmp_path)
    warnings = []
    y = read_audio(path, on_warning=warnings.append)
    assert abs(y.size - SR) <= 50  # the second it holds
    assert len(warnings) == 1 and str(path) in warnings[0] and "truncated" in warnings[0]
    assert "2.00 s" in warnings[0] and "1.00 s" in warnings[0]


def test_complete_and_streamed_wavs_read_without_warning(tmp_path):
    from speechmapper_tune.audio import wav_truncation

    path = tmp_path / "whole.wav"
    sf.write(path, _speech_like(1.0, 2), SR, subtype="PCM_16")
    warnings = []
    read_audio(path, on_warning=warnings.append)
    assert warnings == [] and wav_truncation(path) is None
    data = bytearray(path.read_bytes())
    at = data.index(b"data") + 4
    data[at : at + 4] = b"\xff\xff\xff\xff"  # a streamed recording's header leaves the size unset
    path.write_bytes(bytes(data))
    assert wav_truncation(path) is None
    flac = tmp_path / "a.flac"
    sf.write(flac, _speech_like(1.0, 2), SR, format="FLAC")
    assert wav_truncation(flac) is None
