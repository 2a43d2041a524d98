"""SpeechMapper losses, Eq. 1-3 of the paper, plain PyTorch.

Stage-1 targets: the LLM's embedding rows of the normalized transcript's tokens (no BOS/EOS),
then the embedding of a reserved pad token up to the projector's output length (section 2.2).

    L_MSE    = alpha * MSE_word + (10 - alpha) * MSE_pad                     (Eq. 1)
    L_stage1 = L_MSE - gamma * cosine                                        (Eq. 2)
    L_stage2 = (1 - sigma) * CE + sigma * L_MSE                              (Eq. 3, Stage2Loss)

- MSE_word runs over the word positions plus the first pad, MSE_pad over the remaining pads.
  Each is a masked mean over all (position, dimension) elements of the batch that belong to
  it; batch padding is excluded. A batch with no "remaining pads" has MSE_pad = 0.
- Predictions and targets are multiplied by ``scale`` (1e3, appendix A.3) before the MSE.
- The cosine term is the mean cosine similarity between predicted and target vectors. The
  paper does not say over which positions; by default it runs over every valid position
  (words and all pads, ``cosine_positions="all"``) so that the pad vectors are pulled in
  direction as well as in distance; ``"words"`` restricts it to the MSE_word positions.
- Everything is computed in fp32 whatever the projector's dtype.
- Not in the paper, off by default: ``Stage1Loss(weighting="balanced")``, an
  embedding-table classifier term (``classifier_weight``) and a CTC term over the same logits
  (``ctc_weight``); see :class:`Stage1Loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100


def build_stage1_target_ids(token_ids: Sequence[Sequence[int]], out_lengths: Sequence[int], pad_id: int) -> Tensor:
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
    """Eq. 2: ``alpha * MSE_word + (10 - alpha) * MSE_pad - gamma * cosine``, plus two levers beyond the paper.

    ``forward`` returns ``loss`` = the paper's Eq. 2 value whatever the options (so curves compare
    across runs) and ``objective`` = what is backpropagated; with the defaults they are equal.

    Deviations from the paper, all off by default:

    - ``weighting="balanced"``: ``objective = relative(L_MSE) + relative(1 - cosine)``
      (+ ``classifier_weight * relative(CE)``), i.e. the gradient of ``log L_MSE + log(1 - cos)``.
      Why: with the paper's weights the x1e3-scaled MSE (~6e4) drowns the cosine term
      (gamma * cos <= 100). ``alpha`` still splits words vs pads inside the MSE; ``scale`` and
      ``gamma`` no longer matter (except ``gamma=0``, which drops the cosine term).
    - ``classifier_weight > 0``: adds an LLM-free embedding-table classifier (the paper names an
      ASR loss as future work, section 5): cross-entropy of the target ids under
      :func:`embedding_classifier_logits` over the MSE_word positions. Paper weighting adds
      ``classifier_weight * CE``. Needs :meth:`set_embedding` and ``target_ids``.
      ``classifier_temperature`` is relative to the table's mean squared row norm. Measured on
      SmolLM2 with pred == E[target]: CE 0.01 nats for random tokens and 0.09 for a transcript's
      tokens (a floor set by near-duplicate rows; 0.96 at 0.1, 4.2 at 0.2), while the mean row
      (an uninformative prediction) scores 13-24 nats; hence the default 0.05 (~0 on the tiny table).
    - ``ctc_weight > 0``: adds CTC (the paper's future work, section 5) of the transcript tokens over
      every output vector, with the same distance logits and the pad token as the blank: an
      alignment-free signal (the tokens in order, at any positions), where the MSE and classifier
      terms fix token i at vector i (see :func:`embedding_ctc`). Paper weighting adds ``ctc_weight * CTC``, balanced
      ``ctc_weight * relative(CTC)``. Needs :meth:`set_embedding` with ``blank_id``.
    - ``classifier_negatives`` (an int; None = the whole table): while training, the classifier and
      CTC terms score a sampled softmax instead of all rows (:func:`draw_candidates`): the batch's
      target ids (+ the blank) and the ``classifier_neighbours`` nearest table rows of each, every one
      of them scored, plus ``classifier_negatives`` rows drawn uniformly from the rest, each weighted
      to stand for its share of the rest (so the normalizer is unbiased and the logged value tracks the
      full CE). On SmolLM2 the full-table term is most of a step's FLOPs; in ``eval()`` mode
      (validation) both terms score the whole table, so ``val_classifier_ce`` stays comparable.
      The draws use the global torch RNG (saved in checkpoints, so a resume redraws the same rows).
    """

    def __init__(
        self,
        alpha: float = 5.0,
        gamma: float = 100.0,
        scale: float = 1e3,
        cosine_positions: str = "all",
        weighting: str = "paper",
        classifier_weight: float = 0.0,
        classifier_temperature: float = 0.05,
        ctc_weight: float = 0.0,
        classifier_negatives: Optional[int] = None,
        classifier_neighbours: int = 0,
    ):
        super().__init__()
        check_alpha(alpha)
        check_weighting(weighting)
        if cosine_positions not in ("all", "words"):
            raise ValueError(f"loss cosine_positions={cosine_positions!r}: expected 'all' or 'words'")
        if float(classifier_weight) < 0 or float(classifier_temperature) <= 0:
            raise ValueError(
                f"loss classifier_weight={classifier_weight} must be >= 0 and "
                f"classifier_temperature={classifier_temperature} > 0"
            )
        self.alpha, self.gamma, self.scale, self.cosine_positions = (
            float(alpha),
            float(gamma),
            float(scale),
            cosine_positions,
        )
        self.weighting = weighting
        if float(ctc_weight) < 0:
            raise ValueError(f"loss ctc_weight={ctc_weight} must be >= 0")
        self.classifier_weight, self.classifier_temperature = float(classifier_weight), float(classifier_temperature)
        self.ctc_weight = float(ctc_weight)
        if classifier_negatives is not None and (
            isinstance(classifier_negatives, bool) or int(classifier_negatives) < 0
        ):
            raise ValueError(
                f"loss classifier_negatives={classifier_negatives!r}: expected null (the whole table) "
                "or a number of sampled rows >= 0"
            )
        if int(classifier_neighbours) < 0 or (int(classifier_neighbours) > 0 and classifier_negatives is None):
            raise ValueError(
                f"loss classifier_neighbours={classifier_neighbours} must be >= 0, and needs "
                "classifier_negatives set (the whole table already holds every neighbour)"
            )
        self.classifier_negatives = None if classifier_negatives is None else int(classifier_negatives)
        self.classifier_neighbours = int(classifier_neighbours)
        self.table: Optional[EmbeddingTable] = None
        self.neighbours: Optional[TableNeighbours] = None
        self.blank_id: Optional[int] = None

    def set_embedding(self, embedding: Tensor, blank_id: Optional[int] = None) -> None:
        """Give the loss the LLM's [vocab, dim] embedding table (the recipe loads it anyway) and,
        for the CTC term, its blank: the pad id the stage-1 targets are padded with."""
        self.table = EmbeddingTable.from_weight(embedding)
        self.neighbours = (
            TableNeighbours(self.table, self.classifier_neighbours) if self.classifier_neighbours else None
        )
        self.blank_id = None if blank_id is None else int(blank_id)

    @property
    def sampled(self) -> bool:
        """Whether the classifier/CTC terms score sampled candidates now (training with classifier_negatives)."""
        return self.training and self.classifier_negatives is not None

    def _candidates(self, must: Tensor) -> tuple[Tensor, Tensor]:
        extra = self.neighbours.lookup(must) if self.neighbours is not None else None
        return draw_candidates(must, self.table.weight.shape[0], self.classifier_negatives, extra)

    def forward(
        self, pred: Tensor, target: Tensor, lengths: Tensor, num_words: Tensor, target_ids: Optional[Tensor] = None
    ) -> Dict[str, Tensor]:
        parts = speechmapper_mse(pred, target, lengths, num_words, self.alpha, self.scale)
        word, pad = position_masks(lengths, num_words, pred.shape[1])
        cosine = masked_cosine(pred, target, word | pad if self.cosine_positions == "all" else word)
        loss = parts.mse - self.gamma * cosine
        out = {"loss": loss, "mse": parts.mse, "mse_word": parts.mse_word, "mse_pad": parts.mse_pad, "cosine": cosine}
        ce = None
        if self.classifier_weight > 0:
            if target_ids is None:
                raise ValueError("loss classifier_weight > 0 needs target_ids in Stage1Loss.forward")
            ce = out["classifier_ce"] = self.classifier_ce(pred, target_ids, lengths, num_words)
        ctc = None
        if self.ctc_weight > 0:
            if target_ids is None:
                raise ValueError("loss ctc_weight > 0 needs target_ids in Stage1Loss.forward")
            ctc = out["ctc"] = self.ctc(pred, target_ids, lengths, num_words)
        out["objective"] = self._objective(loss, parts.mse, cosine, ce, ctc)
        return out

    def classifier_ce(self, pred: Tensor, target_ids: Tensor, lengths: Tensor, num_words: Tensor) -> Tensor:
        """Mean CE of the target ids over the MSE_word positions (words + first pad)."""
        if self.table is None:
            raise ValueError(
                "loss classifier needs the LLM embedding table: call loss_fn.set_embedding(table) first "
                "(the stage-1 recipe does) or set loss.classifier_weight=0"
            )
        word, _ = position_masks(lengths, num_words, pred.shape[1])
        if self.sampled and bool(word.any()):
            targets = target_ids[word]
            candidates, log_weights = self._candidates(targets)
            return candidate_ce(pred[word], targets, self.table, self.classifier_temperature, candidates, log_weights)
        return embedding_classifier_ce(pred, target_ids, word, self.table, self.classifier_temperature)

    def ctc(self, pred: Tensor, target_ids: Tensor, lengths: Tensor, num_words: Tensor) -> Tensor:
        """CTC of the transcript tokens over the ``lengths`` output vectors; see :func:`embedding_ctc`."""
        if self.table is None or self.blank_id is None:
            raise ValueError(
                "loss CTC needs the LLM embedding table and the pad id as blank: call "
                "loss_fn.set_embedding(table, blank_id=pad_id) first (the stage-1 recipe does) or set loss.ctc_weight=0"
            )
        if self.sampled:
            word_pos = torch.arange(target_ids.shape[1], device=target_ids.device)[None, :] < num_words[:, None]
            must = torch.cat([target_ids[word_pos], target_ids.new_tensor([self.blank_id])])
            candidates, log_weights = self._candidates(must)
            return embedding_ctc(
                pred,
                target_ids,
                lengths,
                num_words,
                self.table,
                self.classifier_temperature,
                self.blank_id,
                candidates=(candidates, log_weights),
            )
        return embedding_ctc(
            pred, target_ids, lengths, num_words, self.table, self.classifier_temperature, self.blank_id
        )

    def _objective(
        self, loss: Tensor, mse: Tensor, cosine: Tensor, ce: Optional[Tensor], ctc: Optional[Tensor] = None
    ) -> Tensor:
        if self.weighting == "paper":
            objective = loss if ce is None else loss + self.classifier_weight * ce
            return objective if ctc is None else objective + self.ctc_weight * ctc
        objective = relative(mse)
        if self.gamma > 0:  # gamma=0 means "no cosine term" in both weightings
            objective = objective + relative(1.0 - cosine)
        if ce is not None:
            objective = objective + self.classifier_weight * relative(ce)
        if ctc is not None:
            objective = objective + self.ctc_weight * relative(ctc)
        return objective


@dataclass
class EmbeddingTable:
    """An LLM embedding table in fp32 with what the classifier logits need precomputed."""

    weight: Tensor  # [vocab, dim] fp32
    sq_norms: Tensor  # [vocab] ||e||^2
    mean_sq_norm: float  # sets the unit of the classifier temperature

    @classmethod
    def from_weight(cls, weight: Tensor) -> "EmbeddingTable":
        w = weight.detach().float()
        sq = (w * w).sum(-1)
        return cls(w, sq, float(sq.mean().clamp_min(1e-12)))


def embedding_classifier_logits(pred: Tensor, table: EmbeddingTable, temperature: float) -> Tensor:
    """``-||pred - e||^2 / (temperature * mean ||e||^2)`` for every row ``e``, up to a per-row constant.

    Computed as ``(2 pred @ E^T - ||E||^2) / (...)``: the ``||pred||^2`` term is the same for
    every class, so softmax ignores it. Plain ``pred @ E^T`` is not used: larger-norm rows
    outscore a target's own row (with pred == E[target], SmolLM2's target is the argmax for
    only 10% of random tokens and 69% of transcript tokens), so even exact targets keep a CE
    >= 3 nats at any temperature. Distances make the exact row the argmax, as in
    :func:`nearest_token_accuracy`. The temperature is relative to the mean squared row norm
    so one default suits tables of any scale (SmolLM2 rows have norm ~3, the tiny table ~1).
    """
    p = pred.float()
    return (2.0 * p @ table.weight.T - table.sq_norms) / (temperature * table.mean_sq_norm)


def embedding_classifier_ce(
    pred: Tensor, target_ids: Tensor, mask: Tensor, table: EmbeddingTable, temperature: float
) -> Tensor:
    """Mean cross-entropy of ``target_ids`` at the ``mask`` positions of ``pred`` [B, T, D]."""
    if mask.sum() == 0:
        return pred.new_zeros((), dtype=torch.float32)
    logits = embedding_classifier_logits(pred[mask], table, temperature)
    return F.cross_entropy(logits, target_ids[mask])


def embedding_ctc(
    pred: Tensor,
    target_ids: Tensor,
    lengths: Tensor,
    num_words: Tensor,
    table: EmbeddingTable,
    temperature: float,
    blank_id: int,
    candidates: Optional[tuple] = None,
) -> Tensor:
    """CTC loss of the first ``num_words`` target ids of each row over its ``lengths`` vectors of ``pred``.

    Frames are the projector's output vectors, the per-frame classes the rows of the embedding
    table under :func:`embedding_classifier_logits`, and the blank is ``blank_id`` (the pad token,
    which already fills the stage-1 targets after the words). Normalized as torch's
    ``ctc_loss(reduction="mean")``: each utterance's negative log-likelihood divided by its number
    of tokens, then averaged over the batch. An utterance no alignment fits (repeated tokens need a
    blank between them, so more frames than tokens) counts 0 with no gradient (``zero_infinity``).
    Costs a [B, T, vocab] logit tensor: the classifier term only scores the word positions.
    ``candidates`` = ``(ids, log_weights)`` from :func:`draw_candidates` (holding every target and
    the blank): a sampled softmax over those rows only (:func:`candidate_logits`) instead of the table.
    """
    word_pos = torch.arange(target_ids.shape[1], device=target_ids.device)[None, :] < num_words[:, None]
    targets = target_ids[word_pos]  # the rows' tokens, concatenated, as ctc_loss takes them
    if bool((targets == blank_id).any()):
        raise ValueError(f"a transcript token is the CTC blank (pad id {blank_id}): choose a pad id no text uses")
    if candidates is not None:
        ids, log_weights = candidates
        logits = candidate_logits(pred, table, temperature, ids, log_weights)
        targets, blank_id = candidate_index(ids, targets), int(candidate_index(ids, targets.new_tensor([blank_id]))[0])
    else:
        logits = embedding_classifier_logits(pred, table, temperature)
    log_probs = logits.log_softmax(-1).transpose(0, 1)  # [T, B, V or candidates]
    return F.ctc_loss(log_probs, targets, lengths, num_words, blank=blank_id, reduction="mean", zero_infinity=True)


# --- a sampled softmax over the embedding table (Stage1Loss.classifier_negatives) ---------------------


def draw_candidates(
    must: Tensor,
    vocab: int,
    num_sampled: int,
    extra: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[Tensor, Tensor]:
    """Rows a sampled softmax scores, and the log weight each adds to its logit.

    ``fixed`` = the sorted unique ids of ``must`` (the targets) and ``extra`` (e.g. their nearest
    rows): always scored, weight 1 (log weight 0). Then ``S = min(num_sampled, R)`` of the ``R`` other
    rows, drawn uniformly without replacement, each with log weight ``log(R / S)``: the sum of
    ``exp(logit)`` over the candidates is then an unbiased estimate of the sum over the whole table
    (each other row is drawn with probability ``S / R``). With ``S = R`` it is the whole table, exactly.
    Returns ``(ids, log_weights)``: the fixed ids first (sorted), then the drawn ones.
    """
    fixed = must.reshape(-1) if extra is None else torch.cat([must.reshape(-1), extra.reshape(-1)])
    fixed = torch.unique(fixed[fixed >= 0])  # sorted
    if fixed.numel() and int(fixed[-1]) >= vocab:
        raise ValueError(f"candidate id {int(fixed[-1])} is outside the embedding table ({vocab} rows)")
    rest = vocab - fixed.numel()
    num = min(int(num_sampled), rest)
    log_weights = torch.zeros(fixed.numel() + num, device=must.device)
    if num == 0:
        return fixed, log_weights
    is_fixed = torch.zeros(vocab, dtype=torch.bool, device=must.device)
    is_fixed[fixed] = True
    perm = torch.randperm(vocab, generator=generator, device="cpu" if generator is not None else must.device)
    perm = perm.to(must.device)
    drawn = perm[~is_fixed[perm]][:num]
    log_weights[fixed.numel() :] = math.log(rest / num)
    return torch.cat([fixed, drawn]), log_weights


def candidate_index(candidates: Tensor, ids: Tensor) -> Tensor:
    """Position of each of ``ids`` among ``candidates`` (every id must be one of the fixed, sorted ones)."""
    # the fixed ids are the sorted head of the candidates; a drawn id that happens to continue the order
    # joins the searched head harmlessly (it is no target, and the head stays sorted)
    n_fixed = int((candidates[1:] > candidates[:-1]).long().cumprod(0).sum()) + 1 if candidates.numel() else 0
    fixed = candidates[:n_fixed]
    pos = torch.searchsorted(fixed, ids).clamp_max(max(n_fixed - 1, 0))
    if not bool((fixed[pos] == ids).all()):
        raise ValueError("a target id is not among the sampled-softmax candidates' fixed rows")
    return pos


def candidate_logits(
    pred: Tensor, table: "EmbeddingTable", temperature: float, candidates: Tensor, log_weights: Tensor
) -> Tensor:
    """:func:`embedding_classifier_logits` restricted to the ``candidates`` rows, plus their log weights."""
    w, sq = table.weight[candidates], table.sq_norms[candidates]
    return (2.0 * pred.float() @ w.T - sq) / (temperature * table.mean_sq_norm) + log_weights


def candidate_ce(
    pred_rows: Tensor,
    targets: Tensor,
    table: "EmbeddingTable",
    temperature: float,
    candidates: Tensor,
    log_weights: Tensor,
) -> Tensor:
    """Sampled-softmax estimate of :func:`embedding_classifier_ce`: mean over the [N, D] ``pred_rows`` of
    ``log sum_c w_c exp(logit_c) - logit_target`` over the candidates (see :func:`draw_candidates`)."""
    logits = candidate_logits(pred_rows, table, temperature, candidates, log_weights)
    # the target's own logit carries log weight 0 (it is a fixed row), so plain CE on the weighted logits is it
    return F.cross_entropy(logits, candidate_index(candidates, targets))


class TableNeighbours:
    """The ``k`` nearest other rows (L2) of each table row, computed for a row the first time it is asked for."""

    def __init__(self, table: "EmbeddingTable", k: int, chunk: int = 512):
        self.table, self.k, self.chunk = table, int(k), int(chunk)
        vocab = table.weight.shape[0]
        self.ids = torch.full((vocab, self.k), -1, dtype=torch.long, device=table.weight.device)
        self.done = torch.zeros(vocab, dtype=torch.bool, device=table.weight.device)

    @torch.no_grad()
    def lookup(self, ids: Tensor) -> Tensor:
        """[len(unique ids), k] neighbour ids of the (unique) ``ids``."""
        ids = torch.unique(ids[ids >= 0])
        todo = ids[~self.done[ids]]
        w, sq = self.table.weight, self.table.sq_norms
        for start in range(0, todo.numel(), self.chunk):
            rows = todo[start : start + self.chunk]
            dist = sq[rows, None] - 2.0 * w[rows] @ w.T + sq[None, :]
            dist[torch.arange(rows.numel(), device=rows.device), rows] = float("inf")  # not itself
            k = min(self.k, w.shape[0] - 1)  # a table smaller than k + 1 rows: all other rows (the rest stay -1)
            self.ids[rows, :k] = dist.topk(k, largest=False).indices
            self.done[rows] = True
        return self.ids[ids]


def behaviour_kl(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over rows of ``temperature**2 * KL(softmax(teacher / T) || softmax(student / T))``, in fp32.

    Rows are aligned positions ([N, V] each: row i of both predicts the same response token); the
    teacher gets no gradient. The ``T**2`` factor keeps the gradient's scale independent of ``T``
    (Hinton et al.'s distillation); at ``T = 1`` it is the plain KL in nats. No rows: 0.
    """
    if teacher_logits.shape[0] == 0 and student_logits.shape[0] == 0:
        return student_logits.new_zeros((), dtype=torch.float32)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits "
            f"{tuple(student_logits.shape)} are not aligned position for position"
        )
    t = float(temperature)
    log_p = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)
    return (t * t) * (log_p.exp() * (log_p - log_q)).sum(-1).mean()


LOSS_WEIGHTINGS = ("paper", "balanced")
REGULARIZERS = ("ctc", "ce")  # Stage2Loss's classifier regularizer


def check_weighting(weighting: str) -> None:
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting={weighting!r}: expected one of {LOSS_WEIGHTINGS}")


def relative(term: Tensor) -> Tensor:
    """``term / stopgrad(|term|)``: value +-1, gradient that of ``log|term|``.

    Used by ``weighting="balanced"``: each term then moves the parameters in proportion to
    its *relative* change, whatever its magnitude (the x1e3-scaled MSE is ~1e4-1e5 while
    CE is ~1-10, so with the paper's weights CE's gradient is drowned).
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


class Stage2Loss(nn.Module):
    """Eq. 3 as a ``_component_``: ``(1 - sigma) * CE + sigma * L_MSE``, CE over the response tokens.

    ``forward`` takes the logits at the positions that predict a label (``SpeechLM.forward``) with
    those labels, and the projector output with its stage-1 targets; items with ``has_mse`` False
    (instruction data without a transcript) have no MSE term. It returns ``objective`` (what trains;
    ``weighting="balanced"`` mixes relative gradients, see :func:`stage2_loss`), ``loss`` (always the
    paper's Eq. 3 value, so runs compare), ``ce`` and ``mse``.

    ``regularizer_weight > 0`` (not in the paper; SpeechLLM's classifier regularizer) adds an
    auxiliary classifier on the projector output against the transcript of the items that have one
    (``has_mse``): ``regularizer="ctc"`` (alignment-free, :func:`embedding_ctc`, blank = the pad id)
    or ``"ce"`` (token i at vector i, :func:`embedding_classifier_ce`). The classifier is the frozen
    LLM's embedding table under distance logits, so it adds no parameters; it is logged as
    ``regularizer`` and added to the objective as ``weight * term`` (paper weighting) or
    ``weight * relative(term)`` (balanced). Needs :meth:`set_embedding` and ``target_ids``.

    ``kl_ratio > 0`` (not in the paper; Ultravox's default loss, torchtune's KD shape) adds behaviour
    alignment: the teacher is the same frozen LLM reading the transcript's token embeddings in the
    speech span (no gradient), the student the LLM reading the projector's vectors; at every position
    that predicts a response token (the end-of-turn token included) the term is
    :func:`behaviour_kl` of the teacher's next-token distribution to the student's at
    ``kl_temperature``. The two sequences differ in length; the response positions are matched by
    their label masks (``SpeechLM.forward(..., teacher=True)`` gives ``teacher_logits`` row for row
    with ``teacher_rows``, the student rows of the items that have a transcript). The task term of
    Eq. 3 becomes ``(1 - kl_ratio) * CE + kl_ratio * KL``::

        objective = (1 - sigma) * ((1 - kl_ratio) * CE + kl_ratio * KL) + sigma * L_MSE

    so ``kl_ratio=1, sigma=0`` is KL alone, ``kl_ratio=1, sigma>0`` KL + MSE (balanced weighting
    takes each term relative). Logged as ``kl``; ``loss`` stays Eq. 3's value. The term is exactly 0
    when the LLM reads exactly the transcript's embeddings in the span (the two inputs are then the same):
    the teacher reads the words only, so a stage-1 projector's trailing pad vectors (kept unless
    ``trim_pad_vectors``) are part of what the KL asks the student to make harmless.
    """

    def __init__(
        self,
        sigma: float = 0.9,
        alpha: float = 5.0,
        scale: float = 1e3,
        weighting: str = "paper",
        regularizer_weight: float = 0.0,
        regularizer: str = "ctc",
        regularizer_temperature: float = 0.05,
        kl_ratio: float = 0.0,
        kl_temperature: float = 1.0,
    ):
        super().__init__()
        if not 0.0 <= float(kl_ratio) <= 1.0 or float(kl_temperature) <= 0:
            raise ValueError(f"loss kl_ratio={kl_ratio} must be in [0, 1] and kl_temperature={kl_temperature} > 0")
        self.kl_ratio, self.kl_temperature = float(kl_ratio), float(kl_temperature)
        self.sigma, self.alpha, self.scale, self.weighting = float(sigma), float(alpha), float(scale), str(weighting)
        stage2_loss(torch.zeros(()), torch.zeros(()), self.sigma, self.weighting)  # validates sigma and weighting
        check_alpha(self.alpha)
        if float(regularizer_weight) < 0 or regularizer not in REGULARIZERS or float(regularizer_temperature) <= 0:
            raise ValueError(
                f"loss regularizer_weight={regularizer_weight} must be >= 0, regularizer={regularizer!r} one "
                f"of {REGULARIZERS}, regularizer_temperature={regularizer_temperature} > 0"
            )
        self.regularizer_weight, self.regularizer = float(regularizer_weight), regularizer
        self.regularizer_temperature = float(regularizer_temperature)
        self.table: Optional[EmbeddingTable] = None
        self.blank_id: Optional[int] = None

    def set_embedding(self, embedding: Tensor, blank_id: int) -> None:
        """The LLM's [vocab, dim] embedding table and the pad id (the CTC blank), for the regularizer."""
        self.table, self.blank_id = EmbeddingTable.from_weight(embedding), int(blank_id)

    def forward(
        self,
        logits: Tensor,
        labels: Tensor,
        pred: Tensor,
        target: Tensor,
        lengths: Tensor,
        num_words: Tensor,
        has_mse: Tensor,
        target_ids: Optional[Tensor] = None,
        teacher_logits: Optional[Tensor] = None,
        teacher_rows: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        ce = F.cross_entropy(logits.float(), labels)
        mse = pred.new_zeros((), dtype=torch.float32)
        if bool(has_mse.any()):
            mse = speechmapper_mse(
                pred[has_mse], target[has_mse], lengths[has_mse], num_words[has_mse], self.alpha, self.scale
            ).mse
        out = {
            "objective": stage2_loss(ce, mse, self.sigma, self.weighting),
            "loss": stage2_loss(ce, mse, self.sigma),
            "ce": ce,
            "mse": mse,
        }
        if self.kl_ratio > 0:
            if teacher_logits is None or teacher_rows is None:
                raise ValueError(
                    "loss kl_ratio > 0 needs the teacher's logits: SpeechLM.forward(batch, teacher=True) "
                    "gives teacher_logits and teacher_rows (speechmapper_adapt passes them)"
                )
            kl = out["kl"] = behaviour_kl(teacher_logits, logits[teacher_rows], self.kl_temperature)
            out["objective"] = self._kl_objective(ce, kl, mse)
        if self.regularizer_weight > 0:
            reg = out["regularizer"] = self.regularizer_term(pred, target_ids, lengths, num_words, has_mse)
            term = relative(reg) if self.weighting == "balanced" and bool(reg.detach() != 0) else reg
            out["objective"] = out["objective"] + self.regularizer_weight * term
        return out

    @property
    def needs_teacher(self) -> bool:
        """Whether ``forward`` needs the teacher's logits (the recipe then runs the teacher)."""
        return self.kl_ratio > 0

    def _kl_objective(self, ce: Tensor, kl: Tensor, mse: Tensor) -> Tensor:
        """``(1 - sigma) * ((1 - r) * CE + r * KL) + sigma * MSE``, each term relative under balanced
        weighting (a term that is exactly 0, e.g. no item with a transcript, stays 0)."""
        if self.weighting == "balanced":
            ce, kl, mse = (relative(t) if bool(t.detach() != 0) else t for t in (ce.float(), kl, mse.float()))
        task = (1.0 - self.kl_ratio) * ce.float() + self.kl_ratio * kl
        return (1.0 - self.sigma) * task + self.sigma * mse.float()

    def regularizer_term(
        self, pred: Tensor, target_ids: Optional[Tensor], lengths: Tensor, num_words: Tensor, has_mse: Tensor
    ) -> Tensor:
        """The classifier regularizer over the items with a transcript (0 when the batch has none)."""
        if self.table is None or target_ids is None:
            raise ValueError(
                "loss regularizer_weight > 0 needs the LLM embedding table and target_ids: call "
                "loss_fn.set_embedding(table, blank_id=pad_id) (speechmapper_adapt does) or set it to 0"
            )
        if not bool(has_mse.any()):
            return pred.new_zeros((), dtype=torch.float32)
        p, ids, n, k = pred[has_mse].float(), target_ids[has_mse], lengths[has_mse], num_words[has_mse]
        if self.regularizer == "ctc":
            return embedding_ctc(p, ids, n, k, self.table, self.regularizer_temperature, self.blank_id)
        word, _ = position_masks(n, k, p.shape[1])
        return embedding_classifier_ce(p, ids, word, self.table, self.regularizer_temperature)


@torch.no_grad()
def nearest_token_ids(pred: Tensor, embedding: Tensor, chunk: int = 4096) -> Tensor:
    """Id of the nearest embedding row (L2) of each vector of ``pred`` [..., D], in chunks of rows."""
    p = pred.reshape(-1, pred.shape[-1]).float()
    emb = embedding.float()
    sq = (emb * emb).sum(-1)[None, :]
    out = [(-2.0 * p[i : i + chunk] @ emb.T + sq).argmin(-1) for i in range(0, p.shape[0], chunk)]
    return (torch.cat(out) if out else p.new_zeros(0, dtype=torch.long)).reshape(pred.shape[:-1])


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
