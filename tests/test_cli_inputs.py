"""`speechmapper` without the model: inputs checked first, user mistakes named in one line, recipes listed and copied.

Every case here is decided before an LLM would load (no speech, bad input, bad setting), so it runs in seconds.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechmapper_tune import cli

SR = 16000
LIBRIVOX = "/usr/share/pocketsphinx/test/data/librivox"
NINE = (
    "speechmapper_corpus",
    "speechmapper_extract",
    "speechmapper_pretrain",
    "speechmapper_adapt",
    "speechmapper_generate",
    "speechmapper_eval",
    "speechmapper_eet",
    "speechmapper_annotate",
    "speechmapper_instructions",
)


@pytest.fixture
def no_speech(tmp_path):
    """Digital silence, faint white noise and a 0.2-s clip of real speech."""
    files = sorted(glob.glob(f"{LIBRIVOX}/*0930.wav"))
    if not files:
        pytest.fail(f"real speech not found in {LIBRIVOX}: apt-get install -y pocketsphinx-testdata")
    rng = np.random.default_rng(0)
    sf.write(tmp_path / "silence.wav", np.zeros(5 * SR, np.float32), SR)
    sf.write(tmp_path / "noise.flac", (0.003 * rng.standard_normal(5 * SR)).astype(np.float32), SR)
    speech = sf.read(files[0], dtype="float32")[0]
    sf.write(tmp_path / "clip.wav", speech[int(0.6 * SR) : int(0.8 * SR)], SR)
    return [tmp_path / n for n in ("silence.wav", "noise.flac", "clip.wav")]


def test_a_missing_file_fails_fast_without_loading_torch_or_the_model(tmp_path):
    code = (
        "import sys; from speechmapper_tune.cli import main; rc = main(['transcribe', sys.argv[1], '--quiet']); "
        "print(rc, 'torch' in sys.modules)"
    )
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "missing.wav")], capture_output=True, text=True, timeout=60
    )
    seconds = time.perf_counter() - t0
    assert proc.stdout.split() == ["1", "False"], proc.stdout + proc.stderr
    assert proc.stderr.strip() == f"speechmapper: error: {tmp_path / 'missing.wav'}: no such file"
    assert seconds < 3.0, seconds  # measured 0.8 s on a loaded 2-core machine


def test_no_speech_gives_empty_text_and_one_notice_each_without_the_model(no_speech, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load", lambda *a: pytest.fail("the model must not load for audio without speech"))
    assert cli.main(["transcribe", *map(str, no_speech), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"{f}\t" for f in no_speech]
    notices = err.splitlines()
    assert len(notices) == 3 and all(f"{f}: no speech found" in n for f, n in zip(no_speech, notices)), err


def test_jsonl_has_a_row_per_input_failures_included(no_speech, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load", lambda *a: pytest.fail("nothing here needs the model"))
    folder = tmp_path / "recordings"
    folder.mkdir()
    shutil.copy(no_speech[0], folder / "b.wav")
    shutil.copy(no_speech[1], folder / "a.flac")
    (folder / "notes.txt").write_text("not audio")
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    args = [no_speech[2], tmp_path / "missing.wav", folder, tmp_path / "empty", tmp_path / "corrupt.wav"]
    assert cli.main(["transcribe", *map(str, args), "--format", "jsonl", "--quiet"]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["file"] for r in rows] == [
        str(no_speech[2]),
        str(tmp_path / "missing.wav"),
        str(folder / "a.flac"),
        str(folder / "b.wav"),
        str(tmp_path / "empty"),
        str(tmp_path / "corrupt.wav"),
    ]
    ok = {"text": "", "segments": 0, "speech_seconds": 0.0, "error": None}
    assert rows[0] == {"file": str(no_speech[2]), "seconds": 0.2, **ok}
    assert rows[2] == {"file": str(folder / "a.flac"), "seconds": 5.0, **ok}
    assert rows[1]["error"].endswith("missing.wav: no such file") and rows[1]["text"] is None
    assert "a folder without audio files" in rows[4]["error"]
    assert "corrupt.wav: not a readable audio file" in rows[5]["error"]


def test_stdin_is_read_with_dash(no_speech, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load", lambda *a: pytest.fail("no speech, no model"))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(no_speech[1].read_bytes())))
    assert cli.main(["transcribe", "-", "--format", "jsonl", "--quiet"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["file"] == "-" and row["text"] == "" and abs(row["seconds"] - 5.0) < 1e-3
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    assert cli.main(["transcribe", "-", "--quiet"]) == 1
    assert "-: no data" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["gpu", "cuda0", "CPU"])
def test_a_misspelt_device_is_a_usage_error(device, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["transcribe", "x.wav", "--device", device])
    assert (
        e.value.code == 2
        and f"{device!r} is not a device name: use cpu, cuda, cuda:N or mps" in capsys.readouterr().err
    )


def _speech_file(tmp_path) -> Path:
    files = sorted(glob.glob(f"{LIBRIVOX}/*0880.wav"))
    if not files:
        pytest.fail(f"real speech not found in {LIBRIVOX}: apt-get install -y pocketsphinx-testdata")
    return Path(files[0])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has a CUDA device")
def test_cuda_on_a_torch_without_it_is_named_before_the_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load", lambda *a: pytest.fail("the device is checked first"))
    assert cli.main(["transcribe", str(_speech_file(tmp_path)), "--device", "cuda", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("speechmapper: error: --device cuda: ") and err.endswith("use --device cpu") and "\n" not in err
    )


def test_a_checkpoint_without_recorded_features_is_named(tmp_path, capsys, monkeypatch):
    from speechmapper_tune import pretrained

    folder = tmp_path / "old_projector"
    shutil.copytree(pretrained.shipped_projector(cli.DEFAULT_TRANSCRIBE), folder)
    meta = json.loads((folder / "projector_config.json").read_text())
    del meta["features"]  # as a checkpoint trained before features were recorded
    (folder / "projector_config.json").write_text(json.dumps(meta))
    monkeypatch.setattr(cli, "_load", lambda *a: pytest.fail("the checkpoint is checked first"))
    assert cli.main(["transcribe", str(_speech_file(tmp_path)), "--projector", str(folder), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{folder}: this projector checkpoint does not record how its input features were made" in err
    assert "Traceback" not in err


def test_ls_lists_every_recipe_and_packaged_config(capsys):
    from speechmapper_tune.configs import available_configs

    assert cli.main(["ls"]) == 0
    out = capsys.readouterr().out
    for name in NINE:
        assert any(line.startswith(name + " ") and len(line.split()) > 2 for line in out.splitlines()), name
    words = out.split()
    assert all(c in words for c in available_configs())
    assert "other configs" not in out  # each config is under its recipe
    adapt = out[out.index("speechmapper_adapt ") : out.index("speechmapper_generate ")]
    assert "smollm2_135M/stage2_asr_full" in adapt.split() and "smollm2_135M/stage1" not in adapt.split()


def test_cp_copies_all_nine_recipes_and_a_config(tmp_path, capsys):
    assert set(cli.RECIPES) == set(NINE)
    for name in NINE:
        assert cli.main(["cp", name, str(tmp_path)]) == 0
        copied = tmp_path / f"{name}.py"
        assert copied.read_bytes() == Path(__import__("importlib").util.find_spec(name).origin).read_bytes()
    assert cli.main(["cp", "smollm2_135M/stage2_asr_full.yaml", str(tmp_path)]) == 0
    assert (tmp_path / "stage2_asr_full.yaml").is_file()
    assert cli.main(["cp", "speechmapper_nothing", str(tmp_path)]) == 2
    assert "`speechmapper ls` lists them" in capsys.readouterr().err


def test_the_installed_command_has_ls():
    command = Path(sys.executable).parent / "speechmapper"
    proc = subprocess.run(
        [str(command), "ls"], capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0 and "speechmapper_instructions" in proc.stdout, proc.stderr
