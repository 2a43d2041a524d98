import numpy as np
import pytest
from lhotse import CutSet

from speechmapper_tune.data.features import STORAGE_TYPE, SafetensorsShardWriter, iter_features, read_feature_array
from speechmapper_tune.data.synthetic import write_synthetic_split


def test_shard_round_trip_in_fp16(tmp_path):
    w = SafetensorsShardWriter(str(tmp_path / "s.safetensors"))
    a = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    w.write("utt/1", a)
    with pytest.raises(KeyError, match="duplicate"):
        w.write("utt/1", a)
    w.close()
    got = read_feature_array(STORAGE_TYPE, str(tmp_path / "s.safetensors"), "utt/1")
    assert got.dtype == np.float16
    np.testing.assert_allclose(got, a, atol=2e-3, rtol=1e-3)  # fp16 storage: half an ulp is 4.9e-4 of each value
    assert not list(tmp_path.glob(".*tmp"))  # atomic: no temp files left


def test_manifest_reads_through_lhotse_and_iter_features(tmp_path):
    manifest = write_synthetic_split(tmp_path, "train", 5, 16, seed=0)
    cuts = CutSet.from_file(manifest)
    first = next(iter(cuts))
    arr = first.load_features()  # lhotse's own loader, through the registered backend
    assert arr.shape == (first.features.num_frames, 16)
    ids = [i for i, _ in iter_features(manifest)]
    assert ids == [c.id for c in cuts]
    for (_, x), c in zip(iter_features(manifest), cuts):
        assert x.shape == (c.num_frames, 16)
