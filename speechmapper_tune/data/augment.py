"""SpecAugment-style feature masking for training (not in the paper), plain PyTorch/NumPy.

Masks runs of whole frames (time masks) and runs of feature dimensions (feature masks) of one
utterance's ``[frames, dim]`` speech-encoder features. Masked values become the utterance's
per-dimension mean, not zeros: these are encoder outputs, not mean-normalized log-mels, so a
zero is an out-of-range value the projector's LayerNorms would amplify, while the mean carries
no local information and stays in range (it is what SpecAugment's zeros are after mean
normalization).

Each mask has exactly its configured width (clipped to the utterance); masks may overlap.
Randomness comes from a NumPy generator seeded by ``(seed, epoch, item index)``, never from a
global stream: an item is masked the same way whatever the batch, worker or resume point, and
differently in every epoch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Optional, Union

import numpy as np
import torch

Features = Union[torch.Tensor, np.ndarray]
MASK_KEYS = ("time_masks", "time_width", "feature_masks", "feature_width")


def mask_features(
    feats: Features,
    rng: np.random.Generator,
    time_masks: int = 0,
    time_width: int = 0,
    feature_masks: int = 0,
    feature_width: int = 0,
) -> Features:
    """A masked copy of ``feats`` [T, D] (same type); masked entries get the per-dimension mean."""
    x = feats.clone() if isinstance(feats, torch.Tensor) else np.array(feats, copy=True)
    n_frames, dim = x.shape
    mean = x.mean(0)  # taken before masking, so it does not depend on the masks
    for _ in range(time_masks):
        start, width = _span(rng, n_frames, time_width)
        x[start : start + width] = mean
    for _ in range(feature_masks):
        start, width = _span(rng, dim, feature_width)
        x[:, start : start + width] = mean[start : start + width]
    return x


def _span(rng: np.random.Generator, size: int, width: int) -> tuple[int, int]:
    """A uniformly placed run of ``min(width, size)`` indices in ``range(size)``."""
    width = min(int(width), size)
    return int(rng.integers(0, size - width + 1)), width


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator for one item in one epoch: independent of any other draw."""
    return np.random.default_rng([int(seed), int(epoch), int(index)])


@dataclass(frozen=True)
class FeatureMasking:
    """The four masking numbers plus the seed; ``masking(feats, epoch, index)`` applies them."""

    time_masks: int = 0
    time_width: int = 0
    feature_masks: int = 0
    feature_width: int = 0
    seed: int = 0

    def __post_init__(self):
        for name, value in asdict(self).items():
            if int(value) != value or (name != "seed" and value < 0):
                raise ValueError(f"data.augment.{name}={value!r}: expected a non-negative integer")

    @classmethod
    def from_config(cls, augment: Optional[Mapping], seed: int = 0) -> Optional["FeatureMasking"]:
        """``None`` (off) or ``{time_masks, time_width, feature_masks, feature_width}``."""
        if augment is None:
            return None
        if isinstance(augment, FeatureMasking):
            return augment
        unknown = set(augment) - set(MASK_KEYS)
        if unknown:
            raise ValueError(
                f"data.augment: unknown keys {sorted(unknown)}; expected {list(MASK_KEYS)} "
                "(command line: data.augment.time_masks=2 ... or data.augment='{time_masks: 2, ...}')"
            )
        return cls(**dict(augment), seed=int(seed))

    def __call__(self, feats: Features, epoch: int, index: int) -> Features:
        numbers = {k: getattr(self, k) for k in MASK_KEYS}
        return mask_features(feats, item_rng(self.seed, epoch, index), **numbers)
