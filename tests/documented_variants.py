"""The variants docs/recipes.md documents: a shipped config plus ``key=value`` overrides, read as a shell and
``tune run`` read them, so a test can load each through its recipe's settings check."""

from __future__ import annotations

import re
import shlex
from argparse import Namespace
from pathlib import Path
from typing import Dict, List, NamedTuple

from omegaconf import DictConfig, OmegaConf

REPO = Path(__file__).resolve().parents[1]
RECIPES_DOC = REPO / "docs" / "recipes.md"
FIXTURES = Path(__file__).resolve().parent / "configs"  # the tests' own configs (not shipped)


class Variant(NamedTuple):
    name: str  # the variant's first code span: a name like eurollm_9B/stage1, or "" for a described one
    description: str
    config: str  # the shipped config it starts from
    overrides: List[str]  # as `tune run` receives them: quotes removed, $VARIABLES expanded


def recipe_and_config(recipe: str, config: str, overrides: dict):
    """A recipe module loaded from recipes/ (no `tune` CLI) and its packaged config with overrides."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(recipe, REPO / "recipes" / f"{recipe}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = OmegaConf.load(REPO / "configs" / f"{config}.yaml")
    cfg.merge_with(overrides)
    return module, cfg


def fixture_config(name: str) -> str:
    """The path of one of the tests' own configs, e.g. ``tiny/generate``."""
    path = FIXTURES / f"{name}.yaml"
    assert path.is_file(), path
    return str(path)


def fixture_configs() -> List[str]:
    return sorted(str(p.relative_to(FIXTURES).with_suffix("")) for p in FIXTURES.rglob("*.yaml"))


def _section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def shell_variables(text: str = None) -> Dict[str, str]:
    """``NAME="..."`` lines of the Variants section's bash blocks."""
    section = _section(text or RECIPES_DOC.read_text(encoding="utf-8"), "Variants")
    blocks = re.findall(r"^```bash\n(.*?)^```", section, flags=re.S | re.M)
    return {m[0]: m[1] for b in blocks for m in re.findall(r'^([A-Z_]+)="([^"]*)"$', b, flags=re.M)}


def variants(text: str = None) -> List[Variant]:
    """Every row of the Variants table: | variant | `--config` | overrides |."""
    text = text or RECIPES_DOC.read_text(encoding="utf-8")
    section = _section(text, "Variants")
    env = shell_variables(text)
    out = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) != 3 or not cells[1].startswith("`") or cells[1] == "`--config`":
            continue
        name = re.match(r"`([^`]+)`", cells[0])
        overrides = []
        for word in shlex.split(cells[2].strip("`")):  # as the shell splits them: quotes removed
            # an unquoted $VAR splits on whitespace, with no quote removal (as the shell expands it)
            overrides += env[word[1:]].split() if word.startswith("$") else [word]
        out.append(Variant(name.group(1) if name else "", cells[0], cells[1].strip("`"), overrides))
    return out


def load_with_overrides(config: str, overrides: List[str]) -> DictConfig:
    """A config file merged with command-line overrides exactly as `tune run` merges them."""
    from torchtune.config._utils import _merge_yaml_and_cli_args

    from speechmapper_tune.configs import resolve_config

    yaml = OmegaConf.to_container(OmegaConf.load(resolve_config(config)), resolve=False)
    return _merge_yaml_and_cli_args(Namespace(**yaml), list(overrides))


def variant_args(name: str) -> List[str]:
    """``--config CONFIG OVERRIDES...`` of a named variant, for `tune run` (the caller's overrides go after)."""
    found = [v for v in variants() if v.name == name]
    assert len(found) == 1, f"docs/recipes.md documents no variant {name!r}"
    return ["--config", found[0].config, *found[0].overrides]
