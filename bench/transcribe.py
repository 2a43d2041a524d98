"""End to end, audio -> text: SpeechMapper (`SpeechLM.transcribe`, what `speechmapper transcribe` runs) vs the
cascade a user could pick instead (faster-whisper base, int8, greedy, then the same SmolLM2 reading its transcript
with the same prompt), on the same recordings, side by side in one run.

    .venv/bin/python bench/transcribe.py                 # the five LibriVox utterances + one 60-s joined recording
    .venv/bin/python bench/transcribe.py --threads 2 --repeats 2

Reported per system: wall seconds (best of --repeats, after a warm-up; model loading excluded), real-time factor
(audio seconds per wall second: > 1 is faster than real time) and WER against the references.
"""

from __future__ import annotations

import argparse
import glob
import re
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"


def _inputs():
    files = sorted(glob.glob(f"{LIBRIVOX}/*.wav"))
    refs = {}
    for line in Path(LIBRIVOX, "transcription").read_text().splitlines():
        text, utt = re.match(r"<s> (.*) </s> \((.*)\)", line.strip()).groups()
        refs[utt] = text
    waves = [sf.read(f, dtype="float32")[0] for f in files]
    pause = np.zeros(16000, np.float32)
    joined = np.concatenate([x for _ in range(2) for w in waves for x in (w, pause)])
    texts = [refs[Path(f).stem] for f in files]
    return waves + [joined], texts + [" ".join(texts * 2)]


def _best(fn, repeats):
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--projector", default="smollm2_135m_whisper_base_stage2_asr_lora")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import jiwer

    sys.path.insert(0, str(Path(__file__).parent))
    from stage1 import machine

    from speechmapper_tune.data.generation_data import FasterWhisperTranscriber
    from speechmapper_tune.models.speech_lm import SpeechLM
    from speechmapper_tune.sfm.whisper import faster_whisper_dir
    from speechmapper_tune.text import normalize_text

    waves, refs = _inputs()
    seconds = sum(w.size for w in waves) / 16000
    lm = SpeechLM.from_pretrained(a.projector)
    whisper = FasterWhisperTranscriber(str(faster_whisper_dir("whisper_base")), "int8")
    parts = lm.prompt_parts()

    def cascade():
        texts = [whisper(w) for w in waves]  # Whisper's own 30-s windowing for the 60-s recording
        spans = [lm.text_span(normalize_text(t)) for t in texts]
        return [lm.answer_text(r.ids) for r in lm.generate(spans, [parts] * len(spans))]

    rows = []
    for name, fn in [("SpeechMapper (`speechmapper transcribe`)", lambda: lm.transcribe(waves)),
                     ("faster-whisper base int8 + SmolLM2 (cascade)", cascade),
                     ("faster-whisper base int8 alone", lambda: [normalize_text(whisper(w)) for w in waves])]:
        wall, hyps = _best(fn, a.repeats)
        rows.append((name, wall, seconds / wall, 100 * jiwer.wer(refs[:5], hyps[:5]), 100 * jiwer.wer(refs[5], hyps[5])))
    print(f"{machine()}, {seconds:.1f} s of audio (5 LibriVox utterances + a 59.5-s recording of them)\n")
    print("| system | wall s | RTF (audio s / s) | WER, 5 utterances | WER, 60-s recording |")
    print("|---|---|---|---|---|")
    for name, wall, rtf, w1, w2 in rows:
        print(f"| {name} | {wall:.1f} | {rtf:.1f}x | {w1:.1f} | {w2:.1f} |")


if __name__ == "__main__":
    main()
