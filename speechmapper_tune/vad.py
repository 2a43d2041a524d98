"""Where the speech is in a recording: Silero VAD v6 (the copy faster-whisper ships), cut into pieces.

Why this detector: faster-whisper is already a dependency (the ASR cascade, Whisper's CTranslate2
weights) and ships Silero VAD v6 as an ONNX file with onnxruntime, so no new package and no
download; Silero is a trained detector that tells speech from silence and noise, where the
previous energy rule measured quietness relative to the file's own loudest point (a file quiet
throughout was never dropped). About 2 ms per second of audio on one CPU thread.

The rules, in the order they apply (:func:`speech_segments`):

1. Speech is a run of 32-ms windows with Silero speech probability >= ``THRESHOLD`` (0.5), ended
   by ``MIN_PAUSE_S`` (0.25 s) below ``THRESHOLD - 0.15`` (Silero's hysteresis). A run longer than
   a piece may be is split at its last pause of >= 0.1 s before the limit (else at the limit).
2. A run shorter than ``MIN_SPEECH_S`` (0.3 s) is not speech the projector can read (a click, a
   breath, a clipped syllable: a 0.2-s clip of speech measures at most 0.23 s, a real 0.5-s word
   0.35 s or more): it joins a neighbour closer than ``JOIN_GAP_S`` if the piece stays within the
   limit, else it is dropped. A recording with no speech left gives no pieces (and no text).
3. Runs shorter than ``SHORT_PIECE_S`` (1 s) join their nearer neighbour when the piece stays
   within the limit and the pause between them is under ``JOIN_GAP_S``; longer runs stay
   separate, so a piece is usually one sentence (the shipped projectors were trained on single
   utterances and may drop a second sentence read in the same piece).
4. Each piece keeps ``PAD_S`` (0.3 s) of audio either side (less where a neighbour is closer,
   which gets half the pause), never more than ``max_seconds`` in all.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

SAMPLE_RATE = 16000
WINDOW = 512  # Silero's window at 16 kHz: 32 ms
THRESHOLD = 0.5  # Silero's own default speech probability
MIN_PAUSE_S = 0.25  # a pause between sentences (at 0.3, two of 53 sentence pairs 0.3 s apart shared a piece)
MIN_SPEECH_S = 0.3  # below: not speech the projector can read (0.2-s clips measure <= 0.23 s, 0.5-s words >= 0.35 s)
SHORT_PIECE_S = 1.0  # a run this short joins a neighbour, when it can, for context
JOIN_GAP_S = 1.0  # the longest pause a short run is joined across
PAD_S = 0.3  # audio kept either side: Silero's onsets and offsets are a window or two off; 0.3 read LibriVox best (0.2 to 0.5 tried)


def speech_probabilities(wave: np.ndarray) -> np.ndarray:
    """Silero's speech probability for each 32-ms window of a 16-kHz mono wave."""
    from faster_whisper.vad import get_vad_model

    padded = np.pad(np.asarray(wave, np.float32), (0, WINDOW - wave.size % WINDOW))
    return get_vad_model()(padded).reshape(-1)


def speech_runs(
    wave: np.ndarray, max_seconds: float = float("inf"), sample_rate: int = SAMPLE_RATE
) -> List[Tuple[int, int]]:
    """Unpadded ``[(start, end), ...]`` sample ranges Silero calls speech (rule 1), each at most
    ``max_seconds - 2 * PAD_S`` long."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"the VAD reads {SAMPLE_RATE}-Hz audio, got {sample_rate} Hz")
    opts = VadOptions(
        threshold=THRESHOLD,
        min_speech_duration_ms=0,
        min_silence_duration_ms=int(MIN_PAUSE_S * 1000),
        speech_pad_ms=0,
        max_speech_duration_s=max_seconds - 2 * PAD_S,
    )
    return [
        (int(r["start"]), min(int(r["end"]), wave.size))
        for r in get_speech_timestamps(np.asarray(wave, np.float32), opts)
    ]


def speech_segments(wave: np.ndarray, max_seconds: float, sample_rate: int = SAMPLE_RATE) -> List[Tuple[int, int]]:
    """``[(start, end), ...]`` sample ranges holding the recording's speech, each at most
    ``max_seconds`` long, in order and not overlapping; ``[]`` when there is no speech (rules above)."""
    if max_seconds <= 2 * PAD_S + MIN_SPEECH_S:
        raise ValueError(f"max_seconds={max_seconds} leaves no room for speech")
    runs = [list(r) for r in speech_runs(wave, max_seconds, sample_rate)]
    max_len, gap_len = int(max_seconds * sample_rate) - 2 * int(PAD_S * sample_rate), JOIN_GAP_S * sample_rate
    for short in (MIN_SPEECH_S, SHORT_PIECE_S):  # the shortest runs join first: a clipped syllable before a phrase
        i = 0
        while i < len(runs):
            a, b = runs[i]
            if b - a >= short * sample_rate:
                i += 1
                continue
            options = []  # (pause, index of the neighbour) for each neighbour it can join
            if i > 0 and a - runs[i - 1][1] < gap_len and b - runs[i - 1][0] <= max_len:
                options.append((a - runs[i - 1][1], i - 1))
            if i + 1 < len(runs) and runs[i + 1][0] - b < gap_len and runs[i + 1][1] - a <= max_len:
                options.append((runs[i + 1][0] - b, i + 1))
            if options:
                j = min(options)[1]
                runs[min(i, j)] = [min(a, runs[j][0]), max(b, runs[j][1])]
                del runs[max(i, j)]
                i = max(0, min(i, j) - 1)  # the joined run may now join again
            elif b - a < MIN_SPEECH_S * sample_rate:
                del runs[i]  # an isolated click or clipped syllable: nothing the projector can read
            else:
                i += 1
    limit = int(max_seconds * sample_rate)  # faster-whisper may end a run one window late: the limit holds regardless
    return [(a, min(b, a + limit)) for a, b in _pad(runs, wave.size, int(PAD_S * sample_rate))]


def _pad(runs: List[List[int]], n: int, pad: int) -> List[Tuple[int, int]]:
    """Each run widened by ``pad`` either side, by half the pause where a neighbour is closer than 2 * pad."""
    out = []
    for i, (a, b) in enumerate(runs):
        before = pad if i == 0 else min(pad, (a - runs[i - 1][1]) // 2)
        after = pad if i + 1 == len(runs) else min(pad, (runs[i + 1][0] - b) // 2)
        out.append((max(0, a - before), min(n, b + after)))
    return out
