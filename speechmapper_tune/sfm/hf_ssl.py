"""Frozen self-supervised speech models (wav2vec 2.0, HuBERT, ...) from a local directory.

Why: the paper's appendix compares SeamlessM4T with wav2vec 2.0 and mHuBERT-147
features (layer 10). Any transformers ``AutoModel`` with a convolutional feature
encoder (``_get_feat_extract_output_lengths``) and ``output_hidden_states`` works; the
waveform normalisation comes from the directory's ``AutoFeatureExtractor``.

Layers: ``layer=k`` returns transformers' ``hidden_states[k]`` (0 = input of the first
transformer layer, ``L`` = final output; default ``L``, -1 also means ``L``).

Frames: the conv feature encoder gives 49.9 frames/s for wav2vec 2.0/HuBERT (stride
320, receptive field 400); per-utterance frame counts come from the model's own
``_get_feat_extract_output_lengths``.

Padding: models whose feature extractor returns an attention mask (layer-norm
feature encoders, e.g. wav2vec2-large-lv60, HuBERT large) run in padded, masked
batches. Models trained without one (group-norm feature encoders, e.g. wav2vec2-base,
HuBERT base) would see the padding through the group norm, so each utterance then
runs on its own, which keeps the features exactly those of one-by-one encoding.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from transformers import AutoFeatureExtractor, AutoModel

from speechmapper_tune.sfm.base import FrozenSFM, check_layer, to_output


class HFSSLSFM(FrozenSFM):
    """Frozen wav2vec 2.0 / HuBERT style encoder (see module docstring)."""

    def __init__(
        self, model, feature_extractor, layer: Optional[int] = None, batch_size: int = 8, max_seconds: float = 60.0
    ):
        super().__init__()
        if not hasattr(model, "_get_feat_extract_output_lengths"):
            raise ValueError(
                f"hf_ssl: {type(model).__name__} has no conv feature encoder (_get_feat_extract_output_lengths)"
            )
        self.model = model
        self.feature_extractor = feature_extractor
        if feature_extractor.sampling_rate != self.sampling_rate:
            raise ValueError(f"hf_ssl: feature extractor expects {feature_extractor.sampling_rate} Hz, not 16000")
        self.num_layers = model.config.num_hidden_layers
        self.layer = check_layer(layer, self.num_layers, "hf_ssl")
        self.dim = model.config.hidden_size
        stride = int(np.prod(model.config.conv_stride))
        self.frame_rate = self.sampling_rate / stride
        # Masked batching only where the model was trained with attention masks.
        self.use_mask = bool(getattr(feature_extractor, "return_attention_mask", False))
        self.batch_size = batch_size if self.use_mask else 1
        self.max_samples = int(max_seconds * self.sampling_rate)
        self.freeze()

    def num_frames(self, num_samples: int) -> int:
        """Frames of the conv feature encoder for ``num_samples`` input samples."""
        return int(self.model._get_feat_extract_output_lengths(torch.tensor([num_samples]))[0])

    def encode(self, waves: Sequence[np.ndarray]) -> List[torch.Tensor]:
        """Encode 16 kHz mono float32 waveforms; batches sorted by length to save padding."""
        waves = self.check_waves(waves, max_samples=self.max_samples)
        for i, w in enumerate(waves):
            if self.num_frames(w.size) < 1:
                raise ValueError(f"hf_ssl: waveform {i} has {w.size} samples, too short for one frame")
        order = sorted(range(len(waves)), key=lambda i: -waves[i].size)
        out: List[Optional[torch.Tensor]] = [None] * len(waves)
        p = next(self.model.parameters())
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            inputs = self.feature_extractor(
                [waves[i] for i in idx],
                sampling_rate=self.sampling_rate,
                padding=True,
                return_attention_mask=self.use_mask,
                return_tensors="pt",
            )
            kwargs = {"attention_mask": inputs.attention_mask.to(p.device)} if self.use_mask else {}
            with torch.inference_mode():
                hidden = self.model(inputs.input_values.to(p.device, p.dtype), output_hidden_states=True, **kwargs)
                hidden = hidden.hidden_states[self.layer]
            lengths = [self.num_frames(waves[i].size) for i in idx]
            for i, t in zip(idx, to_output(hidden, lengths)):
                out[i] = t
        return out  # type: ignore[return-value]


def load_hf_ssl_sfm(
    path: Optional[str],
    layer: Optional[int] = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> HFSSLSFM:
    """``HFSSLSFM`` from a local directory holding a model and its preprocessor_config.json."""
    if not path:
        raise ValueError("hf_ssl: a local model directory is required (path=...); nothing is downloaded")
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"hf_ssl: {path} has no config.json")
    if not (Path(path) / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"hf_ssl: {path} has no preprocessor_config.json (AutoFeatureExtractor)")
    fe = AutoFeatureExtractor.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
    return HFSSLSFM(model, fe, layer=layer, **kwargs).to(device)
