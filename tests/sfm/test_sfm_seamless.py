"""SeamlessM4T-v2 speech encoder on a tiny random model saved locally (no real weights offline)."""

from __future__ import annotations

import pytest
import torch
from sfm_helpers import noise_waves
from tolerances import FP32_DEEP, assert_close_to_scale
from transformers import SeamlessM4TFeatureExtractor, SeamlessM4Tv2Config, SeamlessM4Tv2ForSpeechToText

from speechmapper_tune.sfm import build_sfm
from speechmapper_tune.sfm.seamless import SeamlessSFM

LENGTHS = (16000, 8000, 12345, 561, 30000)


def _tiny_config():
    return SeamlessM4Tv2Config(
        hidden_size=32, speech_encoder_layers=3, speech_encoder_attention_heads=4,
        speech_encoder_intermediate_size=64, adaptor_kernel_size=8, adaptor_stride=8, num_adapter_layers=1,
        vocab_size=100, encoder_layers=1, decoder_layers=1, t2u_encoder_layers=1, t2u_decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        t2u_vocab_size=50, unit_embed_dim=8, upsample_initial_channel=8, spkr_embed_dim=4, lang_embed_dim=4,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_seamless(tmp_path_factory):
    """A full speech-to-text checkpoint (keys prefixed speech_encoder.) and its bare encoder."""
    torch.manual_seed(0)
    model = SeamlessM4Tv2ForSpeechToText(_tiny_config()).eval()
    full, bare = tmp_path_factory.mktemp("s2t"), tmp_path_factory.mktemp("speech_encoder")
    model.save_pretrained(full)
    model.speech_encoder.save_pretrained(bare)
    for d in (full, bare):
        SeamlessM4TFeatureExtractor().save_pretrained(d)
    return model, full, bare


def test_batched_equals_one_by_one_with_right_frame_counts(tiny_seamless):
    _, full, _ = tiny_seamless
    waves = noise_waves(LENGTHS)
    for layer in (None, 0, 2):
        sfm = build_sfm("seamless_m4t_v2", path=str(full), layer=layer, batch_size=8)
        batched = sfm.encode(waves)
        for w, b in zip(waves, batched):
            single = sfm.encode([w])[0]
            expected = (1 + (len(w) - 400) // 160) // 2  # fbank frames stacked by 2
            assert b.shape == single.shape == (expected, 32) == (sfm.num_frames(len(w)), 32)
            assert_close_to_scale(b, single, FP32_DEEP)  # batch vs one: other kernels
    assert sfm.frame_rate == 50.0 and sfm.num_layers == 3 and sfm.dim == 32


def test_layers_match_an_independent_forward(tiny_seamless):
    model, full, bare = tiny_seamless
    enc = model.speech_encoder
    wave = noise_waves([20000], seed=1)
    x = SeamlessM4TFeatureExtractor()(wave, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        hidden = enc(**x, output_hidden_states=True).hidden_states  # [0..L-1] are layer outputs
        # Conformer stack + its final layer norm, called directly.
        final = enc.encoder(enc.feature_projection(x.input_features), attention_mask=x.attention_mask)
    n = int(x.attention_mask.sum())  # the extractor pads to an even fbank count: 61 real of 62
    assert n == 61 and x.input_features.shape[1] == 62
    for k in (1, 2):
        sfm = build_sfm("seamless_m4t_v2", path=str(full), layer=k)
        assert_close_to_scale(sfm.encode(wave)[0], hidden[k][0, :n], FP32_DEEP)
    for path in (full, bare):  # both checkpoint layouts load the same weights
        assert_close_to_scale(build_sfm("seamless_m4t_v2", path=str(path)).encode(wave)[0], final[0, :n], FP32_DEEP)
    assert isinstance(build_sfm("seamless_m4t_v2", path=str(bare)), SeamlessSFM)


def test_errors_name_the_problem(tiny_seamless, tmp_path):
    _, full, _ = tiny_seamless
    with pytest.raises(ValueError, match="local model directory is required"):
        build_sfm("seamless_m4t_v2")
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        build_sfm("seamless_m4t_v2", path=str(tmp_path))
    with pytest.raises(ValueError, match="layer=4 is out of range"):
        build_sfm("seamless_m4t_v2", path=str(full), layer=4)
    with pytest.raises(ValueError, match="at least 560"):
        build_sfm("seamless_m4t_v2", path=str(full)).encode(noise_waves([500]))
