"""SpeechMapper losses, Eq. 1-3 of the paper, plain PyTorch.

Stage-1 targets: the LLM's embedding rows of the normalized transcript's tokens (no BOS/EOS),
then the embedding of a reserved pad token up to the projector's output length (section 2.2).

    L_MSE    = alpha * MSE_word + (10 - alpha) * MSE_pad                     (Eq. 1)
    L_stage1 = L_MSE - gamma * cosine                                        (Eq. 2)
    L_stage2 = (1 - sigma) * CE + sigma * L_MSE                              (Eq. 3)

- MSE_word runs over the word positions plus the first pad, MSE_pad over the remaining pads.
  Each is a masked mean over all (position, dimension) elements of the batch that belong to
  it; batch padding is excluded. A batch with no "remaining pads" has MSE_pad = 0.
- Predictions and targets are multiplied by ``scale`` (1e3, appendix A.3) before the MSE.
- The cosine term is the mean cosine similarity between predicted and target vectors. The
  paper does not say over which positions; by default it runs over every valid position
  (words and all pads, ``cosine_positions="all"``) so that the pad vectors are pulled in
  direction as well as in distance; ``"words"`` restricts it to the MSE_word positions.
- Everything is computed in fp32 whatever the projector's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


def build_stage1_target_ids(
    token_ids: Sequence[Sequence[int]], out_lengths: Sequence[int], pad_id: int
) -> Tensor:
    """[B, max(out_lengths)] ids: tokens, then ``pad_id`` up to each out length, then IGNORE_INDEX.

    A target needs ``len(tokens) + 1 <= out_length``: the first pad marks where the words end.
    """
    B, T = len(token_ids), max(out_lengths)
    ids = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    for i, (toks, n) in enumerate(zip(token_ids, out_lengths)):
        if len(toks) >= n:  # the first pad marks the end of the words, so it must fit too
            raise ValueError(f"target of {len(toks)} tokens + 1 pad does not fit the projector output ({n})")
        ids[i, :n] = pad_id
        ids[i, : len(toks)] = torch.as_tensor(list(toks), dtype=torch.long)
    return ids


def position_masks(lengths: Tensor, num_words: Tensor, max_len: int) -> tuple[Tensor, Tensor]:
    """(word_mask, pad_mask) [B, T]: words + first pad, and the remaining pads, within lengths."""
    pos = torch.arange(max_len, device=lengths.device)[None, :]
    valid = pos < lengths[:, None]
    word = valid & (pos <= num_words[:, None])
    return word, valid & ~word


def _masked_mean_sq(diff_sq: Tensor, mask: Tensor) -> Tensor:
    n = mask.sum() * diff_sq.shape[-1]
    if n == 0:
        return diff_sq.new_zeros(())
    return (diff_sq * mask[..., None]).sum() / n


@dataclass
class MSEParts:
    mse: Tensor  # alpha * mse_word + (10 - alpha) * mse_pad
    mse_word: Tensor
    mse_pad: Tensor


def speechmapper_mse(
    pred: Tensor, target: Tensor, lengths: Tensor, num_words: Tensor, alpha: float = 5.0, scale: float = 1e3
) -> MSEParts:
    """Eq. 1 on [B, T, D] predictions and targets; ``num_words`` counts target tokens per sample."""
    check_alpha(alpha)
    word, pad = position_masks(lengths, num_words, pred.shape[1])
    diff_sq = (scale * (pred.float() - target.float())) ** 2
    mse_word, mse_pad = _masked_mean_sq(diff_sq, word), _masked_mean_sq(diff_sq, pad)
    return MSEParts(alpha * mse_word + (10.0 - alpha) * mse_pad, mse_word, mse_pad)


def masked_cosine(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean cosine similarity over the positions where ``mask`` is True."""
    cos = F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-8)
    n = mask.sum()
    return (cos * mask).sum() / n if n > 0 else cos.new_zeros(())


def check_alpha(alpha: float) -> None:
    if not 1.0 <= float(alpha) <= 9.0:
        raise ValueError(f"loss alpha={alpha} is outside [1, 9] (paper Eq. 1: word-to-pad weight ratio)")


class Stage1Loss(nn.Module):
    """Eq. 2: ``alpha * MSE_word + (10 - alpha) * MSE_pad - gamma * cosine``."""

    def __init__(self, alpha: float = 5.0, gamma: float = 100.0, scale: float = 1e3, cosine_positions: str = "all"):
        super().__init__()
        check_alpha(alpha)
        if cosine_positions not in ("all", "words"):
            raise ValueError(f"loss cosine_positions={cosine_positions!r}: expected 'all' or 'words'")
        self.alpha, self.gamma, self.scale, self.cosine_positions = float(alpha), float(gamma), float(scale), cosine_positions

    def forward(self, pred: Tensor, target: Tensor, lengths: Tensor, num_words: Tensor) -> Dict[str, Tensor]:
        parts = speechmapper_mse(pred, target, lengths, num_words, self.alpha, self.scale)
        word, pad = position_masks(lengths, num_words, pred.shape[1])
        cosine = masked_cosine(pred, target, word | pad if self.cosine_positions == "all" else word)
        loss = parts.mse - self.gamma * cosine
        return {"loss": loss, "mse": parts.mse, "mse_word": parts.mse_word, "mse_pad": parts.mse_pad, "cosine": cosine}


LOSS_WEIGHTINGS = ("paper", "balanced")


def check_weighting(weighting: str) -> None:
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting={weighting!r}: expected one of {LOSS_WEIGHTINGS}")


def relative(term: Tensor) -> Tensor:
    """``term / stopgrad(|term|)``: value +-1, gradient that of ``log|term|``.

    Used by ``weighting="balanced"``: each term then moves the parameters in proportion to
    its *relative* change, whatever its magnitude (the x1e3-scaled MSE is ~1e4-1e5 while
    CE is ~1-10, so with the paper's weights CE's gradient is drowned; issue 7).
    """
    return term / term.detach().abs().clamp_min(1e-12)


def stage2_loss(ce: Tensor, mse: Tensor, sigma: float, weighting: str = "paper") -> Tensor:
    """Eq. 3: ``(1 - sigma) * CE + sigma * L_MSE``.

    ``weighting="balanced"`` (not in the paper): ``(1 - sigma) * CE/sg(CE) + sigma * MSE/sg(MSE)``,
    the same mix of the two terms' *relative* gradients; the value is then no longer
    comparable across weightings, so recipes log ``ce`` and ``mse`` separately.
    """
    if not 0.0 <= float(sigma) <= 1.0:
        raise ValueError(f"loss sigma={sigma} is outside [0, 1] (paper Eq. 3)")
    check_weighting(weighting)
    ce, mse = ce.float(), mse.float()
    if weighting == "balanced":
        return (1.0 - sigma) * relative(ce) + sigma * (relative(mse) if bool(mse.detach() != 0) else mse)
    return (1.0 - sigma) * ce + sigma * mse


@torch.no_grad()
def nearest_token_accuracy(pred: Tensor, target_ids: Tensor, mask: Tensor, embedding: Tensor) -> Tensor:
    """Share of masked positions whose nearest embedding row (L2) is the target token.

    A readability diagnostic that needs no LLM forward: if the nearest row is right, the LLM
    sees (close to) the right token there.
    """
    p = pred[mask].float()
    if p.numel() == 0:
        return pred.new_zeros((), dtype=torch.float32)
    emb = embedding.float()
    # ||p - e||^2 = ||p||^2 - 2 p.e + ||e||^2; ||p||^2 is constant per row
    dist = -2.0 * p @ emb.T + (emb * emb).sum(-1)[None, :]
    return (dist.argmin(-1) == target_ids[mask]).float().mean()


def norm_ratio(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean output-vector norm over mean target-vector norm at masked positions."""
    if mask.sum() == 0:
        return pred.new_zeros((), dtype=torch.float32)
    return pred[mask].float().norm(dim=-1).mean() / target[mask].float().norm(dim=-1).mean().clamp_min(1e-12)
