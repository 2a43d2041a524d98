"""The SpeechMapper projector (paper section 2.1 and appendix A.1), plain PyTorch.

    features [B, T, input_dim]  (frozen SFM frames, already averaged by 2 at extraction)
      -> block 1: Conv1d(k=6, s=2) -> N Transformer encoder layers -> Linear up-projection
      -> block 2: Conv1d(k=6, s=2) -> N Transformer encoder layers -> Linear up-projection
      -> final Linear(llm_dim, llm_dim)
    -> vectors [B, T', llm_dim], T' = output_length(T)

Paper preset: 1024 -> (block 1 at 1024, up to 2048) -> (block 2 at 2048, up to 4096) -> 4096x4096,
six layers per block, dropout 0.1. Choices the paper leaves open, made here:
- FFN width: 1.5x the block width (1536, 3072). The paper gives 277M parameters but no FFN size;
  1.5x gives 279.1M (see ``count_parameters``; 1x gives 247.7M, 2x 310.6M, 4x 436.5M).
- Pre-norm layers (LayerNorm before attention/FFN). The paper cites the original (post-norm)
  Transformer encoder; pre-norm trains stably with the short warm-ups of CPU-sized runs.
  ``norm_first=False`` gives the post-norm layer.
- Sinusoidal positions are added after each convolution (the convolutions alone give the
  attention layers no absolute position; fairseq-style speech encoders do the same).
- Convolution padding (k - s) // 2 = 2, so each block halves the length: T' = floor(T / 2).

Variable-length batches: positions past a sample's length are zeroed before every convolution
and masked out of attention keys, so a sample's output does not depend on its batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from speechmapper_tune.models import light_adapter as la
from speechmapper_tune.models import query_projector as qp


@dataclass
class BlockConfig:
    model_dim: int  # width of the convolution output and the Transformer stack
    out_dim: int  # width after the block's up-projection
    num_layers: int = 6
    num_heads: int = 16
    ffn_dim: int = 0  # 0 means 4 * model_dim


@dataclass
class ProjectorConfig:
    input_dim: int
    output_dim: int
    blocks: List[BlockConfig] = field(default_factory=list)
    kernel_size: int = 6
    stride: int = 2
    dropout: float = 0.1
    norm_first: bool = True

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ProjectorConfig":
        d = dict(d)
        d["blocks"] = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in d["blocks"]]
        return cls(**d)


def conv_output_length(length: Tensor | int, kernel_size: int, stride: int) -> Tensor | int:
    """Output length of one Conv1d with padding (k - s) // 2."""
    padding = (kernel_size - stride) // 2
    if isinstance(length, Tensor):
        return torch.clamp(torch.div(length + 2 * padding - kernel_size, stride, rounding_mode="floor") + 1, min=0)
    return max(0, (length + 2 * padding - kernel_size) // stride + 1)


def sinusoidal_positions(length: int, dim: int, device=None, dtype=None) -> Tensor:
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    inv = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(pos * inv)
    pe[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return pe.to(dtype) if dtype is not None else pe


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"model_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        # key_mask [B, T] True = real frame; broadcast over heads and queries
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class EncoderLayer(nn.Module):
    """A Transformer encoder layer (self-attention + ReLU FFN), pre- or post-norm."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, norm_first: bool):
        super().__init__()
        self.attn = SelfAttention(dim, num_heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        if self.norm_first:
            x = x + self.drop(self.attn(self.norm1(x), key_mask))
            return x + self.drop(self.ffn(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, key_mask)))
        return self.norm2(x + self.drop(self.ffn(x)))


class ProjectorBlock(nn.Module):
    """Conv1d(k, s) -> Transformer stack -> Linear up-projection."""

    def __init__(self, in_dim: int, cfg: BlockConfig, kernel_size: int, stride: int, dropout: float, norm_first: bool):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.conv = nn.Conv1d(in_dim, cfg.model_dim, kernel_size, stride, padding=(kernel_size - stride) // 2)
        ffn_dim = cfg.ffn_dim or 4 * cfg.model_dim
        self.layers = nn.ModuleList(
            EncoderLayer(cfg.model_dim, cfg.num_heads, ffn_dim, dropout, norm_first) for _ in range(cfg.num_layers)
        )
        self.final_norm = nn.LayerNorm(cfg.model_dim) if norm_first else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.up = nn.Linear(cfg.model_dim, cfg.out_dim)

    def forward(self, x: Tensor, lengths: Tensor) -> Tuple[Tensor, Tensor]:
        x = x.masked_fill(~_length_mask(lengths, x.shape[1])[..., None], 0.0)  # batch padding reads as conv padding
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        lengths = conv_output_length(lengths, self.kernel_size, self.stride)
        mask = _length_mask(lengths, x.shape[1])
        x = self.drop(x + sinusoidal_positions(x.shape[1], x.shape[2], x.device, x.dtype))
        for layer in self.layers:
            x = layer(x, mask)
        x = self.up(self.final_norm(x))
        return x.masked_fill(~mask[..., None], 0.0), lengths


def _length_mask(lengths: Tensor, max_len: int) -> Tensor:
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class SpeechMapperProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        if not cfg.blocks:
            raise ValueError("ProjectorConfig.blocks is empty: the projector needs at least one block")
        self.config = cfg
        blocks, in_dim = [], cfg.input_dim
        for b in cfg.blocks:
            blocks.append(ProjectorBlock(in_dim, b, cfg.kernel_size, cfg.stride, cfg.dropout, cfg.norm_first))
            in_dim = b.out_dim
        self.blocks = nn.ModuleList(blocks)
        self.final = nn.Linear(in_dim, cfg.output_dim)

    @property
    def input_dim(self) -> int:
        return self.config.input_dim

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def output_length(self, length: Tensor | int) -> Tensor | int:
        for _ in self.blocks:
            length = conv_output_length(length, self.config.kernel_size, self.config.stride)
        return length

    def forward(self, features: Tensor, lengths: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """features [B, T, input_dim], lengths [B] -> (vectors [B, T', output_dim], out_lengths [B])."""
        if features.dim() != 3 or features.shape[-1] != self.config.input_dim:
            raise ValueError(f"expected features [B, T, {self.config.input_dim}], got {tuple(features.shape)}")
        if lengths is None:
            lengths = torch.full((features.shape[0],), features.shape[1], device=features.device, dtype=torch.long)
        out_lengths = self.output_length(lengths)
        if bool((out_lengths < 1).any()):
            raise ValueError(
                f"input too short for the projector: lengths {lengths.tolist()} give {out_lengths.tolist()}"
            )
        x = features
        for block in self.blocks:
            x, lengths = block(x, lengths)
        x = self.final(x)
        return x.masked_fill(~_length_mask(lengths, x.shape[1])[..., None], 0.0), lengths


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def speechmapper_projector(
    input_dim: int,
    output_dim: int,
    block_model_dims: Sequence[int],
    block_out_dims: Sequence[int],
    num_layers: int = 6,
    num_heads: int = 16,
    ffn_multiplier: float = 1.5,
    kernel_size: int = 6,
    stride: int = 2,
    dropout: float = 0.1,
    norm_first: bool = True,
) -> SpeechMapperProjector:
    """Generic builder: one block per entry of ``block_model_dims`` / ``block_out_dims``."""
    if len(block_model_dims) != len(block_out_dims):
        raise ValueError("block_model_dims and block_out_dims must have the same length")
    blocks = [
        BlockConfig(m, o, num_layers, num_heads, int(round(ffn_multiplier * m)))
        for m, o in zip(block_model_dims, block_out_dims)
    ]
    return SpeechMapperProjector(
        ProjectorConfig(input_dim, output_dim, blocks, kernel_size, stride, dropout, norm_first)
    )


def speechmapper_paper(input_dim: int = 1024, output_dim: int = 4096, **kw) -> SpeechMapperProjector:
    """Paper preset (A.1): SeamlessM4T-v2 1024 -> 2048 -> 4096 (Llama-3.1-8B / EuroLLM-9B), 279.1M."""
    return speechmapper_projector(input_dim, output_dim, (1024, 2048), (2048, output_dim), **kw)


def speechmapper_small(
    input_dim: int = 512, output_dim: int = 576, model_dim: int = 256, num_layers: int = 2, num_heads: int = 4, **kw
) -> SpeechMapperProjector:
    """Embedded default: Whisper-base 512 -> SmolLM2-135M 576, blocks at width 256 (CPU-sized)."""
    return speechmapper_projector(
        input_dim, output_dim, (model_dim, model_dim), (model_dim, output_dim), num_layers, num_heads, **kw
    )


def speechmapper_tiny(input_dim: int = 16, output_dim: int = 32, **kw) -> SpeechMapperProjector:
    """Test preset: two blocks of one layer at width 32."""
    kw = {"num_layers": 1, "num_heads": 2, **kw}
    return speechmapper_projector(input_dim, output_dim, (32, 32), (32, output_dim), **kw)


def build_projector_from_config(cfg: Dict[str, Any] | ProjectorConfig) -> nn.Module:
    """Rebuild a projector from the JSON config saved next to its weights (conv, ``kind: "query"`` or ``"light"``)."""
    if isinstance(cfg, qp.QueryProjectorConfig) or (isinstance(cfg, dict) and cfg.get("kind") == qp.KIND):
        return qp.QueryProjector(
            cfg if isinstance(cfg, qp.QueryProjectorConfig) else qp.QueryProjectorConfig.from_dict(cfg)
        )
    if isinstance(cfg, la.LightAdapterConfig) or (isinstance(cfg, dict) and cfg.get("kind") == la.KIND):
        return la.LightAdapter(cfg if isinstance(cfg, la.LightAdapterConfig) else la.LightAdapterConfig.from_dict(cfg))
    if not isinstance(cfg, ProjectorConfig):
        cfg = ProjectorConfig.from_dict(cfg)  # configs without "kind" (every older checkpoint) are conv projectors
    return SpeechMapperProjector(cfg)
