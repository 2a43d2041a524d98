"""Speech found by Silero VAD: every sentence of a long recording kept, no pieces from silence, noise or clicks.

Real speech only: espeak-ng sentences joined with pauses, LibriVox words and clips. The rule for "no speech
dropped": every sample of every sentence's audible span (|x| above 1% of its peak) lies in some piece.
"""

from __future__ import annotations

import glob
import io
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
import soxr

from speechmapper_tune.audio import segment_recording
from speechmapper_tune.vad import MIN_SPEECH_S, SHORT_PIECE_S, speech_segments

SR = 16000
LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"
SENTENCES = [
    "The old lighthouse keeper climbed the stairs every evening.",
    "Rain fell softly on the roof of the station.",
    "She opened the letter and read it twice before answering.",
    "Yes.",
    "Our train leaves the city at seven in the morning, and it reaches the coast before noon on most days.",
    "He forgot his umbrella again.",
    "The children counted the boats in the harbour.",
    "A cold wind blew across the empty field.",
]
PAUSES = [0.35, 1.2, 0.5, 0.8, 2.0, 0.4, 0.9]  # between sentences: from a short breath to a long silence


def _espeak(text: str, voice: str = "en-us", speed: int = 160) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed (make sysdeps)")
    raw = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text], capture_output=True, check=True
    ).stdout
    x, sr = sf.read(io.BytesIO(raw), dtype="float32")
    return soxr.resample(x, sr, SR).astype(np.float32)


def _audible(x: np.ndarray):
    loud = np.nonzero(np.abs(x) > 0.01 * np.abs(x).max())[0]
    return int(loud[0]), int(loud[-1]) + 1


@pytest.fixture(scope="module")
def joined():
    """The sentences joined with pauses (speech trimmed to its audible span), and each sentence's span in it."""
    parts, spans, pos = [], [], 0
    for i, text in enumerate(SENTENCES):
        x = _espeak(text, "en-us+m3" if i % 2 else "en-gb+f2")
        a, b = _audible(x)
        x = x[a:b]
        parts.append(x)
        spans.append((pos, pos + x.size))
        pos += x.size
        if i < len(PAUSES):
            parts.append(np.zeros(int(PAUSES[i] * SR), np.float32))
            pos += parts[-1].size
    return np.concatenate(parts), spans


def _covered(segments, n):
    kept = np.zeros(n, bool)
    for a, b in segments:
        kept[a:b] = True
    return kept


@pytest.mark.parametrize("max_seconds", [10.0, 4.0])
def test_every_sentence_is_kept_in_pieces_within_the_limit(joined, max_seconds):
    wave, spans = joined
    segments = speech_segments(wave, max_seconds)
    assert all(0 < b - a <= max_seconds * SR for a, b in segments)
    assert all(b <= c for (_, b), (c, _) in zip(segments, segments[1:]))  # in order, not overlapping
    kept = _covered(segments, wave.size)
    for text, (a, b) in zip(SENTENCES, spans):
        assert kept[a:b].all(), f"{text!r}: {np.mean(~kept[a:b]):.1%} of it is in no piece"
    assert kept.mean() < 0.97  # the pauses between sentences are (mostly) left out


def test_long_pauses_cut_between_sentences(joined):
    wave, spans = joined
    segments = speech_segments(wave, 10.0)
    # sentences of 1 s or more never share a piece (all pauses here are >= 0.35 s); none is cut inside (all fit in 10 s)
    for (a, b), (c, d), _pause in zip(spans, spans[1:], PAUSES):
        together = any(s <= a and d <= e for s, e in segments)
        if min(b - a, d - c) >= SHORT_PIECE_S * SR:
            assert not together, (a / SR, c / SR)
    for a, b in spans:
        assert any(s <= a and b <= e for s, e in segments), (a, b)


def _librivox(stem: str) -> np.ndarray:
    files = glob.glob(f"{LIBRIVOX}/*{stem}.wav")
    if not files:
        pytest.fail(f"real speech not found in {LIBRIVOX}: apt-get install -y pocketsphinx-testdata")
    return sf.read(files[0], dtype="float32")[0]


def test_no_pieces_from_silence_noise_or_a_short_clip():
    rng = np.random.default_rng(0)
    speech = _librivox("0930")
    for name, x in [
        ("digital silence", np.zeros(5 * SR, np.float32)),
        ("faint white noise", (0.003 * rng.standard_normal(5 * SR)).astype(np.float32)),
        ("loud white noise", (0.1 * rng.standard_normal(5 * SR)).astype(np.float32)),
        ("0.2-s clip of speech", speech[int(0.6 * SR) : int(0.8 * SR)]),
        (
            "0.2-s clip in silence",
            np.concatenate([np.zeros(SR, np.float32), speech[int(0.6 * SR) : int(0.8 * SR)], np.zeros(SR, np.float32)]),
        ),
    ]:
        assert speech_segments(x, 10.0) == [], name
        assert segment_recording(x, 10.0) == [], name


@pytest.mark.parametrize("where", ["alone", "in silence"])
def test_a_real_half_second_word_is_kept(where):
    word = _librivox("0930")[int(1.6 * SR) : int(2.12 * SR)]  # "amiable", 0.52 s, cut from LibriVox speech
    tts = _espeak("no")  # espeak's "no": about 0.35 s of voice
    for x in (word, tts):
        if where == "in silence":
            x = np.concatenate([np.zeros(SR, np.float32), x, np.zeros(2 * SR, np.float32)])
        ((a, b),) = speech_segments(x, 10.0)
        lo, hi = _audible(x)
        assert a <= lo + 0.05 * SR and hi - 0.05 * SR <= b  # the word is in the piece (Silero's 32-ms windows)
        assert b - a >= MIN_SPEECH_S * SR


def test_a_short_word_next_to_a_sentence_joins_it_and_vad_off_keeps_everything():
    sentence, word = _espeak("The river was calm that morning."), _espeak("well")
    a, b = _audible(word)
    gap = np.zeros(int(0.45 * SR), np.float32)
    wave = np.concatenate([word[a:b], gap, sentence])
    ((s, e),) = speech_segments(wave, 10.0)  # one piece: a lone "well" reads poorly, so it joins its sentence
    assert s == 0 and e >= wave.size - 0.3 * SR
    assert _covered(segment_recording(wave, 10.0, vad=False), wave.size)[: b - a].all()
    assert (
        segment_recording(np.zeros(5 * SR, np.float32), 10.0, vad=False) == []
    )  # digital silence, even without the VAD
    assert segment_recording(_librivox("0930")[: int(0.2 * SR)], 10.0, vad=False) == []  # under 0.3 s


def test_librivox_utterances_joined_with_pauses_give_one_piece_each():
    waves = [_librivox(s) for s in ("0870", "0880", "0890", "0920", "0930")]
    pause = np.zeros(SR, np.float32)
    wave = np.concatenate([x for w in waves for x in (w, pause)])
    segments = speech_segments(wave, 10.0)
    assert len(segments) == 5, [(a / SR, b / SR) for a, b in segments]
    starts = np.cumsum([0] + [w.size + SR for w in waves[:-1]])
    for (a, b), s, w in zip(segments, starts, waves):
        assert s - 0.1 * SR <= a < s + 0.5 * SR and s + w.size - 0.1 * SR <= b <= s + w.size + 0.35 * SR


def test_bad_limits_are_named():
    with pytest.raises(ValueError, match="max_seconds=0.5"):
        speech_segments(np.zeros(SR, np.float32), 0.5)
