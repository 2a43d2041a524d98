"""WhisperSFM.encode: frame counts, batching, outputs usable for training, packing, trimmed windows."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from sfm_helpers import noise_waves
from tolerances import FP32_DEEP, assert_close_to_scale, rel_diff

from speechmapper_tune.configs import CONFIG_DIR
from speechmapper_tune.sfm import build_sfm
from speechmapper_tune.sfm.whisper import SAMPLES_PER_FRAME, WINDOW_SAMPLES, WhisperSFM, plan_windows


def test_frames_cover_the_audio_and_batching_changes_nothing(tiny_en, librivox):
    waves = [librivox[1], librivox[4][:12345], librivox[3]]
    tiny_en.batch_size = 1
    single = tiny_en.encode(waves)
    tiny_en.batch_size = 3
    batched = tiny_en.encode(waves)
    for w, a, b in zip(waves, single, batched):
        assert a.shape == (math.ceil(len(w) / 320), 384)
        assert_close_to_scale(b, a, FP32_DEEP)  # batch of 3 vs 1: other kernels through the encoder
        assert a.dtype == torch.float32 and not a.is_inference() and not a.requires_grad
    # The features can feed a module being trained.
    proj = torch.nn.Linear(384, 2)
    proj(batched[0]).sum().backward()
    assert proj.weight.grad is not None


def test_plan_windows_places_utterances_on_frame_boundaries():
    lengths = [16000 * s for s in (7, 3, 5, 6, 3, 9, 2, 8)]
    plan = plan_windows(lengths, pack=True, gap_samples=8000)
    assert sorted(i for w in plan for i, _ in w) == list(range(len(lengths)))
    for window in plan:
        assert window[0][1] == 0
        for (i, o), (_, o_next) in zip(window, window[1:] + [(None, None)]):
            assert o % SAMPLES_PER_FRAME == 0 and o + lengths[i] <= WINDOW_SAMPLES
            if o_next is not None:
                assert o_next >= o + lengths[i] + 8000
    assert len(plan) < len(lengths)
    assert plan_windows(lengths, pack=False, gap_samples=0) == [[(i, 0)] for i in range(len(lengths))]


def test_packing_keeps_frame_counts_and_first_utterance(tiny_en, librivox):
    packed = tiny_en.encode(librivox, pack=True)  # all five (25 s) share one window
    single = tiny_en.encode(librivox)
    for w, p, s in zip(librivox, packed, single):
        assert p.shape == s.shape == (math.ceil(len(w) / 320), 384)
    # The first utterance sits where it would alone; only the later audio and the
    # window-wide log-mel floor differ, so it stays close.
    cos = torch.nn.functional.cosine_similarity(packed[0], single[0], dim=-1)
    assert cos.mean() > 0.95, float(cos.mean())
    # A lone utterance is packed exactly like an unpacked one.
    assert_close_to_scale(tiny_en.encode(librivox[:1], pack=True)[0], single[0], FP32_DEEP)


def test_trimmed_keeps_num_frames_and_the_30s_window_embeddings(tiny_en):
    # Around frame boundaries, and at the 30-s cap where the extractor truncates.
    lengths = [1, 319, 320, 321, 640, 641, 32001, 479680, 479681, WINDOW_SAMPLES]
    waves = noise_waves(lengths)
    trimmed = WhisperSFM(tiny_en.encoder, window="trimmed")
    for n, f in zip(lengths, trimmed.encode(waves)):
        assert f.shape == (math.ceil(n / SAMPLES_PER_FRAME), 384) == (trimmed.num_frames(n), 384), n
    # Up to the blocks nothing differs: same mel frames (floor included), same conv context.
    full0 = WhisperSFM(tiny_en.encoder, layer=0).encode(waves)
    trimmed0 = WhisperSFM(tiny_en.encoder, layer=0, window="trimmed").encode(waves)
    for n, a, b in zip(lengths, full0, trimmed0):
        assert a.shape == b.shape and rel_diff(b, a) < 1e-5, n


def test_trimmed_batched_equals_one_by_one(tiny_en, librivox):
    waves = [librivox[0], librivox[4][:12345], librivox[1]]  # 7.1 s, 0.8 s, 3.0 s: unsorted on purpose
    single = WhisperSFM(tiny_en.encoder, window="trimmed", batch_size=1).encode(waves)
    batched = WhisperSFM(tiny_en.encoder, window="trimmed", batch_size=3).encode(waves)
    for w, a, b in zip(waves, single, batched):
        assert a.shape == b.shape == (math.ceil(len(w) / 320), 384)
        assert rel_diff(b, a) < 2e-5  # measured <= 7e-6: padding is masked, not attended
        assert b.dtype == torch.float32 and not b.is_inference()


def test_trimmed_differs_from_full_mostly_at_the_end(tiny_en, librivox):
    # Measured (tiny.en, final layer): cosine >= 0.98 before the last 10 frames, <= 0.90 on
    # them, where the 30-s window lets the end attend to the silence after the utterance.
    full = tiny_en.encode(librivox)
    trimmed = WhisperSFM(tiny_en.encoder, window="trimmed").encode(librivox)
    for a, b in zip(full, trimmed):
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
        assert cos[:-10].mean() > 0.97, float(cos[:-10].mean())
        assert cos[-10:].mean() < 0.95, float(cos[-10:].mean())
        assert rel_diff(b, a) > 0.3  # not the same features: never mix the two modes


def test_window_setting_is_checked(tiny_en, librivox):
    with pytest.raises(ValueError, match="unknown window='padded'"):
        WhisperSFM(tiny_en.encoder, window="padded")
    with pytest.raises(ValueError, match=r"pack=True and window='trimmed'"):
        WhisperSFM(tiny_en.encoder, pack=True, window="trimmed")
    with pytest.raises(ValueError, match=r"pack=True and window='trimmed'"):
        WhisperSFM(tiny_en.encoder, window="trimmed").encode(librivox[:1], pack=True)
    with pytest.raises(ValueError, match=r"pack=True and window='trimmed'"):
        build_sfm("whisper_tiny_en", pack=True, window="trimmed")
    assert build_sfm("whisper_tiny_en", window="trimmed", batch_size=2).window == "trimmed"
    assert tiny_en.window == "full"


def test_whisper_feature_configs_name_their_window():
    sfms = {}
    for name in ("whisper_base", "whisper_base_trimmed"):
        cfg = OmegaConf.load(CONFIG_DIR / "features" / f"{name}.yaml")
        sfms[name] = (cfg.sfm.window, cfg.sfm.pack, cfg.feature_type)
    # whisper_tiny_en is whisper_base plus the overrides docs/recipes.md's Variants table gives
    tiny = OmegaConf.merge(
        OmegaConf.load(CONFIG_DIR / "features" / "whisper_base.yaml"),
        OmegaConf.from_dotlist(["sfm.name=whisper_tiny_en", "feature_type=whisper_tiny_en_avg2"]),
    )
    sfms["whisper_tiny_en"] = (tiny.sfm.window, tiny.sfm.pack, tiny.feature_type)
    assert sfms["whisper_base"][:2] == sfms["whisper_tiny_en"][:2] == ("full", False)
    assert sfms["whisper_base_trimmed"][:2] == ("trimmed", False)
    # Trimmed features are a different feature space: their own feature_type.
    assert len({ft for _, _, ft in sfms.values()}) == 3
