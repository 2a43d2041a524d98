"""Frozen SeamlessM4T-v2 speech encoder (the paper's SFM) from a local directory.

Why: the paper extracts features from the 24th conformer layer of seamless-m4t-v2-large.
No weights are reachable offline, so this loads any local SeamlessM4T-v2 checkpoint
(full ``SeamlessM4Tv2Model``, ``...ForSpeechToText``, or a saved speech encoder alone)
and keeps only the speech encoder, read key by key from the safetensors files.

Features: ``SeamlessM4TFeatureExtractor`` from the same directory (80-bin fbank at
100 frames/s stacked by 2 -> 160-dim input at 50 frames/s). The conformer does not
subsample, so an utterance keeps as many frames as its attention mask has ones
(``(1 + (n - 400) // 160) // 2`` for ``n`` samples). Batches are padded per batch and
masked; the result does not depend on the batch (tested).

Layers. ``layer=k``: 0 is the feature-projection output, ``k`` in ``1..L-1`` the output of
conformer layer ``k``, ``L`` (default, also -1) the conformer stack's output after its
final layer norm. For seamless-m4t-v2-large, ``L = 24`` is the paper's choice. The
length adaptor (8x subsampling) that follows in the full speech encoder is not used.
transformers' own ``output_hidden_states`` is not used because its last entry is
replaced by the adaptor output, which has another length.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from transformers import SeamlessM4TFeatureExtractor, SeamlessM4Tv2Config
from transformers.models.seamless_m4t_v2.modeling_seamless_m4t_v2 import SeamlessM4Tv2SpeechEncoder

from speechmapper_tune.sfm.base import FrozenSFM, check_layer, to_output

_PREFIXES = ("speech_encoder.", "model.speech_encoder.", "seamless_m4t_v2.speech_encoder.")
_MODULES = ("feature_projection", "encoder", "intermediate_ffn", "adapter", "inner_layer_norm")


def _weight_files(path: Path) -> List[Path]:
    """All weight files of a HF checkpoint directory (sharded or not)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            return [path / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (path / single).is_file():
            return [path / single]
    raise FileNotFoundError(f"{path}: no model.safetensors / pytorch_model.bin (or their index) found")


def load_speech_encoder_state(path: str | Path) -> Dict[str, torch.Tensor]:
    """Speech-encoder weights only, prefix removed; other weights are never read."""
    from safetensors import safe_open

    files = _weight_files(Path(path))
    tables = []  # (file, {key: tensor or None}) with safetensors read lazily
    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), framework="pt") as sf:
                tables.append((f, dict.fromkeys(sf.keys())))
        else:
            tables.append((f, torch.load(f, map_location="cpu", weights_only=True, mmap=True)))
    keys = [k for _, table in tables for k in table]
    rename = {k: k[len(p) :] for k in keys for p in _PREFIXES if k.startswith(p)}
    if not rename:  # saved from SeamlessM4Tv2SpeechEncoder itself: unprefixed keys
        rename = {k: k for k in keys if k.split(".")[0] in _MODULES}
    if not rename:
        raise ValueError(f"{path}: no speech-encoder weights found (keys starting with {_PREFIXES})")
    state: Dict[str, torch.Tensor] = {}
    for f, table in tables:
        wanted = [k for k in table if k in rename]
        if f.suffix == ".safetensors" and wanted:
            with safe_open(str(f), framework="pt") as sf:
                state.update({rename[k]: sf.get_tensor(k) for k in wanted})
        else:
            state.update({rename[k]: table[k] for k in wanted})
    return state


def load_seamless_speech_encoder(path: str | Path, dtype: torch.dtype = torch.float32) -> SeamlessM4Tv2SpeechEncoder:
    """Build the speech encoder from ``path/config.json`` and load its weights strictly."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"seamless_m4t_v2: {path} has no config.json; pass a local SeamlessM4T-v2 model directory"
        )
    config = SeamlessM4Tv2Config.from_pretrained(path)
    if config.model_type != "seamless_m4t_v2":
        raise ValueError(
            f"seamless_m4t_v2: {path}/config.json has model_type {config.model_type!r}, expected 'seamless_m4t_v2'"
        )
    encoder = SeamlessM4Tv2SpeechEncoder(config)
    state = load_speech_encoder_state(path)
    # Strict, but with an error that names the directory.
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"seamless_m4t_v2: {path}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return encoder.to(dtype)


class SeamlessSFM(FrozenSFM):
    """Frozen SeamlessM4T-v2 conformer features at 50 frames/s (see module docstring)."""

    frame_rate = 50.0

    def __init__(
        self,
        encoder: SeamlessM4Tv2SpeechEncoder,
        feature_extractor: SeamlessM4TFeatureExtractor,
        layer: Optional[int] = None,
        batch_size: int = 8,
        max_seconds: float = 60.0,
    ):
        super().__init__()
        self.encoder = encoder
        self.feature_extractor = feature_extractor
        if feature_extractor.sampling_rate != self.sampling_rate:
            raise ValueError(
                f"seamless_m4t_v2: feature extractor expects {feature_extractor.sampling_rate} Hz, not 16000"
            )
        self.num_layers = len(encoder.encoder.layers)
        self.layer = check_layer(layer, self.num_layers, "seamless_m4t_v2")
        self.dim = encoder.config.hidden_size
        self.batch_size = batch_size
        self.max_samples = int(max_seconds * self.sampling_rate)  # attention memory is quadratic
        self.freeze()

    def num_frames(self, num_samples: int) -> int:
        """Frames for ``num_samples``: fbank frames (25 ms window, 10 ms hop) stacked by 2."""
        return max(0, (1 + (num_samples - 400) // 160)) // self.feature_extractor.stride

    def _tap(self) -> torch.nn.Module:
        """Submodule whose output is the requested layer."""
        if self.layer == 0:
            return self.encoder.feature_projection
        if self.layer == self.num_layers:
            return self.encoder.encoder  # conformer stack incl. its final layer norm
        return self.encoder.encoder.layers[self.layer - 1]

    def encode(self, waves: Sequence[np.ndarray]) -> List[torch.Tensor]:
        """Encode 16 kHz mono float32 waveforms; batches sorted by length to save padding."""
        waves = self.check_waves(waves, max_samples=self.max_samples)
        for i, w in enumerate(waves):
            if self.num_frames(w.size) < 1:
                raise ValueError(
                    f"seamless_m4t_v2: waveform {i} has {w.size} samples; at least 560 are needed for one frame"
                )
        order = sorted(range(len(waves)), key=lambda i: -waves[i].size)
        out: List[Optional[torch.Tensor]] = [None] * len(waves)
        captured: List[torch.Tensor] = []
        hook = self._tap().register_forward_hook(lambda m, a, o: captured.append(o[0] if isinstance(o, tuple) else o))
        p = next(self.encoder.parameters())
        try:
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                inputs = self.feature_extractor(
                    [waves[i] for i in idx], sampling_rate=self.sampling_rate, padding=True, return_tensors="pt"
                )
                captured.clear()
                with torch.inference_mode():
                    self.encoder(
                        inputs.input_features.to(p.device, p.dtype), attention_mask=inputs.attention_mask.to(p.device)
                    )
                lengths = inputs.attention_mask.sum(-1).tolist()
                for i, t in zip(idx, to_output(captured[-1], lengths)):
                    out[i] = t
        finally:
            hook.remove()
        return out  # type: ignore[return-value]


def load_seamless_sfm(
    path: Optional[str],
    layer: Optional[int] = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> SeamlessSFM:
    """``SeamlessSFM`` from a local SeamlessM4T-v2 directory (config, weights, preprocessor_config)."""
    if not path:
        raise ValueError("seamless_m4t_v2: a local model directory is required (path=...); nothing is downloaded")
    if not (Path(path) / "preprocessor_config.json").is_file():
        raise FileNotFoundError(
            f"seamless_m4t_v2: {path} has no preprocessor_config.json (SeamlessM4TFeatureExtractor)"
        )
    fe = SeamlessM4TFeatureExtractor.from_pretrained(path)
    return SeamlessSFM(load_seamless_speech_encoder(path, dtype), fe, layer=layer, **kwargs).to(device)
