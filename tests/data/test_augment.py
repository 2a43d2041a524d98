import json

import numpy as np
import pytest
import torch
from documented_variants import recipe_and_config
from tolerances import FP32_SHALLOW, assert_close_to_scale

from speechmapper_tune.data.augment import FeatureMasking, item_rng, mask_features
from speechmapper_tune.data.manifest import SkipCounter, load_feature_items
from speechmapper_tune.data.stage2 import PromptParts, Stage2Dataset, Stage2Example
from speechmapper_tune.data.synthetic import write_synthetic_split

AUG = {"time_masks": 2, "time_width": 5, "feature_masks": 1, "feature_width": 3}


def feats(n=40, d=16, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32))


def changed(a, b):
    return torch.as_tensor(a) != torch.as_tensor(b)


def test_masks_have_exactly_the_configured_widths_and_hold_the_mean():
    x = feats()
    mean = x.mean(0)
    y = mask_features(x, item_rng(0, 0, 0), time_masks=1, time_width=5)
    rows = changed(x, y).any(1)
    assert rows.sum() == 5 and rows.nonzero().flatten().diff().eq(1).all()  # one run of 5 frames
    assert_close_to_scale(y[rows], mean.expand(5, -1), FP32_SHALLOW)  # the mean may be summed in another order
    z = mask_features(x, item_rng(0, 0, 0), feature_masks=1, feature_width=3)
    cols = changed(x, z).any(0)
    assert cols.sum() == 3 and cols.nonzero().flatten().diff().eq(1).all()
    assert_close_to_scale(z[:, cols], mean[cols].expand(40, -1), FP32_SHALLOW)
    assert torch.equal(x, feats())  # the input is never modified


def test_widths_clip_to_the_utterance_and_numpy_arrays_work():
    x = feats(n=3).numpy()
    y = mask_features(x, item_rng(0, 0, 0), time_masks=1, time_width=10)
    assert isinstance(y, np.ndarray)
    assert_close_to_scale(y, np.broadcast_to(x.mean(0), x.shape).copy(), FP32_SHALLOW)
    assert mask_features(x, item_rng(0, 0, 0)) is not x  # no masks: an unmasked copy
    np.testing.assert_array_equal(mask_features(x, item_rng(0, 0, 0)), x)


def test_same_seed_epoch_index_same_masks_and_different_otherwise():
    m = FeatureMasking.from_config(AUG, seed=7)
    x = feats()
    a, b = m(x, epoch=1, index=3), m(x, epoch=1, index=3)
    assert torch.equal(a, b)
    assert not torch.equal(changed(x, a), changed(x, m(x, epoch=2, index=3)))  # next epoch
    assert not torch.equal(changed(x, a), changed(x, m(x, epoch=1, index=4)))  # next item
    other_seed = FeatureMasking.from_config(AUG, seed=8)
    assert not torch.equal(changed(x, a), changed(x, other_seed(x, epoch=1, index=3)))


def test_config_is_validated():
    assert FeatureMasking.from_config(None) is None
    with pytest.raises(ValueError, match="unknown keys"):
        FeatureMasking.from_config({"time_masks": 1, "freq_width": 2})
    with pytest.raises(ValueError, match="time_width=-1"):
        FeatureMasking.from_config({"time_masks": 1, "time_width": -1})
    with pytest.raises(ValueError, match="feature_masks=1.5"):
        FeatureMasking.from_config({"feature_masks": 1.5})


def test_stage2_dataset_masks_only_with_augment(tmp_path):
    items = load_feature_items(write_synthetic_split(tmp_path, "train", 3, 16, seed=0), SkipCounter())
    examples = [Stage2Example(it, PromptParts([1], [2]), [3], [], it.num_frames // 4) for it in items]
    plain, masked = Stage2Dataset(examples), Stage2Dataset(examples, augment=AUG, seed=0)
    for i in range(len(examples)):
        masked.set_epoch(2)
        a, b = plain[i]["features"], masked[i]["features"]
        assert b.shape == a.shape and changed(a, b).any(1).sum() >= AUG["time_width"]
        assert torch.equal(b, FeatureMasking.from_config(AUG, 0)(a, 2, i))


def test_pretrain_recipe_masks_training_features_only_and_logs_the_new_terms(tmp_path):
    """In process (no `tune` CLI): the stage-1 recipe wires data.augment and the loss options."""
    recipe_module, cfg = recipe_and_config(
        "speechmapper_pretrain",
        "tiny/stage1",
        {
            "output_dir": str(tmp_path),
            "max_steps": 2,
            "log_every_n_steps": 1,
            "metric_loggers": [],
            "data": {"augment": AUG},
            "loss": {"weighting": "balanced", "classifier_weight": 1.0},
        },
    )
    recipe = recipe_module.PretrainRecipe(cfg)
    recipe.setup()
    assert recipe.train_loader.dataset.masking == FeatureMasking.from_config(AUG, seed=0)
    assert recipe.val_loader.dataset.masking is None
    assert recipe.validate() == recipe.validate()  # nothing random in validation
    recipe.train()
    recipe.cleanup()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "objective", "classifier_ce"} <= set(rows[0])
    assert rows[0]["objective"] == pytest.approx(3.0)  # balanced: three relative terms
    assert {"val_loss", "val_classifier_ce", "val_token_acc"} <= set(rows[-1])


def test_adapt_recipe_masks_training_features_only_and_weights_relatively(tmp_path):
    """In process: the stage-2 recipe wires data.train.augment, loss.weighting and validate_at_start."""
    recipe_module, cfg = recipe_and_config(
        "speechmapper_adapt",
        "tiny/stage2",
        {
            "output_dir": str(tmp_path),
            "max_steps": 2,
            "log_every_n_steps": 1,
            "metric_loggers": [],
            "gradient_accumulation_steps": 1,
            "validate_at_start": True,
            "data": {"train": {"augment": AUG}},
            "loss": {"weighting": "balanced"},
            "save_every_n_steps": 0,
            "val_every_n_steps": 0,
        },
    )
    recipe = recipe_module.AdaptRecipe(cfg)
    recipe.setup()
    assert recipe.train_loader.dataset.masking == FeatureMasking.from_config(AUG, seed=0)
    assert recipe.val_loader.dataset.masking is None
    recipe.train()
    recipe.cleanup()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and {"val_ce", "val_mse"} <= set(rows[0])  # the starting projector's baseline
    step1 = next(r for r in rows if r["step"] == 1 and "ce" in r)
    # the logged loss is Eq. 3 whatever the weighting
    assert step1["loss"] == pytest.approx(0.1 * step1["ce"] + 0.9 * step1["mse"], rel=1e-5)


@pytest.mark.parametrize(
    "recipe, config, cls, figure",
    [
        ("speechmapper_pretrain", "tiny/stage1", "PretrainRecipe", "val_token_acc"),
        ("speechmapper_adapt", "tiny/stage2", "AdaptRecipe", "val_ce"),
    ],
)
def test_validate_at_start_with_no_steps_logs_the_baseline_once(tmp_path, recipe, config, cls, figure):
    """max_steps=0 with validate_at_start reads a projector (e.g. init_projector) on a split: a cosine schedule
    over 0 steps is accepted and the one validation is logged once."""
    overrides = {"output_dir": str(tmp_path), "max_steps": 0, "metric_loggers": [], "validate_at_start": True}
    recipe_module, cfg = recipe_and_config(
        recipe, config, {**overrides, "save_every_n_steps": 0, "val_every_n_steps": 0}
    )
    run = getattr(recipe_module, cls)(cfg)
    run.setup()
    run.train()
    run.cleanup()
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if figure in r] == [0]
