import numpy as np
import pytest
import torch
from lhotse import CutSet

from speechmapper_tune.data.features import SafetensorsShardWriter
from speechmapper_tune.data.manifest import SkipCounter, load_feature_items, save_cutset_atomic
from speechmapper_tune.data.stage1 import Stage1Collator, Stage1Dataset, prepare_stage1_examples
from speechmapper_tune.data.synthetic import write_synthetic_split
from speechmapper_tune.losses import IGNORE_INDEX


def out_len(n):
    return n // 4


def encode(text):
    return [len(w) for w in text.split()]


@pytest.fixture
def manifest(tmp_path):
    return write_synthetic_split(tmp_path, "train", 6, 16, seed=0)


def test_bad_items_are_skipped_and_counted(tmp_path, manifest):
    cuts = list(CutSet.from_file(manifest))
    cuts[0].supervisions[0].text = "  ?! "  # empty once normalized
    cuts[1].features.storage_path = str(tmp_path / "missing.safetensors")
    cuts[2].features = None
    cuts[3].supervisions[0].text = " ".join(["word"] * 200)  # longer than the projector output
    path = save_cutset_atomic(CutSet.from_cuts(cuts), tmp_path / "bad.jsonl.gz")
    skipped = SkipCounter()
    items = load_feature_items(path, skipped)
    examples = prepare_stage1_examples(items, encode, out_len, 10_000, skipped)
    assert skipped.as_dict() == {
        "empty transcript": 1,
        "feature file missing": 1,
        "no features attached": 1,
        "target longer than projector output": 1,
    }
    assert [e.item.id for e in examples] == [cuts[4].id, cuts[5].id]
    assert cuts[1].id in skipped.summary()


def test_nan_and_unreadable_features_drop_out_of_the_batch(tmp_path, manifest):
    items = load_feature_items(manifest)
    w = SafetensorsShardWriter(str(tmp_path / "nan.safetensors"))
    bad = np.zeros((items[0].num_frames, 16), np.float32)
    bad[3, 2] = np.nan
    w.write("x", bad)
    w.close()
    items[0].storage_path, items[0].storage_key = str(tmp_path / "nan.safetensors"), "x"
    items[1].storage_key = "no-such-key"
    examples = prepare_stage1_examples(items, encode, out_len, 10_000, SkipCounter())
    ds = Stage1Dataset(examples)
    batch = Stage1Collator(out_len, pad_id=0)([ds[i] for i in range(len(ds))])
    assert dict(batch["skipped"]) == {
        items[0].id: "NaN/inf in features",
        items[1].id: "unreadable features (SafetensorError)",
    }
    assert batch["ids"] == [it.id for it in items[2:]]


def test_collate_shapes_and_targets(manifest):
    items = load_feature_items(manifest)
    examples = prepare_stage1_examples(items, encode, out_len, 10_000, SkipCounter())
    ds = Stage1Dataset(examples)
    batch = Stage1Collator(out_len, pad_id=99)([ds[0], ds[1]])
    n0, n1 = examples[0].item.num_frames, examples[1].item.num_frames
    assert batch["features"].shape == (2, max(n0, n1), 16)
    assert batch["lengths"].tolist() == [n0, n1]
    assert batch["out_lengths"].tolist() == [n0 // 4, n1 // 4]
    t = batch["target_ids"]
    assert t[0, : len(examples[0].token_ids)].tolist() == examples[0].token_ids
    assert t[0, len(examples[0].token_ids) : n0 // 4].eq(99).all()
    assert t[0, n0 // 4 :].eq(IGNORE_INDEX).all()


def test_unreadable_manifest_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl.gz"):
        load_feature_items(tmp_path / "nope.jsonl.gz")


AUG = {"time_masks": 2, "time_width": 4, "feature_masks": 1, "feature_width": 3}


def test_augment_is_off_by_default_and_masks_per_seed_epoch_index(manifest):
    examples = prepare_stage1_examples(load_feature_items(manifest), encode, out_len, 10_000, SkipCounter())
    plain, masked = Stage1Dataset(examples), Stage1Dataset(examples, augment=AUG, seed=3)
    raw = [plain[i]["features"] for i in range(len(examples))]
    assert plain.masking is None
    first = [masked[i]["features"] for i in range(len(examples))]
    assert all(not torch.equal(a, b) and a.shape == b.shape for a, b in zip(raw, first))
    assert all(torch.equal(a, masked[i]["features"]) for i, a in enumerate(first))  # same epoch: same masks
    masked.set_epoch(1)
    assert all(not torch.equal(a, masked[i]["features"]) for i, a in enumerate(first))  # new epoch: new masks
    masked.set_epoch(0)
    assert all(torch.equal(a, masked[i]["features"]) for i, a in enumerate(first))  # resume: epoch 0 again


def test_augmented_batch_equals_its_items_one_by_one(manifest):
    examples = prepare_stage1_examples(load_feature_items(manifest), encode, out_len, 10_000, SkipCounter())
    ds = Stage1Dataset(examples, augment=AUG, seed=0)
    ds.set_epoch(5)
    order = [4, 1, 3]
    batch = Stage1Collator(out_len, pad_id=0)([ds[i] for i in order])
    for row, i in enumerate(order):
        single = ds[i]["features"]
        n = single.shape[0]
        assert torch.equal(batch["features"][row, :n], single)
        assert batch["features"][row, n:].eq(0).all()  # batch padding is never masked


def test_written_targets_tokenize_the_text_as_written_and_default_is_unchanged(tmp_path, manifest):
    cuts = list(CutSet.from_file(manifest))
    cuts[0].supervisions[0].text = "Hello, World!"  # a manifest storing the text as written
    cuts[1].supervisions[0].text = "hello world"  # the corpus builder: normalized text + custom "written"
    cuts[1].supervisions[0].custom = {"written": "Hello world."}
    path = save_cutset_atomic(CutSet.from_cuts(cuts[:3]), tmp_path / "written.jsonl.gz")
    items = load_feature_items(path)
    assert [it.text for it in items[:2]] == ["hello world", "hello world"]  # scoring text stays normalized
    assert [it.written for it in items] == ["Hello, World!", "Hello world.", cuts[2].supervisions[0].text]
    chars = lambda text: [ord(c) for c in text]
    default = prepare_stage1_examples(items, chars, lambda n: 10_000, 10_000, SkipCounter())
    assert [e.token_ids for e in default] == [chars(it.text) for it in items]
    written = prepare_stage1_examples(items, chars, lambda n: 10_000, 10_000, SkipCounter(), target_text="written")
    assert [e.token_ids for e in written] == [chars("Hello, World!"), chars("Hello world."), chars(items[2].written)]
    with pytest.raises(ValueError, match="target_text"):
        prepare_stage1_examples(items, chars, out_len, 10_000, SkipCounter(), target_text="cased")
