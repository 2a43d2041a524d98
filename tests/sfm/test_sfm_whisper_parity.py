"""Independent check: our PyTorch Whisper encoders against faster-whisper's CTranslate2 encoder.

Same real speech, same log-mel features, final encoder output (no averaging), only the
frames covering the audio. Relative difference = max|ours - ref| / max|ref| over those
frames; also the smallest per-frame cosine similarity.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sfm_helpers import min_frame_cosine
from tolerances import rel_diff

from speechmapper_tune.sfm.whisper import faster_whisper_dir


def _reference(name, sfm, waves):
    from faster_whisper import WhisperModel

    model = WhisperModel(str(faster_whisper_dir(name)), device="cpu", compute_type="float32", cpu_threads=2)
    feats = sfm.features(waves).numpy()
    out = np.array(model.encode(feats))  # [batch, 1500, dim] float32
    return [torch.from_numpy(out[i, : sfm.num_frames(len(w))]) for i, w in enumerate(waves)]


@pytest.mark.parametrize("name", ["whisper_base", "whisper_tiny_en"])
def test_matches_faster_whisper(name, request, librivox):
    sfm = request.getfixturevalue({"whisper_base": "base", "whisper_tiny_en": "tiny_en"}[name])
    waves = [librivox[0], librivox[1]]  # 7.1 s and 3.0 s
    ours = sfm.encode(waves)
    refs = _reference(name, sfm, waves)
    for a, b in zip(ours, refs):
        assert a.shape == b.shape
        rel, cos = rel_diff(a, b), min_frame_cosine(a, b)
        print(f"{name}: frames={a.shape[0]} rel_diff={rel:.2e} min_cosine={cos:.6f}")
        assert rel < 1e-2
        assert cos > 0.999
