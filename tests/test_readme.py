"""The README and docs/ say what the code does: the README's Python runs as written, and every recipe,
config, `speechmapper` subcommand and local link the docs name exists."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
HISTORY = REPO / "docs" / "experiments.md"  # a dated log: it names configs as they were then
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
RECIPES = {p.stem for p in (REPO / "recipes").glob("speechmapper_*.py")}
CONFIGS = {str(p.relative_to(REPO / "configs").with_suffix("")) for p in (REPO / "configs").rglob("*.yaml")}
SUBCOMMANDS = {"transcribe", "ask", "list", "ls", "cp"}


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def _commands(text: str) -> list[str]:
    """Shell commands of the ```bash blocks, continuation lines joined and comments cut."""
    out = []
    for block in _blocks(text, "bash"):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = cmd.split(" # ")[0].strip()
            if cmd:
                out.append(cmd)
    return out


def _config_names(text: str) -> set[str]:
    """The bare config names a text passes to `--config`, also inside inline code."""
    return {m for m in re.findall(r"--config\s+([\w./-]+)", text) if not m.endswith((".yaml", ".py", "..."))}


@pytest.mark.parametrize("doc", [d for d in DOCS if d != HISTORY], ids=lambda p: str(p.relative_to(REPO)))
def test_every_recipe_and_config_named_exists(doc):
    text = doc.read_text(encoding="utf-8")
    missing = sorted(c for c in _config_names(text) if c not in CONFIGS and not c.startswith("<"))
    assert not missing, f"{doc.name} names configs that are not in configs/: {missing}"
    recipes = set(re.findall(r"tune run (?:--nproc_per_node \S+ )?(speechmapper_\w+)", text))
    assert recipes <= RECIPES, f"{doc.name} names recipes that do not exist: {sorted(recipes - RECIPES)}"


def test_readme_commands_name_real_recipes_configs_and_subcommands():
    commands = _commands(README.read_text(encoding="utf-8"))
    assert any(c.startswith("make demo") for c in commands) and any(c.startswith("make test") for c in commands)
    seen = {"tune": 0, "speechmapper": 0}
    for cmd in commands:
        words = cmd.split()
        if words[0].endswith("speechmapper"):
            seen["speechmapper"] += 1
            assert words[1] in SUBCOMMANDS, cmd
            if words[1] == "cp":  # speechmapper cp SOURCE DEST: a recipe or a packaged config
                assert words[2] in RECIPES or words[2] in CONFIGS, cmd
        elif words[:2] == ["tune", "run"]:
            seen["tune"] += 1
            args = words[2:]
            if args[0] == "--nproc_per_node":
                args = args[2:]
            config = args[args.index("--config") + 1]
            if args[0].endswith(".py"):  # a copied recipe runs from its file, with a copied config
                assert config.endswith(".yaml"), cmd
            else:
                assert args[0] in RECIPES, cmd
                assert config in CONFIGS, cmd
    assert seen["tune"] >= 5 and seen["speechmapper"] >= 3, seen


def test_readme_checkpoint_paths_are_what_the_configs_write():
    """`projector_checkpoint=runs/.../checkpoints/step_N` in the README is a folder an earlier command's config
    writes: its output_dir, N a saved step within max_steps."""
    from omegaconf import OmegaConf

    written = {}  # output_dir -> the steps its run saves
    for cmd in _commands(README.read_text(encoding="utf-8")):
        words = cmd.split()
        if words[:2] == ["tune", "run"] and words[2] in RECIPES:
            cfg = OmegaConf.load(REPO / "configs" / f"{words[words.index('--config') + 1]}.yaml")
            overrides = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("'"))
            for ckpt in re.findall(r"projector_checkpoint=(runs/\S+/checkpoints/step_\d+)", cmd):
                folder, step = ckpt.rsplit("/checkpoints/step_", 1)
                assert folder in written, f"{cmd}: no earlier command writes {folder}"
                assert int(step) in written[folder], f"{cmd}: {folder} saves steps {sorted(written[folder])}"
            out, steps, every = (
                overrides.get("output_dir", cfg.get("output_dir")),
                cfg.get("max_steps"),
                cfg.get("save_every_n_steps"),
            )
            if steps is not None and every:
                written[str(out)] = {*range(int(every), int(steps) + 1, int(every)), int(steps)}
    assert len(written) >= 2, written


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_local_links_resolve(doc):
    text = doc.read_text(encoding="utf-8")
    links = [link.split("#")[0] for link in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in link]
    missing = [link for link in links if link and not (doc.parent / link).exists()]
    assert not missing, f"{doc.name}: links to missing files {missing}"


@pytest.mark.e2e  # a fresh process loads the shipped projector, Whisper base and SmolLM2
def test_readme_python_runs_as_written(tmp_path):
    """Each ```python block of the README, run in a folder holding the `talk.flac` it reads (the shortest real
    LibriVox recording, 3 s), with the shipped projector and LLM, as a user would paste it."""
    import soundfile as sf

    blocks = _blocks(README.read_text(encoding="utf-8"), "python")
    assert blocks, "the README has no Python snippet"
    wavs = sorted(LIBRIVOX.glob("*.wav"), key=lambda f: sf.info(str(f)).frames)
    if not wavs:
        pytest.fail(f"real speech not found in {LIBRIVOX}: apt-get install -y pocketsphinx-testdata")
    samples, rate = sf.read(wavs[0])
    sf.write(tmp_path / "talk.flac", samples, rate)
    for i, code in enumerate(blocks):
        script = tmp_path / f"snippet_{i}.py"
        script.write_text(code + "\nprint('SNIPPET-OK')\n", encoding="utf-8")
        env = {**os.environ, "OMP_NUM_THREADS": "2", "TQDM_DISABLE": "1"}
        proc = subprocess.run(
            [sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0 and "SNIPPET-OK" in proc.stdout, (
            f"README snippet {i}:\n{code}\n{proc.stderr[-3000:]}"
        )
