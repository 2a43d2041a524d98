"""CTranslate2 -> transformers WhisperEncoder conversion, its cache, and the layer convention."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tolerances import FP32_PARITY, assert_close_to_scale
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from speechmapper_tune.sfm import build_sfm
from speechmapper_tune.sfm.ctranslate2 import read_ct2_model
from speechmapper_tune.sfm.whisper import (
    WhisperSFM,
    convert_ct2_encoder,
    converted_encoder_dir,
    faster_whisper_dir,
    load_whisper_encoder,
)


def test_mapping_covers_every_parameter_exactly():
    ct2 = read_ct2_model(faster_whisper_dir("whisper_tiny_en"))
    config, state = convert_ct2_encoder(ct2)
    assert (config.d_model, config.encoder_layers, config.encoder_attention_heads) == (384, 4, 6)
    assert (config.encoder_ffn_dim, config.num_mel_bins, config.max_source_positions) == (1536, 80, 1500)
    reference = WhisperEncoder(config).state_dict()
    assert set(state) == set(reference)
    for k, v in state.items():
        assert v.shape == reference[k].shape, k
    # Fused [q; k; v] rows split in that order; out projection is linear_1.
    fused = torch.from_numpy(ct2.get("encoder/layer_2/self_attention/linear_0/weight"))
    assert torch.equal(state["layers.2.self_attn.q_proj.weight"], fused[:384])
    assert torch.equal(state["layers.2.self_attn.k_proj.weight"], fused[384:768])
    assert torch.equal(state["layers.2.self_attn.v_proj.weight"], fused[768:])
    assert torch.equal(
        state["layers.0.self_attn.out_proj.weight"],
        torch.from_numpy(ct2.get("encoder/layer_0/self_attention/linear_1/weight")),
    )


def test_cache_is_written_once_and_redone_when_stale(sfm_cache):
    d = converted_encoder_dir("whisper_tiny_en")
    assert str(d).startswith(str(sfm_cache))
    weights = d / "encoder.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert converted_encoder_dir("whisper_tiny_en") == d and weights.stat().st_mtime_ns == stamp
    cfg = json.loads((d / "config.json").read_text())
    cfg["speechmapper_source"] = "stale"
    (d / "config.json").write_text(json.dumps(cfg))
    converted_encoder_dir("whisper_tiny_en")
    assert json.loads((d / "config.json").read_text())["speechmapper_source"] != "stale"
    # fp16 on disk, fp32 in memory by default.
    enc = load_whisper_encoder(d)
    assert all(p.dtype == torch.float32 for p in enc.parameters())
    assert load_whisper_encoder(d, dtype=torch.bfloat16).conv1.weight.dtype == torch.bfloat16


def test_layers_match_transformers_hidden_states(tiny_en, librivox):
    """layer=k is transformers' hidden_states[k]: 0 embeddings, L final (after layer norm)."""
    enc = load_whisper_encoder(converted_encoder_dir("whisper_tiny_en")).eval()
    feats = tiny_en.features(librivox[1:2])
    with torch.no_grad():
        hidden = enc(feats, output_hidden_states=True).hidden_states
    assert len(hidden) == 5
    for k in range(5):
        sfm = WhisperSFM(enc, layer=k)
        with torch.inference_mode():
            ours = sfm.forward_features(feats)
        assert_close_to_scale(ours, hidden[k], FP32_PARITY)  # ours vs transformers' WhisperEncoder
    assert WhisperSFM(enc, layer=-1).layer == 4 and WhisperSFM(enc).layer == 4
    with pytest.raises(ValueError, match="layer=5 is out of range"):
        WhisperSFM(enc, layer=5)


def test_sfm_is_frozen_and_reports_its_shape(tiny_en):
    assert (tiny_en.sampling_rate, tiny_en.frame_rate, tiny_en.dim, tiny_en.num_layers) == (16000, 50.0, 384, 4)
    assert not tiny_en.training and not any(p.requires_grad for p in tiny_en.parameters())
    tiny_en.train()
    assert not tiny_en.training
    assert [tiny_en.num_frames(n) for n in (1, 320, 321, 16000, 480000)] == [1, 1, 2, 50, 1500]


def test_bad_inputs_fail_clearly(tiny_en):
    with pytest.raises(ValueError, match=r"30\.00 s.*more than the 30 s"):
        tiny_en.encode([np.zeros(480001, dtype=np.float32)])
    with pytest.raises(ValueError, match="shape"):
        tiny_en.encode([np.zeros((2, 100), dtype=np.float32)])
    with pytest.raises(ValueError, match="empty"):
        tiny_en.encode([np.zeros(0, dtype=np.float32)])
    with pytest.raises(TypeError, match="list of 1-D"):
        tiny_en.encode(np.zeros(100, dtype=np.float32))
    with pytest.raises(ValueError, match="Unknown SFM name"):
        build_sfm("whisper_large")
    with pytest.raises(FileNotFoundError, match="no model.bin"):
        build_sfm("whisper_base", path="/nonexistent/dir")
