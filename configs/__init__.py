"""Packaged YAML configs, addressable by bare name (``tiny/stage1``) from ``tune run``.

torchtune passes a non-built-in ``--config`` value through unchanged, so every recipe calls
:func:`resolve_config_argv` before torchtune parses ``sys.argv``. Plain Python: torchtune is
imported only by :func:`resolve_path_setting`, which only the recipes call.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

CONFIG_DIR = Path(__file__).resolve().parent


def available_configs() -> List[str]:
    """Bare names of every packaged config, e.g. ``['tiny/stage1', 'llama3_1_8B/stage1']``."""
    return sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))


# the recipe each packaged config is for: by folder, else by the start of its name
_RECIPE_BY_FOLDER = {
    "corpus": "speechmapper_corpus",
    "features": "speechmapper_extract",
    "eval": "speechmapper_eval",
    "instructions": "speechmapper_instructions",
}
_RECIPE_BY_PREFIX = (
    ("stage1", "speechmapper_pretrain"),
    ("stage2", "speechmapper_adapt"),
    ("generate", "speechmapper_generate"),
    ("eet", "speechmapper_eet"),
    ("annotate", "speechmapper_annotate"),
)


def recipe_for_config(name: str) -> str:
    """The recipe a packaged config (or a file named as one) is for (``tiny/stage1`` -> ``speechmapper_pretrain``)."""
    path = Path(name).with_suffix("")
    folder, stem = path.parent.name, path.name
    if folder in _RECIPE_BY_FOLDER:
        return _RECIPE_BY_FOLDER[folder]
    for prefix, recipe in _RECIPE_BY_PREFIX:
        if stem.startswith(prefix):
            return recipe
    raise ValueError(f"no recipe known for the packaged config {name!r}")


def resolve_config(name_or_path: str) -> Path:
    """Return a path for a config given as a file path or a packaged bare name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    candidate = CONFIG_DIR / name_or_path
    for p in (candidate, candidate.with_name(candidate.name + ".yaml")):
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"--config {name_or_path!r} is neither a file nor a packaged config. "
        f"Packaged configs: {', '.join(available_configs())}"
    )


def resolve_config_argv(argv: Optional[List[str]] = None) -> None:
    """Rewrite ``--config NAME`` (or ``--config=NAME``) in argv to a packaged config path."""
    argv = sys.argv if argv is None else argv
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            argv[i + 1] = str(resolve_config(argv[i + 1]))
            return
        if arg.startswith("--config="):
            argv[i] = "--config=" + str(resolve_config(arg.split("=", 1)[1]))
            return


def resolve_path_setting(value) -> Optional[str]:
    """A path setting is a string, or a ``_component_`` returning one (e.g. a cached conversion)."""
    if value is None:
        return None
    if hasattr(value, "get") and "_component_" in value:
        from torchtune import config  # recipe glue: only the recipes call this

        return str(config.instantiate(value))
    return str(value)
