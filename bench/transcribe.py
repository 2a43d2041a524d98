"""End to end, audio -> text: what `speechmapper transcribe` runs (Silero VAD pieces -> SpeechMapper) against
faster-whisper base (int8, greedy) with its own VAD (`vad_filter=True`), on the same recordings, side by side in
one run.

    .venv/bin/python bench/transcribe.py                  # all rows below
    .venv/bin/python bench/transcribe.py --threads 2 --long-seconds 60

Rows, for each system:
- LibriVox: the five real utterances (WER), and a 59.5-s recording of them joined with 1-s pauses (WER).
- A long recording (~180 s): WordNet sentences read by espeak-ng (two voices), joined with pauses of 0.3 to
  1.5 s. Words recovered: reference words aligned as hits (jiwer), in %. Sentences recovered: those with at
  least half their words hit; sentences lost: those with none (what a piece holding two sentences used to do).
- No speech: 5 s of digital silence, 5 s of faint white noise (-50 dBFS), a 0.2-s clip of LibriVox speech.
  Words produced: any word is invented.
Wall seconds per row (model loading excluded, after a warm-up) and the real-time factor over all rows (audio
seconds per wall second: > 1 is faster than real time).
"""

from __future__ import annotations

import argparse
import glob
import io
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch

LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"
SR = 16000


def librivox():
    files = sorted(glob.glob(f"{LIBRIVOX}/*.wav"))
    refs = {}
    for line in Path(LIBRIVOX, "transcription").read_text().splitlines():
        text, utt = re.match(r"<s> (.*) </s> \((.*)\)", line.strip()).groups()
        refs[utt] = text
    return [sf.read(f, dtype="float32")[0] for f in files], [refs[Path(f).stem] for f in files]


def espeak(text: str, voice: str) -> np.ndarray:
    raw = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], capture_output=True, check=True).stdout
    x, sr = sf.read(io.BytesIO(raw), dtype="float32")
    x = soxr.resample(x, sr, SR).astype(np.float32)
    loud = np.nonzero(np.abs(x) > 0.01 * np.abs(x).max())[0]
    return x[loud[0] : loud[-1] + 1]


def long_recording(seconds: float, seed: int = 0):
    """WordNet sentences (6 to 14 words) read by espeak-ng and joined with pauses, up to ``seconds``."""
    from speechmapper_tune.corpus.sentences import load_wordnet_sentences

    sentences, _ = load_wordnet_sentences(min_words=6, max_words=14)
    rng = random.Random(seed)
    parts, texts, spans, total = [], [], [], 0
    for i, s in enumerate(rng.sample(sentences, 200)):
        x = espeak(s.tts_text, "en-us+f3" if i % 2 else "en-gb+m2")
        pause = np.zeros(int(rng.uniform(0.3, 1.5) * SR), np.float32)
        if total + x.size > seconds * SR:
            break
        parts += [x, pause]
        texts.append(s.text)
        spans.append((total, total + x.size))
        total += x.size + pause.size
    return np.concatenate(parts), texts, spans


def no_speech():
    rng = np.random.default_rng(0)
    clip = sf.read(sorted(glob.glob(f"{LIBRIVOX}/*0930.wav"))[0], dtype="float32")[0][int(0.6 * SR) : int(0.8 * SR)]
    return [np.zeros(5 * SR, np.float32), (0.003 * rng.standard_normal(5 * SR)).astype(np.float32), clip]


def sentences_recovered(refs, hyp: str):
    """(words hit, words, sentences with >= half their words hit, sentences with none) on one alignment."""
    import jiwer

    words = " ".join(refs).split()
    out = jiwer.process_words(" ".join(refs), hyp or "<empty>")
    hit = np.zeros(len(words), bool)
    for chunk in out.alignments[0]:
        if chunk.type == "equal":
            hit[chunk.ref_start_idx : chunk.ref_end_idx] = True
    bounds = np.cumsum([0] + [len(r.split()) for r in refs])
    per = [hit[a:b].mean() for a, b in zip(bounds, bounds[1:])]
    return int(hit.sum()), len(words), sum(p >= 0.5 for p in per), sum(p == 0 for p in per)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--long-seconds", type=float, default=180.0)
    ap.add_argument("--projector", default="smollm2_135m_whisper_base_stage2_asr_lora")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import jiwer
    from faster_whisper import WhisperModel

    sys.path.insert(0, str(Path(__file__).parent))
    from stage1 import machine

    from speechmapper_tune.models.speech_lm import SpeechLM
    from speechmapper_tune.sfm.whisper import faster_whisper_dir
    from speechmapper_tune.text import normalize_text
    from speechmapper_tune.vad import speech_segments

    utts, refs = librivox()
    pause = np.zeros(SR, np.float32)
    joined = np.concatenate([x for _ in range(2) for w in utts for x in (w, pause)])
    long_wave, long_refs, long_spans = long_recording(a.long_seconds)
    silent = no_speech()
    sets = {"librivox": utts, "joined": [joined], "long": [long_wave], "none": silent}
    seconds = {k: sum(w.size for w in v) / SR for k, v in sets.items()}
    lm = SpeechLM.from_pretrained(a.projector)
    whisper = WhisperModel(
        str(faster_whisper_dir("whisper_base")), device="cpu", compute_type="int8", cpu_threads=a.threads
    )

    def fw(wave):
        segments, _ = whisper.transcribe(
            wave, language="en", beam_size=1, condition_on_previous_text=False, vad_filter=True
        )
        return normalize_text(" ".join(s.text.strip() for s in segments))

    systems = {
        "SpeechMapper (`speechmapper transcribe`, Silero VAD)": lambda waves: lm.transcribe(list(waves)),
        "faster-whisper base int8, its own VAD": lambda waves: [fw(w) for w in waves],
    }
    results = {}
    for name, fn in systems.items():
        fn(utts[:1])  # warm-up
        row = {}
        for key, waves in sets.items():
            t0 = time.perf_counter()
            row[key] = (fn(waves), time.perf_counter() - t0)
        results[name] = row
    print(
        f"{machine()}; audio: LibriVox 5 utterances {seconds['librivox']:.1f} s, joined {seconds['joined']:.1f} s, "
        f"long recording {seconds['long']:.1f} s ({len(long_refs)} sentences), no-speech inputs {seconds['none']:.1f} s\n"
    )
    print(
        "| system | LibriVox WER | 60-s joined WER | long: WER | long: words recovered | long: sentences >= half "
        "| long: sentences lost | no speech: words produced | wall s (LibriVox / joined / long / none) | RTF |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in results.items():
        lib, joi, lon, non = (row[k][0] for k in ("librivox", "joined", "long", "none"))
        hits, n, half, lost = sentences_recovered(long_refs, lon[0])
        produced = sum(len(t.split()) for t in non)
        walls = [row[k][1] for k in ("librivox", "joined", "long", "none")]
        print(
            f"| {name} | {100 * jiwer.wer(refs, lib):.1f} | {100 * jiwer.wer(' '.join(refs * 2), joi[0]):.1f} "
            f"| {100 * jiwer.wer(' '.join(long_refs), lon[0] or '<empty>'):.1f} | {100 * hits / n:.1f} % "
            f"| {half}/{len(long_refs)} | {lost} | {produced} ({'; '.join(repr(t) for t in non)}) "
            f"| {' / '.join(f'{w:.1f}' for w in walls)} | {sum(seconds.values()) / sum(walls):.1f}x |"
        )
    pieces = speech_segments(long_wave, 10.0)
    kept = np.zeros(long_wave.size, bool)
    for p, q in pieces:
        kept[p:q] = True
    inside = sum(bool(kept[p:q].all()) for p, q in long_spans)  # the rule tests/test_vad.py checks
    print(
        f"\nSilero VAD pieces of the long recording: {len(pieces)}, longest {max(q - p for p, q in pieces) / SR:.1f} s; "
        f"sentences wholly inside a piece: {inside}/{len(long_spans)}"
    )


if __name__ == "__main__":
    main()
