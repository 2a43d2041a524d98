"""Training on data with no usable item stops with an error naming it (it used to spin at step 0)."""

import numpy as np
import pytest

from speechmapper_tune.data.features import SafetensorsShardWriter
from speechmapper_tune.data.manifest import load_feature_items
from speechmapper_tune.data.synthetic import prepare_tiny_stage1

pytestmark = pytest.mark.e2e
RECIPES = {"speechmapper_pretrain": "tiny/stage1", "speechmapper_adapt": "tiny/stage2"}


def nan_features(manifest):
    items = load_feature_items(manifest)
    writer = SafetensorsShardWriter(items[0].storage_path)
    for it in items:
        writer.write(it.storage_key, np.full((it.num_frames, it.num_features), np.nan, np.float32))
    writer.close()
    return "NaN/inf in features: "  # with the number of items the epoch's batches held


def truncated_shard(manifest):
    shard = load_feature_items(manifest)[0].storage_path
    with open(shard, "r+b") as f:  # as an interrupted copy leaves it
        f.truncate(f.seek(0, 2) // 2)
    return f"feature shard {shard} unreadable"


@pytest.mark.parametrize(
    "recipe, fault",
    [
        ("speechmapper_pretrain", nan_features),
        ("speechmapper_adapt", nan_features),
        ("speechmapper_adapt", truncated_shard),
    ],
)
def test_no_usable_training_item_is_an_error_naming_the_data(tmp_path, tune, recipe, fault):
    out = tmp_path / "run"
    data = prepare_tiny_stage1(str(out / "data"), num_train=40, num_val=8)  # the config's prepare finds it done
    expected = fault(data["train_manifest"])
    proc = tune(
        ["run", recipe, "--config", RECIPES[recipe], f"output_dir={out}", "max_steps=3"],
        cwd=tmp_path,
        check=False,
        timeout=300,
    )
    assert proc.returncode != 0
    assert data["train_manifest"] in proc.stderr and expected in proc.stderr, proc.stderr[-3000:]
    assert not (out / "checkpoints").exists()
