"""Every recipe declares its settings once (a dataclass schema in the recipe file) and checks a config against
it before any work: a misspelt or unknown key, a wrongly typed value or a bad count is named in one line."""

import dataclasses
import importlib

import pytest
from documented_variants import fixture_config, fixture_configs, load_with_overrides, shell_variables, variants
from omegaconf import OmegaConf

from speechmapper_tune.config_schema import check_settings, load_settings, schema_keys
from speechmapper_tune.configs import available_configs, recipe_for_config, resolve_config

RECIPES = (
    "speechmapper_pretrain",
    "speechmapper_adapt",
    "speechmapper_generate",
    "speechmapper_eval",
    "speechmapper_eet",
    "speechmapper_annotate",
    "speechmapper_extract",
    "speechmapper_corpus",
    "speechmapper_instructions",
)


def schema(recipe):
    return importlib.import_module(recipe).SCHEMA


def load(name, *overrides):
    return OmegaConf.merge(OmegaConf.load(resolve_config(name)), OmegaConf.from_dotlist(list(overrides)))


TINY_GENERATE, TINY_ANNOTATE, TTS_EN_TINY = (
    fixture_config(n) for n in ("tiny/generate", "tiny/annotate_sa", "corpus/tts_en_tiny")
)


def error(name, *overrides):
    recipe = recipe_for_config(name)
    with pytest.raises(ValueError) as e:
        load_settings(load(name, *overrides), schema(recipe), recipe)
    return str(e.value)


@pytest.mark.parametrize("name", available_configs() + [fixture_config(n) for n in fixture_configs()])
def test_every_shipped_config_loads_through_its_recipes_schema(name):  # and the tests' own
    recipe = recipe_for_config(name)
    cfg = load_settings(OmegaConf.load(resolve_config(name)), schema(recipe), recipe)
    assert set(cfg) == {f.name for f in dataclasses.fields(schema(recipe))}  # every setting, defaults filled in


@pytest.mark.parametrize("variant", variants(), ids=lambda v: v.name or v.description[:40])
def test_every_documented_variant_loads_through_its_recipes_schema(variant):
    """docs/recipes.md's Variants: a shipped config plus overrides, merged as `tune run` merges them."""
    assert variant.config in available_configs() and variant.name not in available_configs(), variant
    recipe = recipe_for_config(variant.config)
    cfg = load_settings(load_with_overrides(variant.config, variant.overrides), schema(recipe), recipe)
    for override in variant.overrides:  # each took effect (none is shadowed by a later one)
        key = override.split("=", 1)[0]
        assert OmegaConf.select(cfg, key) == OmegaConf.select(OmegaConf.from_dotlist([override]), key), override


def test_eurollm_is_every_llama_config_with_the_documented_overrides():
    eurollm = shell_variables()["EUROLLM"].split()
    llama = [n for n in available_configs() if n.startswith("llama3_1_8B/")]
    documented = {v.config for v in variants() if v.name.startswith("eurollm_9B/") and v.overrides[:4] == eurollm}
    assert llama and documented == set(llama)
    for name in llama:
        recipe = recipe_for_config(name)
        cfg = load_settings(load_with_overrides(name, eurollm), schema(recipe), recipe)
        assert (cfg.llm.name, cfg.llm.chat_format, cfg.llm.pad_id) == ("eurollm_9b", "template", 2), name
        assert cfg.llm.checkpoint == "/path/to/EuroLLM-9B-Instruct", name


def test_every_recipe_has_a_schema_and_a_config():
    assert {recipe_for_config(n) for n in available_configs()} == set(RECIPES)
    for recipe in RECIPES:
        assert "output_dir" in schema_keys(schema(recipe)) or recipe == "speechmapper_instructions"


def test_defaults_come_from_the_schema_typed():
    cfg = load_settings(load("tiny/stage1"), schema("speechmapper_pretrain"), "speechmapper_pretrain")
    assert cfg.dry_run is False and cfg.data.num_workers == 0 and cfg.data.augment is None
    cfg = load_settings(load("tiny/stage2", "max_steps=3"), schema("speechmapper_adapt"), "speechmapper_adapt")
    assert cfg.max_steps == 3 and cfg.data.train.task == "instruction" and cfg.lora is None
    cfg = load_settings(load("tiny/stage2", "lora.rank=4"), schema("speechmapper_adapt"), "speechmapper_adapt")
    assert cfg.lora.rank == 4 and cfg.lora.alpha == 16.0 and list(cfg.lora.attn_modules) == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "name, override, message",
    [
        ("tiny/stage1", "max_step=2", "speechmapper_pretrain: unknown setting 'max_step' (did you mean 'max_steps'?)"),
        ("tiny/stage1", "max_steps=abc", "speechmapper_pretrain: max_steps='abc' must be an integer >= 0"),
        ("tiny/stage1", "max_steps=-1", "speechmapper_pretrain: max_steps=-1 must be an integer >= 0"),
        (
            "tiny/stage1",
            "gradient_accumulation_steps=0",
            "speechmapper_pretrain: gradient_accumulation_steps=0 must be an integer >= 1",
        ),
        (
            "tiny/stage1",
            "gradient_accumulation_steps=1.5",
            "speechmapper_pretrain: gradient_accumulation_steps=1.5 must be an integer >= 1",
        ),
        (
            "tiny/stage1",
            "data.max_tokens_per_batch=0",
            "speechmapper_pretrain: data.max_tokens_per_batch=0 must be an integer >= 1",
        ),
        ("tiny/stage1", "foo=1", "speechmapper_pretrain: unknown setting 'foo'"),
        ("tiny/stage1", "dry_run=maybe", "speechmapper_pretrain: dry_run='maybe' must be true or false"),
        (
            "tiny/stage2",
            "loss.sigmma=0.5",
            "speechmapper_adapt: unknown setting 'loss.sigmma' (did you mean 'loss.sigma'?)",
        ),
        ("tiny/stage2", "clip_grad_norm=big", "speechmapper_adapt: clip_grad_norm='big' must be a number"),
        (
            "tiny/stage2",
            "prompt.assistant_prefix=Answer: x",
            "speechmapper_adapt: prompt.assistant_prefix={'Answer': 'x'} must be a string "
            """(quote it on the command line: 'prompt.assistant_prefix="..."')""",
        ),
        ("tiny/stage2", "batch_size=0", "speechmapper_adapt: batch_size=0 must be an integer >= 1"),
        (
            "tiny/stage2",
            "data.train.augment.time_mask=2",
            "speechmapper_adapt: unknown setting 'data.train.augment.time_mask' "
            "(did you mean 'data.train.augment.time_masks'?)",
        ),
        ("tiny/stage2", "data.val.augment.time_masks=2", "speechmapper_adapt: unknown setting 'data.val.augment'"),
        (
            "tiny/stage2",
            "llm.dtpye=fp32",
            "speechmapper_adapt: unknown setting 'llm.dtpye' (did you mean 'llm.dtype'?)",
        ),
        ("tiny/stage2", "lora.rnak=8", "speechmapper_adapt: unknown setting 'lora.rnak' (did you mean 'lora.rank'?)"),
        (
            TINY_GENERATE,
            "max_new_token=3",
            "speechmapper_generate: unknown setting 'max_new_token' (did you mean 'max_new_tokens'?)",
        ),
        (
            "smollm2_135M/generate",
            "length_cap.tokens_per_second=many",
            "speechmapper_generate: length_cap.tokens_per_second='many' must be a number",
        ),
        ("eval/default", "comet.gpu=1", "speechmapper_eval: unknown setting 'comet.gpu' (did you mean 'comet.gpus'?)"),
        (
            "smollm2_135M/eet",
            "sentences.num_sentences=0",
            "speechmapper_eet: sentences.num_sentences=0 must be an integer >= 1",
        ),
        (
            "features/whisper_base",
            "sfm.layr=3",
            "speechmapper_extract: unknown setting 'sfm.layr' (did you mean 'sfm.layer'?)",
        ),
        (
            "features/whisper_base",
            "perturb.speed=[0.9]",
            "speechmapper_extract: unknown setting 'perturb.speed' (did you mean 'perturb.speeds'?)",
        ),
        (TTS_EN_TINY, "chunk_size=0", "speechmapper_corpus: chunk_size=0 must be an integer >= 1"),
        (
            "instructions/self_train",
            "answer.batchsize=2",
            "speechmapper_instructions: unknown setting 'answer.batchsize' (did you mean 'answer.batch_size'?)",
        ),
        (
            "smollm2_135M/annotate_sa",
            "max_item=3",
            "speechmapper_annotate: unknown setting 'max_item' (did you mean 'max_items'?)",
        ),
    ],
)
def test_a_bad_setting_is_named_in_one_line(name, override, message):
    assert error(name, override) == message


def test_a_component_is_checked_against_its_signature():
    msg = error("tiny/stage1", "optimizer.zzz=1")
    assert msg.startswith("speechmapper_pretrain: unknown setting 'optimizer.zzz' (torch.optim.AdamW takes ")
    assert "weight_decay" in msg
    assert error("tiny/stage1", "optimizer.lr=fast") == (
        "speechmapper_pretrain: optimizer.lr='fast' must be a number (torch.optim.AdamW's default is 0.001)"
    )
    cfg = load("tiny/stage1")
    cfg.metric_loggers[0].lg_dir = "x"  # DiskLogger takes **kwargs: anything goes
    check_settings(cfg, schema("speechmapper_pretrain"), "speechmapper_pretrain")
    cfg.loss._component_ = "speechmapper_tune.losses.Stage1Los"
    with pytest.raises(ValueError, match=r"loss._component_='speechmapper_tune.losses.Stage1Los' cannot be imported"):
        check_settings(cfg, schema("speechmapper_pretrain"), "speechmapper_pretrain")


def test_several_problems_are_reported_together():  # in the config's order
    assert error("tiny/stage2", "max_step=2", "batch_size=0") == (
        "speechmapper_adapt: batch_size=0 must be an integer >= 1; "
        "unknown setting 'max_step' (did you mean 'max_steps'?)"
    )


def test_free_sections_take_any_key():
    load_settings(load("eval/default", "generations.mine=a.jsonl"), schema("speechmapper_eval"), "speechmapper_eval")
    recipe = "speechmapper_adapt"
    load_settings(load("smollm2_135M/stage2_st_ce", "prompt.instructions.pt=Traduz"), schema(recipe), recipe)


def test_generate_checks_every_run():
    cfg = load(TINY_GENERATE)
    cfg.runs = [{"output_dir": "a"}, {"max_new_token": 3}]
    from speechmapper_generate import run_configs

    runs = run_configs(cfg)
    with pytest.raises(ValueError, match=r"^speechmapper_generate: unknown setting 'max_new_token'"):
        [load_settings(r, schema("speechmapper_generate"), "speechmapper_generate") for r in runs]


def test_a_judge_is_checked_against_its_schema():
    from speechmapper_eval import judge_specs

    cfg = load_settings(
        OmegaConf.create(
            {"output_dir": "o", "judges": [{"llm": {"name": "x", "checkpoint": "y", "chat_fromat": "c"}}]}
        ),
        schema("speechmapper_eval"),
        "speechmapper_eval",
    )
    with pytest.raises(ValueError) as e:
        judge_specs(cfg)
    assert str(e.value) == (
        "speechmapper_eval judges[0]: unknown setting 'llm.chat_fromat' (did you mean 'llm.chat_format'?)"
    )


def test_the_shared_sections_match_the_library():
    from speechmapper_tune.config_schema import AugmentSettings, LoraSettings, PromptSettings
    from speechmapper_tune.data.augment import MASK_KEYS, FeatureMasking
    from speechmapper_tune.data.extract import PERTURB_KEYS
    from speechmapper_tune.data.stage2 import PromptTemplate
    from speechmapper_tune.models.llms import LoraConfig

    assert schema_keys(AugmentSettings) == set(MASK_KEYS)
    assert schema_keys(importlib.import_module("speechmapper_extract").PerturbSettings) == set(PERTURB_KEYS)
    assert {k for k in schema_keys(PromptSettings)} == set(PromptTemplate.__dataclass_fields__)
    defaults = OmegaConf.to_container(OmegaConf.structured(LoraSettings))
    assert LoraConfig(**defaults) == LoraConfig()
    assert FeatureMasking(**OmegaConf.to_container(OmegaConf.structured(AugmentSettings))) == FeatureMasking()


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
        ("speechmapper_generate", TINY_GENERATE, ["foo=1"], "speechmapper_generate: unknown setting 'foo'"),
        ("speechmapper_eval", "eval/default", ["foo=1"], "speechmapper_eval: unknown setting 'foo'"),
        ("speechmapper_eet", "smollm2_135M/eet", ["foo=1"], "speechmapper_eet: unknown setting 'foo'"),
        (
            "speechmapper_extract",
            "features/whisper_base",
            ["sfm.name=whisper_tiny_en", "feature_type=whisper_tiny_en_avg2", "foo=1"],
            "speechmapper_extract: unknown setting 'foo'",
        ),
        ("speechmapper_corpus", TTS_EN_TINY, ["foo=1"], "speechmapper_corpus: unknown setting 'foo'"),
        (
            "speechmapper_annotate",
            TINY_ANNOTATE,
            ["foo=1"],
            "speechmapper_annotate: unknown setting 'foo'",
        ),
        (
            "speechmapper_instructions",
            "instructions/st",
            ["foo=1"],
            "speechmapper_instructions: unknown setting 'foo'",
        ),
    ],
)
def test_each_recipe_stops_on_a_bad_setting_before_any_work(
    tmp_path, tune_in_process, recipe, name, overrides, message
):
    """Through `tune run`'s entry point, in process (test_recipe_errors runs the CLI in a subprocess)."""
    out = tmp_path / "o"
    proc = tune_in_process(["run", recipe, "--config", name, f"output_dir={out}", *overrides], cwd=tmp_path)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()


def test_an_llm_named_in_a_config_brings_its_chat_format_and_offline_folder(tmp_path):
    """A text-LLM section that names SmolLM2 needs no folder or chat format; a named folder and format win; an LLM
    with no offline copy and no folder is refused naming the setting."""
    from speechmapper_tune.config_schema import TextLLMSettings
    from speechmapper_tune.models.llms import default_chat_format

    assert (default_chat_format("smollm2_135m"), default_chat_format("llama3_1_8b")) == ("smollm2", "llama3")
    assert default_chat_format("no_such_llm") is None

    def as_is(value):  # what resolve_path_setting does to a plain folder or None
        return None if value is None else str(value)

    named = OmegaConf.create({"name": "llama3_1_8b", "checkpoint": str(tmp_path), "chat_format": "chatml"})
    assert TextLLMSettings.resolve(named, as_is) == (str(tmp_path), "chatml")
    defaults = OmegaConf.create({"name": "llama3_1_8b", "checkpoint": str(tmp_path), "chat_format": None})
    assert TextLLMSettings.resolve(defaults, as_is) == (str(tmp_path), "llama3")
    with pytest.raises(ValueError, match="llm.checkpoint is not set"):
        TextLLMSettings.resolve(
            OmegaConf.create({"name": "llama3_1_8b", "checkpoint": None, "chat_format": None}), as_is
        )
    with pytest.raises(ValueError, match="llm.chat_format is not set"):
        TextLLMSettings.resolve(
            OmegaConf.create({"name": "x", "checkpoint": str(tmp_path), "chat_format": None}), as_is
        )
