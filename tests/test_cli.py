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


def test_transcribe_real_speech_a_60s_recording_and_a_corrupt_file(tmp_path, librivox):
    files, refs = librivox
    waves = [sf.read(f, dtype="float32")[0] for f in files]
    pause = np.zeros(16000, np.float32)
    joined = np.concatenate([x for _ in range(2) for w in waves for x in (w, pause)])  # 59.5 s
    sf.write(tmp_path / "joined.flac", joined, 16000)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    proc = speechmapper("transcribe", *files, tmp_path / "joined.flac", tmp_path / "corrupt.wav", "--quiet")
    assert proc.returncode == 1, proc.stderr  # one file failed, the others were transcribed
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "corrupt.wav: not a readable audio file" in errors[0], proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert [r[0] for r in rows] == [*files, str(tmp_path / "joined.flac")]
    hyps = [r[1] for r in rows]
    wer = jiwer.wer(refs, hyps[:5])
    joined_wer = jiwer.wer(" ".join(refs * 2), hyps[5])
    print(f"LibriVox WER {wer:.3f}, 60-s recording WER {joined_wer:.3f}")
    assert wer < 0.7 and joined_wer < 0.7  # measured 0.45 and 0.54; a broken pipeline gives >= 0.95


def test_jsonl_output_and_ask(tmp_path, librivox):
    files, _ = librivox
    proc = speechmapper("transcribe", files[1], "--format", "jsonl", "--quiet")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row["file"] == files[1] and row["text"] and abs(row["seconds"] - 2.99) < 0.01
    proc = speechmapper("ask", "--instruction", "Can you transcribe the Speech content?", files[1], "--quiet")
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr


def test_list_and_clear_errors(tmp_path):
    proc = speechmapper("list")
    assert proc.returncode == 0 and "smollm2_135m_whisper_base_stage2_asr_lora (transcribe default)" in proc.stdout
    proc = speechmapper("transcribe", tmp_path / "nothing.wav", "--projector", "no_such_projector")
    assert proc.returncode == 2 and "no_such_projector: neither a projector checkpoint folder nor a shipped projector" in proc.stderr
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
    tune(["run", "my_adapt.py", "--config", "stage2.yaml", f"output_dir={out}", "max_steps=2", "val_every_n_steps=0",
          "save_every_n_steps=2"], cwd=tmp_path)
    assert (out / "checkpoints" / "step_2" / "projector.safetensors").is_file()
