"""Data with no usable item stops with an error naming it, instead of an endless training loop."""

import gzip
import logging

import numpy as np
import pytest
from lhotse import CutSet
from torch.utils.data import DataLoader

from speechmapper_tune.data.features import SafetensorsShardWriter
from speechmapper_tune.data.loader import NoUsableData, TrainLoader
from speechmapper_tune.data.manifest import SkipCounter, load_feature_items, save_cutset_atomic
from speechmapper_tune.data.sampler import LengthCappedBatchSampler, ShuffledBatchSampler
from speechmapper_tune.data.stage1 import Stage1Collator, Stage1Dataset, prepare_stage1_examples
from speechmapper_tune.data.synthetic import write_synthetic_split


def out_len(n):
    return n // 4


def encode(text):
    return [len(w) for w in text.split()]


def poison_shard(manifest, value=np.nan):
    """Rewrite every array of the manifest's shard with ``value`` (same keys and shapes)."""
    items = load_feature_items(manifest)
    writer = SafetensorsShardWriter(items[0].storage_path)
    for it in items:
        writer.write(it.storage_key, np.full((it.num_frames, it.num_features), value, np.float32))
    writer.close()
    return items


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def loader_for(items, skipped, manifest, max_tokens=64):
    examples = prepare_stage1_examples(items, encode, out_len, max_tokens, skipped)
    sampler = LengthCappedBatchSampler([e.out_length for e in examples], max_tokens, seed=0)
    dl = DataLoader(Stage1Dataset(examples), batch_sampler=sampler, collate_fn=Stage1Collator(out_len, 0))
    return TrainLoader(dl, str(manifest), skipped), sampler


def run_epochs(loader, skipped, epochs=3):
    """What the training recipes do: count each batch's dropped items, train on the rest."""
    used = 0
    for _ in range(epochs):
        for batch in loader:
            skipped.record_batch(batch, logging.getLogger("test"))
            used += bool(batch["ids"])
    return used


def test_a_truncated_shard_is_skipped_at_setup_naming_the_shard(tmp_path):
    manifest = write_synthetic_split(tmp_path, "train", 6, 16, seed=0)
    shard = tmp_path / "train_feats.safetensors"
    truncate(shard)
    skipped = SkipCounter()
    with pytest.raises(ValueError) as e:
        load_feature_items(manifest, skipped)
    msg = str(e.value)
    assert str(manifest) in msg and str(shard.resolve()) in msg and "no usable item" in msg
    assert skipped.total() == 6 and ": 6 (" in msg


def test_items_of_a_readable_shard_are_kept_beside_a_truncated_one(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cuts = [
        *CutSet.from_file(write_synthetic_split(tmp_path / "a", "train", 3, 16, seed=0)),
        *CutSet.from_file(write_synthetic_split(tmp_path / "b", "train", 2, 16, seed=1)),
    ]
    for k, c in enumerate(cuts):
        c.id = f"u{k}"
    both = save_cutset_atomic(CutSet.from_cuts(cuts), tmp_path / "both.jsonl.gz")
    truncate(tmp_path / "b" / "train_feats.safetensors", keep=0.01)  # not even a whole header
    skipped = SkipCounter()
    items = load_feature_items(both, skipped)
    assert [it.id for it in items] == ["u0", "u1", "u2"]
    assert skipped.total() == 2 and "unreadable" in skipped.summary()


def test_an_epoch_of_nan_features_stops_training_naming_the_data(tmp_path):
    manifest = write_synthetic_split(tmp_path, "train", 8, 16, seed=0)
    items = poison_shard(manifest)
    skipped = SkipCounter()
    loader, _ = loader_for(items, skipped, manifest)
    with pytest.raises(NoUsableData) as e:
        run_epochs(loader, skipped)
    msg = str(e.value)
    assert str(manifest) in msg and "NaN/inf in features: 8" in msg
    assert items[0].storage_path in msg  # the shard the items came from


def test_some_usable_batches_train_on(tmp_path):
    manifest = write_synthetic_split(tmp_path, "train", 8, 16, seed=0)
    items = load_feature_items(manifest)
    items[0].storage_key = "no-such-key"  # one item fails to load, the others train
    skipped = SkipCounter()
    loader, sampler = loader_for(items, skipped, manifest)
    assert run_epochs(loader, skipped, epochs=2) == 2 * len(sampler)
    assert skipped.total() == 2


def test_an_epoch_without_batches_is_an_error(tmp_path):
    manifest = write_synthetic_split(tmp_path, "train", 3, 16, seed=0)
    items = load_feature_items(manifest)
    examples = prepare_stage1_examples(items, encode, out_len, 64, SkipCounter())
    sampler = ShuffledBatchSampler(len(examples), batch_size=4, seed=0)  # 3 items: no full batch
    dl = DataLoader(Stage1Dataset(examples), batch_sampler=sampler, collate_fn=Stage1Collator(out_len, 0))
    with pytest.raises(NoUsableData, match="no batch"):
        run_epochs(TrainLoader(dl, str(manifest), SkipCounter()), SkipCounter())


def test_a_resumed_epoch_at_its_end_is_not_an_error(tmp_path):
    manifest = write_synthetic_split(tmp_path, "train", 8, 16, seed=0)
    skipped = SkipCounter()
    loader, sampler = loader_for(load_feature_items(manifest), skipped, manifest)
    sampler.load_state_dict({"epoch": 0, "consumed": len(sampler), "seed": 0, "world_size": 1})
    assert list(loader) == []  # a checkpoint saved after the epoch's last batch: nothing left of it
    assert run_epochs(loader, skipped, epochs=1) == len(sampler)


def test_a_non_utf8_byte_in_a_feature_manifest_names_the_line(tmp_path):
    manifest = write_synthetic_split(tmp_path, "train", 3, 16, seed=0)
    lines = gzip.decompress(manifest.read_bytes()).split(b"\n")
    lines[1] = lines[1].replace(b"synth-train", "caf\u00e9".encode("latin-1"), 1)
    bad = tmp_path / "latin1.jsonl.gz"
    bad.write_bytes(gzip.compress(b"\n".join(lines)))
    with pytest.raises(ValueError, match=rf"{bad}, line 2: not UTF-8"):
        load_feature_items(bad)
