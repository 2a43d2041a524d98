"""The CTranslate2 model.bin reader: synthetic files written byte by byte, then the real wheels."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from speechmapper_tune.sfm.ctranslate2 import read_ct2_model, read_model_bin
from speechmapper_tune.sfm.whisper import faster_whisper_dir, source_files


def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _var(name: str, array: np.ndarray, type_id: int, payload: bytes | None = None) -> bytes:
    data = array.tobytes() if payload is None else payload
    head = _string(name) + struct.pack("<B", array.ndim) + struct.pack(f"<{array.ndim}I", *array.shape)
    return head + struct.pack("<BI", type_id, len(data)) + data


def _model_bytes(variables: bytes, count: int, aliases=(), version: int = 6) -> bytes:
    body = (
        struct.pack("<I", version) + _string("TestSpec") + struct.pack("<I", 7) + struct.pack("<I", count) + variables
    )
    body += struct.pack("<I", len(aliases))
    for alias, target in aliases:
        body += _string(alias) + _string(target)
    return body


def test_synthetic_file_round_trip(tmp_path):
    w32 = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    w16 = np.array([[1.5, -2.25], [3.0, 0.125]], dtype=np.float16)
    bf = np.array([1.0, -0.5, 3.140625], dtype=np.float32)  # exactly representable in bfloat16
    bf_payload = (bf.view(np.uint32) >> 16).astype("<u2").tobytes()
    scalar = np.array(3, dtype=np.int8)
    heads = np.array(8, dtype=np.int16)
    blob = (
        _var("enc/w32", w32, 0)
        + _var("enc/w16", w16, 4)
        + _var("enc/bf16", bf, 5, bf_payload)
        + _var("enc/activation", scalar, 1)
        + _var("enc/num_heads", heads, 2)
    )
    path = tmp_path / "model.bin"
    path.write_bytes(_model_bytes(blob, 5, aliases=[("dec/proj", "enc/w16")]))
    (tmp_path / "config.json").write_text('{"x": 1}')
    m = read_ct2_model(tmp_path)
    assert (m.spec_name, m.spec_revision, m.binary_version) == ("TestSpec", 7, 6)
    np.testing.assert_array_equal(m.get("enc/w32"), w32)
    assert m.get("enc/w16").dtype == np.float16
    np.testing.assert_array_equal(m.get("enc/w16"), w16)
    np.testing.assert_array_equal(m.get("enc/bf16"), bf)
    assert int(m.get("enc/activation")) == 3 and int(m.get("enc/num_heads")) == 8
    np.testing.assert_array_equal(m.get("dec/proj"), w16)  # alias followed
    assert m.tensor("enc/w16").dtype.is_floating_point and m.tensor("enc/w16").dtype.itemsize == 4
    assert m.config == {"x": 1}
    with pytest.raises(KeyError, match="no variable 'nope'"):
        m.get("nope")


def test_bad_files_raise_clear_errors(tmp_path):
    w = np.ones((4, 4), dtype=np.float32)
    good = _model_bytes(_var("a", w, 0), 1)
    (tmp_path / "trunc.bin").write_bytes(good[:-20])
    with pytest.raises(ValueError, match="trunc.bin.*truncated"):
        read_model_bin(tmp_path / "trunc.bin")
    (tmp_path / "old.bin").write_bytes(_model_bytes(_var("a", w, 0), 1, version=1))
    with pytest.raises(ValueError, match="binary version 1 is not supported"):
        read_model_bin(tmp_path / "old.bin")
    (tmp_path / "extra.bin").write_bytes(good + b"junk")
    with pytest.raises(ValueError, match="trailing bytes"):
        read_model_bin(tmp_path / "extra.bin")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        read_model_bin(tmp_path / "missing.bin")


def test_real_tiny_en_file():
    m = read_ct2_model(source_files("whisper_tiny_en")[0].parent)
    assert m.spec_name == "WhisperSpec" and m.binary_version == 6
    assert m.get("encoder/conv1/weight").shape == (384, 80, 3)
    assert m.get("encoder/position_encodings/encodings").shape == (1500, 384)
    assert m.get("encoder/layer_3/self_attention/linear_0/weight").shape == (3 * 384, 384)
    assert "encoder/layer_4/ffn/linear_0/weight" not in m.variables
    assert int(m.get("encoder/num_heads")) == 6
    assert m.get("encoder/conv1/weight").dtype == np.float16
    assert np.isfinite(m.get("encoder/layer_norm/gamma")).all()
    # The output projection is stored once and aliased to the token embeddings.
    assert m.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert m.config["lang_ids"] and isinstance(m.config["suppress_ids"], list)


def test_real_base_file_assembled_from_two_wheels(sfm_cache):
    parts = source_files("whisper_base")
    assert [p.name for p in parts] == ["model.bin.part1", "model.bin.part2"]
    d = faster_whisper_dir("whisper_base")
    assert str(d).startswith(str(sfm_cache))
    assert (d / "model.bin").stat().st_size == sum(p.stat().st_size for p in parts)
    for side in ("config.json", "tokenizer.json", "vocabulary.txt"):
        assert (d / side).is_file(), side
    m = read_ct2_model(d)  # parses to the exact end: the halves were joined in order
    assert m.get("encoder/conv1/weight").shape == (512, 80, 3)
    assert int(m.get("encoder/num_heads")) == 8
    assert sum(1 for k in m.variables if k.startswith("encoder/") and k.endswith("ffn/linear_0/weight")) == 6
    mtime = (d / "model.bin").stat().st_mtime_ns
    assert faster_whisper_dir("whisper_base") == d and (d / "model.bin").stat().st_mtime_ns == mtime
