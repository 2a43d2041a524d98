"""wav2vec 2.0 / HuBERT through AutoModel on tiny random models saved locally."""

from __future__ import annotations

import pytest
import torch
from sfm_helpers import noise_waves
from tolerances import FP32_DEEP, assert_close_to_scale
from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from speechmapper_tune.sfm import build_sfm

SMALL = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
    conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
)  # fmt: skip
LENGTHS = (16000, 8000, 12345, 400, 30000)
VARIANTS = {
    "wav2vec2_layernorm_stable": (Wav2Vec2Model, Wav2Vec2Config, "layer", True),
    "wav2vec2_groupnorm": (Wav2Vec2Model, Wav2Vec2Config, "group", False),
    "hubert_layernorm": (HubertModel, HubertConfig, "layer", False),
}


def _save(kind, root):
    model_cls, config_cls, norm, stable = VARIANTS[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(feat_extract_norm=norm, do_stable_layer_norm=stable, **SMALL)).eval()
    model.save_pretrained(root)
    # As released: masks only for layer-norm feature encoders.
    Wav2Vec2FeatureExtractor(return_attention_mask=norm == "layer", do_normalize=True).save_pretrained(root)
    return model


@pytest.mark.parametrize("kind", sorted(VARIANTS))
def test_batched_equals_one_by_one_and_hidden_states(kind, tmp_path):
    model = _save(kind, tmp_path)
    waves = noise_waves(LENGTHS)
    for layer in (None, 1):
        sfm = build_sfm("hf_ssl", path=str(tmp_path), layer=layer, batch_size=8)
        assert sfm.batch_size == (1 if "groupnorm" in kind else 8)
        batched = sfm.encode(waves)
        for w, b in zip(waves, batched):
            single = sfm.encode([w])[0]
            expected = int(model._get_feat_extract_output_lengths(torch.tensor(len(w))))
            assert b.shape == single.shape == (expected, 32)
            assert_close_to_scale(b, single, FP32_DEEP)  # batch vs one: other kernels
            # Independent: transformers on this utterance alone.
            x = Wav2Vec2FeatureExtractor.from_pretrained(tmp_path)(w, sampling_rate=16000, return_tensors="pt")
            with torch.no_grad():
                ref = model(x.input_values, output_hidden_states=True).hidden_states[sfm.layer][0]
            assert_close_to_scale(single, ref, FP32_DEEP)
    assert [sfm.num_frames(n) for n in (400, 16000)] == [1, 49]
    assert abs(sfm.frame_rate - 50.0) < 1e-9


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="local model directory is required"):
        build_sfm("hf_ssl")
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_sfm("hf_ssl", path=str(tmp_path))
    _save("hubert_layernorm", tmp_path)
    with pytest.raises(ValueError, match="too short"):
        build_sfm("hf_ssl", path=str(tmp_path)).encode(noise_waves([300]))
