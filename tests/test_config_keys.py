"""Every recipe checks its settings: a misspelt or unknown key, or a bad count, is named before any work."""

import pytest
from omegaconf import OmegaConf

from speechmapper_tune.config_keys import RECIPE_KEYS, check_config_keys, check_recipe_config
from speechmapper_tune.configs import available_configs, resolve_config


def recipe_of(name: str) -> str:
    """The recipe a shipped config is for, from its folder and name."""
    folder, stem = name.split("/")
    by_folder = {
        "corpus": "speechmapper_corpus",
        "features": "speechmapper_extract",
        "eval": "speechmapper_eval",
        "instructions": "speechmapper_instructions",
    }
    if folder in by_folder:
        return by_folder[folder]
    for start, recipe in (
        ("stage1", "speechmapper_pretrain"),
        ("stage2", "speechmapper_adapt"),
        ("generate", "speechmapper_generate"),
        ("eet", "speechmapper_eet"),
        ("annotate", "speechmapper_annotate"),
    ):
        if stem.startswith(start):
            return recipe
    raise AssertionError(f"no recipe known for the shipped config {name}")


def load(name, *overrides):
    return OmegaConf.merge(OmegaConf.load(resolve_config(name)), OmegaConf.from_dotlist(list(overrides)))


def error(name, *overrides):
    with pytest.raises(ValueError) as e:
        check_recipe_config(load(name, *overrides), recipe_of(name))
    return str(e.value)


@pytest.mark.parametrize("name", available_configs())
def test_every_shipped_config_passes_its_recipes_check(name):
    check_recipe_config(OmegaConf.load(resolve_config(name)), recipe_of(name))


def test_a_misspelt_top_level_setting_names_the_closest():
    assert (
        error("tiny/stage1", "max_step=2")
        == "speechmapper_pretrain: unknown setting 'max_step' (did you mean 'max_steps'?)"
    )


def test_an_unknown_setting_is_named():
    assert error("tiny/stage1", "foo=1") == "speechmapper_pretrain: unknown setting 'foo'"


def test_a_misspelt_component_argument_is_named_from_its_signature():
    assert (
        error("tiny/stage2", "loss.sigmma=0.5")
        == "speechmapper_adapt: unknown setting 'loss.sigmma' (did you mean 'loss.sigma'?)"
    )
    msg = error("tiny/stage1", "optimizer.zzz=1")
    assert "unknown setting 'optimizer.zzz'" in msg and "torch.optim.AdamW takes" in msg and "weight_decay" in msg


def test_nested_sections_and_listed_components_are_checked():
    assert "did you mean 'data.train.augment.time_masks'" in error("tiny/stage2", "data.train.augment.time_mask=2")
    assert "unknown setting 'data.val.augment'" in error("tiny/stage2", "data.val.augment.time_masks=2")
    assert "did you mean 'llm.dtype'" in error("tiny/stage2", "llm.dtpye=fp32")
    assert "did you mean 'lora.rank'" in error("tiny/stage2", "lora.rnak=8")
    cfg = load("tiny/stage1")
    cfg.metric_loggers[0].lg_dir = "x"  # DiskLogger takes **kwargs: anything goes
    check_recipe_config(cfg, "speechmapper_pretrain")
    cfg.loss._component_ = "speechmapper_tune.losses.Stage1Los"
    with pytest.raises(ValueError, match=r"loss._component_='speechmapper_tune.losses.Stage1Los' cannot be imported"):
        check_recipe_config(cfg, "speechmapper_pretrain")


def test_free_sections_take_any_key():
    check_recipe_config(load("eval/default", "generations.mine=a.jsonl"), "speechmapper_eval")
    check_recipe_config(load("smollm2_135M/stage2_st_ce", "prompt.instructions.pt=Traduz"), "speechmapper_adapt")


@pytest.mark.parametrize(
    "override, message",
    [
        ("gradient_accumulation_steps=0", "gradient_accumulation_steps=0 must be an integer >= 1"),
        ("data.max_tokens_per_batch=0", "data.max_tokens_per_batch=0 must be an integer >= 1"),
        ("max_steps=-1", "max_steps=-1 must be an integer >= 0"),
        ("gradient_accumulation_steps=1.5", "gradient_accumulation_steps=1.5 must be an integer >= 1"),
    ],
)
def test_counts_below_their_minimum_are_named(override, message):
    assert message in error("tiny/stage1", override)


def test_several_problems_are_reported_together():
    msg = error("tiny/stage2", "max_step=2", "batch_size=0")
    assert "unknown setting 'max_step'" in msg and "batch_size=0 must be an integer >= 1" in msg


def test_plain_dicts_and_wildcards():
    known = {"a", "b.cat", "b.d.*"}
    check_config_keys({"a": {"anything": 1}, "b": {"cat": 1, "d": {"x": 2}}}, known, "r")
    with pytest.raises(ValueError, match=r"^r: unknown setting 'b.ct' \(did you mean 'b.cat'\?\)$"):
        check_config_keys({"b": {"ct": 1}}, known, "r")


def test_the_augment_keys_are_the_maskings():
    from speechmapper_tune.data.augment import MASK_KEYS

    for recipe, section in (("speechmapper_pretrain", "data.augment"), ("speechmapper_adapt", "data.train.augment")):
        assert {k[len(section) + 1 :] for k in RECIPE_KEYS[recipe] if k.startswith(section + ".")} == set(MASK_KEYS)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "recipe, name, overrides, message",
    [
        (
            "speechmapper_pretrain",
            "tiny/stage1",
            ["max_step=2", "max_steps=1"],
            "speechmapper_pretrain: unknown setting 'max_step' (did you mean 'max_steps'?)",
        ),
        (
            "speechmapper_adapt",
            "tiny/stage2",
            ["loss.sigmma=0.5", "max_steps=1"],
            "speechmapper_adapt: unknown setting 'loss.sigmma' (did you mean 'loss.sigma'?)",
        ),
        (
            "speechmapper_adapt",
            "tiny/stage2",
            ["gradient_accumulation_steps=0", "max_steps=1"],
            "speechmapper_adapt: gradient_accumulation_steps=0 must be an integer >= 1",
        ),
        ("speechmapper_generate", "tiny/generate", ["foo=1"], "speechmapper_generate: unknown setting 'foo'"),
        ("speechmapper_eval", "eval/default", ["foo=1"], "speechmapper_eval: unknown setting 'foo'"),
        ("speechmapper_eet", "smollm2_135M/eet", ["foo=1"], "speechmapper_eet: unknown setting 'foo'"),
        ("speechmapper_extract", "features/whisper_tiny_en", ["foo=1"], "speechmapper_extract: unknown setting 'foo'"),
        ("speechmapper_corpus", "corpus/tts_en_tiny", ["foo=1"], "speechmapper_corpus: unknown setting 'foo'"),
    ],
)
def test_each_recipe_stops_on_a_bad_setting_before_any_work(tmp_path, tune, recipe, name, overrides, message):
    out = tmp_path / "o"
    proc = tune(
        ["run", recipe, "--config", name, f"output_dir={out}", *overrides], cwd=tmp_path, check=False, timeout=300
    )
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()


def test_extraction_perturb_keys_are_the_extractors():
    from speechmapper_tune.config_keys import RECIPE_KEYS
    from speechmapper_tune.data.extract import PERTURB_KEYS

    known = {k.split(".", 1)[1] for k in RECIPE_KEYS["speechmapper_extract"] if k.startswith("perturb.")}
    assert known == set(PERTURB_KEYS)
