"""The `speechmapper` console command, end to end through the installed script, on real speech."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf

LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"
COMMAND = str(Path(sys.executable).parent / "speechmapper")
pytestmark = pytest.mark.e2e


def speechmapper(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([COMMAND, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def librivox():
    files = sorted(glob.glob(f"{LIBRIVOX}/*.wav"))
    if len(files) != 5:
        pytest.fail(f"real speech not found in {LIBRIVOX}: apt-get install -y pocketsphinx-testdata")
    refs = {}
    for line in Path(LIBRIVOX, "transcription").read_text().splitlines():
        text, utt = re.match(r"<s> (.*) </s> \((.*)\)", line.strip()).groups()
        refs[utt] = text
    return files, [refs[Path(f).stem] for f in files]


def test_transcribe_real_speech_a_60s_recording_no_speech_and_bad_files(tmp_path, librivox):
    """One run: the five utterances, a 60-s recording of them, a real 0.5-s word, silence, noise, a 0.2-s clip,
    a corrupt and a missing file; one jsonl row for each, in order."""
    files, refs = librivox
    waves = [sf.read(f, dtype="float32")[0] for f in files]
    pause = np.zeros(16000, np.float32)
    joined = np.concatenate([x for _ in range(2) for w in waves for x in (w, pause)])  # 59.5 s
    sf.write(tmp_path / "joined.flac", joined, 16000)
    sf.write(tmp_path / "word.wav", waves[4][int(1.6 * 16000) : int(2.12 * 16000)], 16000)  # "amiable", 0.52 s
    sf.write(tmp_path / "silence.wav", np.zeros(5 * 16000, np.float32), 16000)
    sf.write(
        tmp_path / "noise.wav", (0.003 * np.random.default_rng(0).standard_normal(5 * 16000)).astype(np.float32), 16000
    )
    sf.write(tmp_path / "clip.wav", waves[4][int(0.6 * 16000) : int(0.8 * 16000)], 16000)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    others = [
        tmp_path / n
        for n in ("joined.flac", "word.wav", "silence.wav", "noise.wav", "clip.wav", "corrupt.wav", "missing.wav")
    ]
    proc = speechmapper("transcribe", *files, *others, "--format", "jsonl", "--quiet")
    assert proc.returncode == 1, proc.stderr  # two inputs failed, the others were transcribed
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert (
        len(errors) == 2
        and "corrupt.wav: not a readable audio file" in errors[0]
        and "missing.wav: no such file" in errors[1]
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["file"] for r in rows] == [*files, *map(str, others)]
    by_name = {Path(r["file"]).name: r for r in rows}
    for name in ("silence.wav", "noise.wav", "clip.wav"):  # nothing invented: empty text and a notice
        assert by_name[name]["text"] == "" and by_name[name]["error"] is None
        assert sum(f"{tmp_path / name}: no speech found" in line for line in proc.stderr.splitlines()) == 1
    assert by_name["word.wav"]["text"] and by_name["word.wav"]["segments"] == 1  # a real word is read, not dropped
    assert by_name["corrupt.wav"]["text"] is None and "not a readable audio file" in by_name["corrupt.wav"]["error"]
    assert by_name["joined.flac"]["segments"] == 10  # one piece per utterance (Silero VAD, 1-s pauses)
    hyps = [r["text"] for r in rows]
    wer = jiwer.wer(refs, hyps[:5])
    joined_wer = jiwer.wer(" ".join(refs * 2), hyps[5])
    print(f"LibriVox WER {wer:.3f}, 60-s recording WER {joined_wer:.3f}")
    assert wer < 0.7 and joined_wer < 0.7  # measured 0.42 and 0.51 (fp32); a broken pipeline gives >= 0.95


def test_ask(librivox):
    files, _ = librivox
    proc = speechmapper("ask", "--instruction", "Can you transcribe the Speech content?", files[1], "--quiet")
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr


def test_list_and_clear_errors(tmp_path):
    proc = speechmapper("list")
    assert proc.returncode == 0 and "smollm2_135m_whisper_base_stage2_asr_lora (transcribe default)" in proc.stdout
    assert proc.stdout.count("    measured: ") == proc.stdout.count("default)") + 2  # each shipped one, measured
    proc = speechmapper("transcribe", tmp_path / "nothing.wav", "--projector", "no_such_projector")
    assert proc.returncode == 1 and "nothing.wav: no such file" in proc.stderr  # inputs first: nothing else is loaded
    proc = speechmapper(
        "transcribe", f"{LIBRIVOX}/sense_and_sensibility_01_austen_64kb-0880.wav", "--projector", "no_such_projector"
    )
    assert (
        proc.returncode == 2
        and "no_such_projector: neither a projector checkpoint folder nor a shipped projector" in proc.stderr
    )
    assert speechmapper("transcribe", "x.wav", "--max-segment-seconds", "40").returncode == 2


def test_cp_a_recipe_and_run_it_with_tune(tmp_path, tune):
    assert speechmapper("cp", "speechmapper_adapt", "my_adapt.py", cwd=tmp_path).returncode == 0
    again = speechmapper("cp", "speechmapper_adapt", "my_adapt.py", cwd=tmp_path)
    assert again.returncode == 1 and "exists; pass --force" in again.stderr
    assert speechmapper("cp", "tiny/stage2", tmp_path, cwd=tmp_path).returncode == 0
    assert (tmp_path / "stage2.yaml").is_file()
    assert speechmapper("cp", "no_such_thing", "x", cwd=tmp_path).returncode == 2
    out = tmp_path / "run"
    # torchtune runs a recipe file in the current folder by its module name: `tune run my_adapt.py`, not ./my_adapt.py
    tune(
        [
            "run",
            "my_adapt.py",
            "--config",
            "stage2.yaml",
            f"output_dir={out}",
            "max_steps=2",
            "val_every_n_steps=0",
            "save_every_n_steps=2",
        ],
        cwd=tmp_path,
    )
    assert (out / "checkpoints" / "step_2" / "projector.safetensors").is_file()
