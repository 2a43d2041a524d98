import importlib
from collections import defaultdict

import pytest
from documented_variants import fixture_config, fixture_configs, variant_args
from omegaconf import OmegaConf

from speechmapper_tune.configs import CONFIG_DIR, available_configs, resolve_config, resolve_config_argv

MAX_CONFIGS = 30  # variants that differ by values are documented overrides (docs/recipes.md, "Variants")
BLOCK_LINES, MAX_COPIES = 10, 4  # no run of 10 lines (comments included, blank lines skipped) in 5 configs or more


def _components(node):
    if isinstance(node, dict):
        if "_component_" in node:
            yield node["_component_"]
        for v in node.values():
            yield from _components(v)
    elif isinstance(node, list):
        for v in node:
            yield from _components(v)


def test_packaged_names_resolve():
    names = available_configs()
    assert {"tiny/stage1", "llama3_1_8B/stage1", "smollm2_135M/generate"} <= set(names)
    assert resolve_config("tiny/stage1") == CONFIG_DIR / "tiny" / "stage1.yaml"
    assert resolve_config("tiny/stage1.yaml") == CONFIG_DIR / "tiny" / "stage1.yaml"


def test_paths_pass_through_and_unknown_names_list_choices(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("a: 1\n")
    assert resolve_config(str(f)) == f
    with pytest.raises(FileNotFoundError, match="tiny/stage1"):
        resolve_config("no/such")


def test_argv_rewrite():
    argv = ["x", "--config", "tiny/stage1", "max_steps=3"]
    resolve_config_argv(argv)
    assert argv[2] == str(CONFIG_DIR / "tiny" / "stage1.yaml") and argv[3] == "max_steps=3"
    argv = ["x", "--config=tiny/stage1"]
    resolve_config_argv(argv)
    assert argv[1] == "--config=" + str(CONFIG_DIR / "tiny" / "stage1.yaml")


@pytest.mark.parametrize("name", available_configs() + [fixture_config(n) for n in fixture_configs()])
def test_every_config_loads_and_its_components_import(name):  # the shipped ones and the tests' own
    cfg = OmegaConf.to_container(OmegaConf.load(resolve_config(name)), resolve=False)
    assert "output_dir" in cfg
    for path in _components(cfg):
        module, attr = path.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), attr), path


def test_few_configs_and_no_block_copied_into_many():
    """A variant is a documented override, not a copy: the shipped configs stay few and share no long block."""
    names = available_configs()
    assert len(names) <= MAX_CONFIGS, f"{len(names)} packaged configs: make a variant an override instead"
    where = defaultdict(set)
    for name in names:
        lines = [line.rstrip() for line in resolve_config(name).read_text(encoding="utf-8").splitlines()]
        lines = [line for line in lines if line.strip()]
        for i in range(len(lines) - BLOCK_LINES + 1):
            where[tuple(lines[i : i + BLOCK_LINES])].add(name)
    copied = {block: sorted(found) for block, found in where.items() if len(found) > MAX_COPIES}
    assert not copied, "\n\n".join(f"{found}:\n" + "\n".join(block) for block, found in copied.items())


def test_the_demo_runs_the_documented_variants():
    """`make demo`'s stages are the variants docs/recipes.md lists (the demo sets its own paths and output_dir)."""
    from speechmapper_tune import demo

    def documented(name):
        return [a for a in variant_args(name) if not a.startswith(("output_dir=", "manifest=", "instructions="))]

    assert demo.STAGE1 == documented("smollm2_135M/stage1_demo")
    assert demo.STAGE2 == documented("smollm2_135M/stage2_demo")
    assert demo.ZERO_SHOT == documented("smollm2_135M/generate_asr_zeroshot")
    assert demo.ST == documented("smollm2_135M/generate_st")
