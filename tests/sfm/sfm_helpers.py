"""Small numeric helpers shared by the SFM tests (imported as a plain module)."""

from __future__ import annotations

import numpy as np
import torch


def min_frame_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest cosine similarity between matching frames of two [frames, dim] tensors."""
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def noise_waves(lengths, seed=0):
    """Deterministic test signals (noise plus a tone) of the given sample lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        t = np.arange(n) / 16000
        out.append((0.05 * rng.standard_normal(n) + 0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
    return out
