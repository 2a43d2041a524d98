"""A user's own audio: read any file soundfile reads, make it 16 kHz mono, cut it into speech pieces.

soundfile (libsndfile) reads WAV, FLAC, OGG/Vorbis/Opus and MP3; soxr resamples. ``segment_recording``
finds the speech with a trained voice-activity detector (``speechmapper_tune.vad``: Silero VAD,
the rules stated there) and cuts it into pieces the SFM and the projector handle well; with
``vad=False`` the plain energy cutter below cuts clean, pre-cut audio at its quietest points.
Plain numpy: no torch, no torchtune.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000
FRAME_S, HOP_S = 0.025, 0.010  # energy frames of 25 ms every 10 ms
SMOOTH_S = 0.2  # a pause, not one quiet frame: energy averaged over 200 ms
QUIET_BELOW = 3.5  # natural-log RMS below the recording's loudest (about 30 dB): silence at a segment's edges
EDGE_MARGIN_S = 0.2  # kept around the speech when a segment's silent edges are cut
SILENCE_FLOOR = 0.5 * np.log(1e-6)  # log RMS of -60 dBFS: below it, a segment is silence however quiet the file is
MIN_SECONDS_NO_VAD = 0.3  # without the VAD, a recording this short is not read (a 0.2-s clip gave the system prompt)
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".w64", ".caf")


class AudioError(ValueError):
    """A file that cannot be used; the message names it and says why."""


def read_audio(
    path: str | Path,
    sample_rate: int = SAMPLE_RATE,
    on_warning: Callable[[str], None] = logging.getLogger(__name__).warning,
) -> np.ndarray:
    """``path`` as float32 mono at ``sample_rate``: channels averaged, resampled with soxr (HQ).

    A WAV file cut short (an interrupted copy) is read as the audio it holds, with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001  (libsndfile's errors are of several types)
        raise AudioError(f"{path}: not a readable audio file ({type(e).__name__}: {e})") from e
    truncated = wav_truncation(path)
    if truncated:
        on_warning(f"{path}: truncated ({truncated}); using the audio it holds")
    return to_mono_16k(audio, sr, str(path), sample_rate)


def read_audio_bytes(data: bytes, name: str = "-", sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Audio held in memory (e.g. read from stdin) as float32 mono at ``sample_rate``; ``name`` names it in errors."""
    import io

    if not data:
        raise AudioError(f"{name}: no data")
    try:
        audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001  (libsndfile's errors are of several types)
        raise AudioError(f"{name}: not readable audio ({type(e).__name__}: {e})") from e
    return to_mono_16k(audio, sr, name, sample_rate)


def audio_files_in(folder: str | Path) -> List[Path]:
    """The audio files directly inside ``folder`` (by suffix, sorted by name; subfolders are not entered)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


def segment_recording(
    wave: np.ndarray, max_seconds: float, vad: bool = True, sample_rate: int = SAMPLE_RATE
) -> List[Tuple[int, int]]:
    """``[(start, end), ...]`` sample ranges to transcribe, each at most ``max_seconds``; ``[]``: no speech.

    ``vad=True``: the speech Silero VAD finds (``speechmapper_tune.vad.speech_segments``).
    ``vad=False``: the whole recording cut at its quietest points (``split_at_pauses``), less
    digital silence, and nothing for a recording under ``MIN_SECONDS_NO_VAD``.
    """
    if vad:
        from speechmapper_tune.vad import speech_segments

        return speech_segments(wave, max_seconds, sample_rate)
    if wave.size < MIN_SECONDS_NO_VAD * sample_rate:
        return []
    return split_at_pauses(wave, max_seconds, min(2.0, max_seconds / 2), sample_rate)


def wav_truncation(path: str | Path) -> Optional[str]:
    """How a WAV file is cut short (its data chunk declares more audio than the file holds), or None.

    libsndfile silently reads the frames that are there, so a truncated file would pass as a
    shorter recording. Files of other formats, and WAVs whose size field is unset (streamed), give None.
    """
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        size, pos, byte_rate = os.fstat(f.fileno()).st_size, 12, 0
        while pos + 8 <= size:
            f.seek(pos)
            chunk, n = struct.unpack("<4sI", f.read(8))
            if chunk == b"fmt " and n >= 12:
                byte_rate = struct.unpack("<I", f.read(12)[8:12])[0]
            if chunk == b"data":
                held = size - pos - 8
                if n in (0, 0xFFFFFFFF) or held >= n:
                    return None
                if byte_rate:
                    return (
                        f"its header declares {n / byte_rate:.2f} s of audio, the file holds {held / byte_rate:.2f} s"
                    )
                return f"its header declares {n} bytes of audio, the file holds {held}"
            pos += 8 + n + (n & 1)  # chunks are padded to an even size
    return None


def to_mono_16k(audio: np.ndarray, sr: int, name: str = "audio", sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A [samples] or [samples, channels] array at ``sr`` Hz as float32 mono at ``sample_rate``."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if audio.ndim != 1:
        raise AudioError(f"{name}: expected [samples] or [samples, channels] audio, got shape {audio.shape}")
    if audio.size == 0:
        raise AudioError(f"{name}: no audio samples")
    if not np.isfinite(audio).all():
        raise AudioError(f"{name}: NaN or infinite samples")
    if sr != sample_rate:
        audio = soxr.resample(audio, sr, sample_rate, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(audio)


def frame_energy(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Log RMS energy of 25-ms frames every 10 ms, smoothed over 200 ms."""
    frame, hop = int(FRAME_S * sample_rate), int(HOP_S * sample_rate)
    if wave.size < frame:
        return np.zeros(1, np.float32)
    n = 1 + (wave.size - frame) // hop
    frames = np.lib.stride_tricks.as_strided(
        wave, (n, frame), (wave.strides[0] * hop, wave.strides[0]), writeable=False
    )
    log_rms = 0.5 * np.log(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-10)
    k = max(1, int(SMOOTH_S / HOP_S))
    padded = np.pad(log_rms, (k // 2, k - 1 - k // 2), mode="edge")  # zero padding would make silent edges loud
    return np.convolve(padded, np.ones(k) / k, mode="valid").astype(np.float32)


def split_at_pauses(
    wave: np.ndarray, max_seconds: float, min_seconds: float = 2.0, sample_rate: int = SAMPLE_RATE
) -> List[Tuple[int, int]]:
    """``[(start, end), ...]`` sample ranges covering ``wave``, each at most ``max_seconds`` long.

    Each cut is at the quietest point (smoothed energy) between ``min_seconds`` and ``max_seconds``
    after the previous cut; a recording no longer than ``max_seconds`` is one segment. Each
    segment's silent edges are then cut off (a margin kept), and an all-silent segment (relative
    to the recording's loudest point, or below -60 dBFS) is dropped.
    """
    if not 0 < min_seconds < max_seconds:
        raise ValueError(f"segment bounds must satisfy 0 < min ({min_seconds}) < max ({max_seconds}) seconds")
    n, max_len, min_len = wave.size, int(max_seconds * sample_rate), int(min_seconds * sample_rate)
    energy, hop = frame_energy(wave, sample_rate), int(HOP_S * sample_rate)
    centre = hop * np.arange(energy.size) + int(FRAME_S * sample_rate) // 2  # sample at each frame's centre
    cuts, start = [], 0
    while n - start > max_len:
        lo, hi = np.searchsorted(centre, start + min_len), np.searchsorted(centre, start + max_len, side="right")
        cut = int(centre[lo + int(np.argmin(energy[lo:hi]))]) if hi > lo else start + max_len
        cuts.append((start, cut))
        start = cut
    cuts.append((start, n))
    return [t for t in (_trim_quiet_edges(a, b, energy, centre, sample_rate) for a, b in cuts) if t is not None]


def _trim_quiet_edges(a: int, b: int, energy: np.ndarray, centre: np.ndarray, sample_rate: int):
    """(a, b) without its leading and trailing silence (a margin kept), None when it is all silence:
    the LLM, trained on utterances that start with speech, tends to invent a word for a long pause."""
    loud = np.nonzero((centre >= a) & (centre < b) & (energy > max(energy.max() - QUIET_BELOW, SILENCE_FLOOR)))[0]
    if loud.size == 0:
        return None
    margin = int(EDGE_MARGIN_S * sample_rate)
    return max(a, int(centre[loud[0]]) - margin), min(b, int(centre[loud[-1]]) + margin)
