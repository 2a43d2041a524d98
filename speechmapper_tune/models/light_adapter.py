"""A light adapter (SpeechLLM's parameter-efficient speech-to-LLM mapper): frame stacking + a small MLP.

    features [B, T, input_dim]
      -> stack every ``stack_frames`` consecutive frames (the last group zero-padded) [B, T', k * input_dim]
      -> Linear(k * input_dim, hidden_dim) -> GELU -> Linear(hidden_dim, output_dim)
    -> vectors [B, T', output_dim], T' = output_length(T) = ceil(T / stack_frames)

No attention and no convolution stack: a few times fewer trainable parameters than the SpeechMapper
projector, which is the point of the comparison. A drop-in for ``SpeechMapperProjector``: same
forward, ``output_length``, ``output_dim`` and a config dict (``kind: "light"``) that
``build_projector_from_config`` rebuilds it from. Each output vector reads only its own frame group,
so a sample's output never depends on its batch; vectors past a sample's length are zero.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

KIND = "light"


@dataclass
class LightAdapterConfig:
    input_dim: int
    output_dim: int
    hidden_dim: int = 1024
    stack_frames: int = 4
    dropout: float = 0.1
    kind: str = KIND  # tells build_projector_from_config which projector a saved config is

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LightAdapterConfig":
        return cls(**d)


class LightAdapter(nn.Module):
    def __init__(self, cfg: LightAdapterConfig):
        super().__init__()
        if cfg.kind != KIND:
            raise ValueError(f"LightAdapterConfig.kind must be {KIND!r}, got {cfg.kind!r}")
        if cfg.stack_frames < 1 or cfg.hidden_dim < 1:
            raise ValueError(f"stack_frames ({cfg.stack_frames}) and hidden_dim ({cfg.hidden_dim}) must be >= 1")
        self.config = cfg
        self.mlp = nn.Sequential(
            nn.Linear(cfg.stack_frames * cfg.input_dim, cfg.hidden_dim),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden_dim, cfg.output_dim),
        )

    @property
    def input_dim(self) -> int:
        return self.config.input_dim

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def output_length(self, length: Tensor | int) -> Tensor | int:
        k = self.config.stack_frames
        if isinstance(length, Tensor):
            return torch.div(length + k - 1, k, rounding_mode="floor")
        return (length + k - 1) // k

    def forward(self, features: Tensor, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """features [B, T, input_dim], lengths [B] -> (vectors [B, T', output_dim], out_lengths [B])."""
        if features.dim() != 3 or features.shape[-1] != self.config.input_dim:
            raise ValueError(f"expected features [B, T, {self.config.input_dim}], got {tuple(features.shape)}")
        B, T, D = features.shape
        if lengths is None:
            lengths = torch.full((B,), T, device=features.device, dtype=torch.long)
        out_lengths = self.output_length(lengths)
        if bool((out_lengths < 1).any()):
            raise ValueError(f"input too short for the adapter: lengths {lengths.tolist()} give {out_lengths.tolist()}")
        k = self.config.stack_frames
        n = -(-T // k)
        real = torch.arange(n * k, device=features.device)[None, :] < lengths[:, None]
        x = torch.nn.functional.pad(features, (0, 0, 0, n * k - T)).masked_fill(~real[..., None], 0.0)
        out = self.mlp(x.reshape(B, n, k * D))  # padded frames are zero, as at the end of an unbatched sample
        keep = torch.arange(n, device=features.device)[None, :] < out_lengths[:, None]
        return out.masked_fill(~keep[..., None], 0.0), out_lengths


def light_adapter(
    input_dim: int, output_dim: int, hidden_dim: int = 1024, stack_frames: int = 4, dropout: float = 0.1
) -> LightAdapter:
    """Builder for YAML ``model: {_component_: speechmapper_tune.models.light_adapter.light_adapter, ...}``."""
    return LightAdapter(LightAdapterConfig(input_dim, output_dim, hidden_dim, stack_frames, dropout))
