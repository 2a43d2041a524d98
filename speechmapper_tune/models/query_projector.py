"""A query projector: learned queries cross-attending the SFM frames over fixed windows.

    features [B, T, input_dim]
      -> cut into windows of ``window_frames`` frames (the last one padded)
      -> per window: ``queries_per_window`` learned queries, ``num_layers`` Transformer decoder layers
         (self-attention among the queries + cross-attention to the window's frames)
      -> Linear(model_dim, output_dim)
    -> vectors [B, T', output_dim], T' = output_length(T) = ceil(T / window_frames) * queries_per_window

The windowed Q-Former of SLAM-LLM / SALMONN (SparQLe's query adapter over fixed windows): long
audio gets proportionally many queries, as the conv projector's outputs grow with the audio.
``window_frames: null`` is SparQLe's own form: one window over the whole utterance, so every
utterance gets the same ``queries_per_window`` vectors (frame positions then sinusoidal, as any
length must be read).
A drop-in for ``SpeechMapperProjector``: same forward, ``output_length``, ``output_dim`` and a
config dict (``kind: "query"``) that ``build_projector_from_config`` rebuilds it from.

Variable-length batches: padded frames are zeroed and masked out of cross-attention, outputs past
a sample's length are zero, so a sample's output does not depend on its batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

KIND = "query"


@dataclass
class QueryProjectorConfig:
    input_dim: int
    output_dim: int
    model_dim: int = 256
    num_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 1024
    window_frames: Optional[int] = 8  # None: one window over the whole utterance (a fixed number of queries)
    queries_per_window: int = 2
    dropout: float = 0.1
    kind: str = KIND  # tells build_projector_from_config which projector a saved config is

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "QueryProjectorConfig":
        return cls(**d)


def _length_mask(lengths: Tensor, max_len: int) -> Tensor:
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class QueryProjector(nn.Module):
    def __init__(self, cfg: QueryProjectorConfig):
        super().__init__()
        if cfg.kind != KIND:
            raise ValueError(f"QueryProjectorConfig.kind must be {KIND!r}, got {cfg.kind!r}")
        if (cfg.window_frames is not None and cfg.window_frames < 1) or cfg.queries_per_window < 1:
            raise ValueError("window_frames (or null) and queries_per_window must be >= 1")
        self.config = cfg
        D = cfg.model_dim
        self.inp = nn.Linear(cfg.input_dim, D)
        if cfg.window_frames is not None:
            self.frame_pos = nn.Parameter(torch.randn(cfg.window_frames, D) * 0.02)  # position within the window
        self.queries = nn.Parameter(torch.randn(cfg.queries_per_window, D) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(D, cfg.num_heads, cfg.ffn_dim, cfg.dropout, batch_first=True, norm_first=True)
            for _ in range(cfg.num_layers)
        )
        self.norm = nn.LayerNorm(D)
        self.final = nn.Linear(D, cfg.output_dim)

    @property
    def input_dim(self) -> int:
        return self.config.input_dim

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def output_length(self, length: Tensor | int) -> Tensor | int:
        W, Q = self.config.window_frames, self.config.queries_per_window
        if W is None:  # one window, whatever the length
            return torch.full_like(length, Q) if isinstance(length, Tensor) else Q
        if isinstance(length, Tensor):
            return torch.div(length + W - 1, W, rounding_mode="floor") * Q
        return (length + W - 1) // W * Q

    def forward(self, features: Tensor, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """features [B, T, input_dim], lengths [B] -> (vectors [B, T', output_dim], out_lengths [B])."""
        if features.dim() != 3 or features.shape[-1] != self.config.input_dim:
            raise ValueError(f"expected features [B, T, {self.config.input_dim}], got {tuple(features.shape)}")
        B, T, _ = features.shape
        if lengths is None:
            lengths = torch.full((B,), T, device=features.device, dtype=torch.long)
        out_lengths = self.output_length(lengths)
        if bool((out_lengths < 1).any()):
            raise ValueError(
                f"input too short for the projector: lengths {lengths.tolist()} give {out_lengths.tolist()}"
            )
        W, Q = self.config.window_frames or T, self.config.queries_per_window
        n_win = -(-T // W)
        mask = _length_mask(lengths, n_win * W)  # [B, n_win * W], True = real frame
        x = torch.nn.functional.pad(features, (0, 0, 0, n_win * W - T))
        x = x.masked_fill(~mask[..., None], 0.0)  # padded frames never reach the weights
        x = self.inp(x).view(B * n_win, W, -1) + self._frame_positions(W, x)
        ignore = ~mask.view(B * n_win, W)
        ignore = ignore & ~ignore.all(
            dim=1, keepdim=True
        )  # all-padding windows: attend anything (no NaN), output zeroed below
        q = self.queries.expand(B * n_win, Q, -1)
        for layer in self.layers:
            q = layer(q, x, memory_key_padding_mask=ignore)
        out = self.final(self.norm(q)).view(B, n_win * Q, -1)
        return out.masked_fill(~_length_mask(out_lengths, n_win * Q)[..., None], 0.0), out_lengths

    def _frame_positions(self, W: int, like: Tensor) -> Tensor:
        if self.config.window_frames is not None:
            return self.frame_pos
        from speechmapper_tune.models.projector import (
            sinusoidal_positions,
        )  # imported here: projector.py imports this file

        return sinusoidal_positions(W, self.config.model_dim, like.device, like.dtype)


def query_projector(
    input_dim: int,
    output_dim: int,
    model_dim: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    ffn_multiplier: float = 4.0,
    window_frames: Optional[int] = 8,
    queries_per_window: int = 2,
    dropout: float = 0.1,
) -> QueryProjector:
    """Builder for YAML ``model: {_component_: speechmapper_tune.models.query_projector.query_projector, ...}``."""
    ffn_dim = int(round(ffn_multiplier * model_dim))
    return QueryProjector(
        QueryProjectorConfig(
            input_dim, output_dim, model_dim, num_layers, num_heads, ffn_dim, window_frames, queries_per_window, dropout
        )
    )
