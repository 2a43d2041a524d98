"""Batched greedy decoding from input embeddings (text + speech) with a KV cache.

The paper (section 3, "Inference and evaluation") decodes greedily with at most 150 new
tokens from prompts whose embeddings are partly token embeddings and partly projector
vectors. torchtune's ``generate`` only takes token ids, so this module has its own loop:

* prompts ``[L_i, D]`` are **left**-padded (zero vectors) to a common length ``P``;
* a boolean mask ``[B, s, filled cache length]`` lets each query see only its own sample's
  real positions (causal), and position ids start at 0 at each sample's first real
  position, so a sample's output does not depend on the batch it is in (checked in the
  tests, token for token, on SmolLM2 in fp32);
* the prompt is run once (prefill, logits of the last position only), then one token per
  step for the whole batch, feeding each generated token's embedding (``tok_embeddings``);
* each sample stops at a stop id (EOS/end of turn; the token is not kept), optionally at
  the first token containing a newline (kept, as it may carry text before the newline), at
  its own cap (``max_new_tokens_per_item``, e.g. from the audio duration), at
  ``max_new_tokens``, or (optional, off by default) when a ``StuckGuard`` sees a loop.
* rows of finished samples are dropped from the batch and the KV caches ("compaction")
  once a quarter of the rows are finished, so one long sample does not cost a full batch.

KV caches: torchtune 0.6.1's ``KVCache`` has a fixed batch size and length, and an attention
module with a cache set up uses it on every forward (and drops ``is_causal``), so a model
with caches cannot train. ``greedy_generate`` therefore sets up fresh caches for each call
(``model.setup_caches`` under the model's device, since ``KVCache`` allocates on the default
device) and deletes them on exit, also on error, exactly as torchtune's
``delete_kv_caches`` does (``kv_cache = None``, ``cache_enabled = False``): the same model
object can then decode batches of other sizes, or train. Caches found already set up on
entry are deleted (with a warning). The model is put in eval mode for the call and its
mode restored.

Stuck decodings (paper appendix B.2, table 10: "her sister her sister ..." until the token
limit) are *flagged* by ``detect_stuck``; see its docstring for the exact rule.

Speed (bench/generate.py): three things made torchtune's attention slower than transformers'
at decoding, and all are worked around for the duration of a call, without changing any
output: attention read the whole static cache from the first step (``_CacheWindow``
shows it only up to the filled length); with grouped-query attention, it copied the cache to
every query head each step (``_GroupedQueryAttention``); and each decode step paid
torchtune's per-module bookkeeping (cache positions, mask slicing, a RoPE cache lookup per
layer) and RoPE's strided halves (``_LeanForward`` runs the same products and sums on the
same weights and cache buffers, the rotation looked up once per call).

No torchtune import here: only methods and attributes of the model object given are used
(``setup_caches``, ``caches_are_setup``, ``tok_embeddings``, ``layers``, ``norm``, ``output``,
``max_seq_len``; and of each attention module with a cache: ``kv_cache`` (deleted, its
buffers windowed and compacted), ``num_kv_heads`` and ``_attention_call`` (swapped during
the call, restored after); written against torchtune 0.6.1).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import FrozenSet, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

STOP_REASONS = ("eos", "newline", "length", "cap", "stuck_guard")
STUCK = "stuck"


@dataclass
class GenerationResult:
    """One sample's output: ``ids`` (without the stop token), why it stopped, and flags."""

    ids: List[int]
    stopped_by: str  # one of STOP_REASONS
    flags: List[str] = field(default_factory=list)  # e.g. ["stuck"]

    @property
    def stuck(self) -> bool:
        return STUCK in self.flags


# ----------------------------------------------------------------------------- stuck decoding
def tail_period_span(ids: Sequence[int], period: int) -> int:
    """Length of the longest suffix of ``ids`` that repeats with ``period``.

    That is the largest ``s`` such that ``ids[i] == ids[i - period]`` for every ``i`` in the
    last ``s - period`` positions (so the suffix is ``s / period`` copies of one n-gram, the
    first copy possibly partial at its start). 0 when ``len(ids) < period``.
    """
    n = len(ids)
    if period <= 0 or n < period:
        return 0
    k = 0
    while k < n - period and ids[n - 1 - k] == ids[n - 1 - k - period]:
        k += 1
    return k + period


def detect_stuck(
    ids: Sequence[int],
    hit_length_limit: bool,
    min_repeats: int = 3,
    max_period: int = 8,
    min_coverage: float = 0.5,
) -> bool:
    """True for a "stuck" decoding: it hit the length limit while looping on a 1..n-gram.

    Rule: ``hit_length_limit`` (the sample stopped at ``max_new_tokens`` or at its own cap,
    not at EOS/newline) **and** for some period ``p <= max_period`` the output ends with a
    period-``p`` repetition (``tail_period_span``) that holds at least ``min_repeats`` full
    copies of the ``p``-gram **and** covers at least ``min_coverage`` of the whole output.
    So "her sister her sister ..." up to the limit is stuck, "very very" is not (2 copies, and
    a tiny share of the output), nor is a loop that ended with EOS before the limit, nor an
    output that looped earlier but whose tail is not a loop.
    """
    if not hit_length_limit or not ids:
        return False
    n = len(ids)
    for p in range(1, max_period + 1):
        span = tail_period_span(ids, p)
        if span // p >= min_repeats and span >= min_coverage * n:
            return True
    return False


@dataclass(frozen=True)
class StuckGuard:
    """Optional early stop for looping samples (OFF unless passed: the paper has none).

    A sample is stopped once its output ends with ``repeats_needed(n)`` consecutive copies of
    the same ``n``-gram, for some ``n <= max_ngram``, where
    ``repeats_needed(n) = max(min_repeats, ceil(min_span / n))`` (defaults: a token 12 times,
    a bigram 6 times, a 3..8-gram 4 times). With ``trim`` only the first copy of the loop is
    kept in the output. The sample gets ``stopped_by="stuck_guard"`` and the "stuck" flag.
    """

    max_ngram: int = 8
    min_repeats: int = 4
    min_span: int = 12
    trim: bool = True

    def __post_init__(self):
        if self.max_ngram < 1 or self.min_repeats < 2 or self.min_span < 2:
            raise ValueError(f"StuckGuard needs max_ngram >= 1, min_repeats >= 2, min_span >= 2: {self}")

    def repeats_needed(self, n: int) -> int:
        return max(self.min_repeats, math.ceil(self.min_span / n))

    def tracker(self) -> "_LoopTracker":
        return _LoopTracker(self)


class _LoopTracker:
    """Online ``tail_period_span`` for periods 1..max_ngram: O(max_ngram) per token."""

    def __init__(self, guard: StuckGuard):
        self.guard = guard
        self.runs = [0] * (guard.max_ngram + 1)  # runs[p]: trailing i with ids[i] == ids[i-p]

    def push(self, ids: List[int]) -> Optional[Tuple[int, int]]:
        """``ids`` just got one more token; return ``(period, span)`` of a loop to stop on."""
        i = len(ids) - 1
        hit = None
        for p in range(1, self.guard.max_ngram + 1):
            self.runs[p] = self.runs[p] + 1 if i >= p and ids[i] == ids[i - p] else 0
            span = self.runs[p] + p
            if hit is None and i + 1 >= p and span // p >= self.guard.repeats_needed(p):
                hit = (p, span)
        return hit


# ----------------------------------------------------------------------------- tokenizer helper
def newline_token_ids(tokenizer) -> FrozenSet[int]:
    """Ids of every token whose text contains a newline (for ``stop_at_newline``).

    ``tokenizer`` is a ``ChatTokenizer`` (or anything with ``decode(ids)`` and
    ``vocab_size``); a ``tokenizers.Tokenizer`` inside it is used in one batched call.
    """
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    size = tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else inner.get_vocab_size(with_added_tokens=True)
    singles = [[i] for i in range(size)]
    if hasattr(inner, "decode_batch"):
        texts = inner.decode_batch(singles, skip_special_tokens=False)
    else:
        texts = [tokenizer.decode(s) for s in singles]
    return frozenset(i for i, text in enumerate(texts) if "\n" in text)


# ----------------------------------------------------------------------------- KV caches
def _attention_modules_with_cache(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if getattr(m, "kv_cache", None) is not None]


def delete_caches(model: nn.Module) -> None:
    """Remove every KV cache (as torchtune's ``delete_kv_caches``); no-op without caches."""
    for module in _attention_modules_with_cache(model):
        module.cache_enabled = False
        module.kv_cache = None


class _CacheWindow:
    """The model's KV caches, shown to attention only up to the filled length.

    torchtune's attention reads the *whole* static cache every step (and, with grouped-query
    attention, first copies it to every query head), so a cache sized for prompt + all new
    tokens costs its full length from the first step on. Here each ``KVCache``'s buffers are
    replaced before every forward by a view of the first ``length`` slots of the full
    buffers (``KVCache.update`` writes through the view), and the mask is cut to the same
    length: same values, same results, memory traffic that grows with the sequence instead.
    It also drops finished rows (``keep``).
    """

    def __init__(self, model: nn.Module):
        self.caches = [m.kv_cache for m in _attention_modules_with_cache(model)]
        self.full = [(c.k_cache, c.v_cache) for c in self.caches]

    def show(self, length: int) -> None:
        for cache, (k, v) in zip(self.caches, self.full):
            cache.k_cache = k[:, :, :length]  # registered buffers: reassigned in place
            cache.v_cache = v[:, :, :length]

    def keep(self, rows: torch.Tensor) -> None:
        self.full = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.full]
        for cache in self.caches:
            cache.batch_size = int(rows.numel())


class _GroupedQueryAttention:
    """Grouped-query attention without torchtune's copy of the KV cache for every query head.

    torchtune 0.6.1's ``MultiHeadAttention`` expands keys and values to all query heads
    (``k.unsqueeze(2).expand(...).flatten(1, 2)``: a copy of the whole cache per layer and
    step) before calling ``self._attention_call``. While decoding, each such module gets
    ``num_kv_heads = num_heads`` (so it skips the expansion; its cache was already built with
    the true number of kv heads) and an ``_attention_call`` that folds the query heads of a
    group into the query axis instead: ``q`` [b, kv_heads, q_per_kv * s, d] against the
    unexpanded ``k``/``v`` (as transformers' SDPA path does). Same attention, less memory
    traffic, and a faster CPU kernel in bf16. Both attributes are restored on exit; modules
    without them (or without grouped heads) are left alone.
    """

    def __init__(self, model: nn.Module):
        self.saved = []
        for module in _attention_modules_with_cache(model):
            heads, kv_heads = getattr(module, "num_heads", None), getattr(module, "num_kv_heads", None)
            if not callable(getattr(module, "_attention_call", None)) or not heads or not kv_heads:
                continue
            if heads == kv_heads or heads % kv_heads:
                continue
            self.saved.append((module, kv_heads, module._attention_call))

    def __enter__(self):
        for module, kv_heads, _ in self.saved:
            module._attention_call = _folded_sdpa(kv_heads, module.num_heads // kv_heads)
            module.num_kv_heads = module.num_heads
        return self

    def __exit__(self, *exc):
        for module, kv_heads, call in self.saved:
            module.num_kv_heads = kv_heads
            module._attention_call = call
        return False


def _folded_sdpa(groups: int, q_per_kv: int):
    def call(q, k, v, mask, dropout_p, is_causal):
        if mask is None or is_causal:
            raise RuntimeError("grouped decoding attention expects an explicit mask")
        b, heads, s, d = q.shape
        q = q.reshape(b, groups, q_per_kv * s, d)  # head g * q_per_kv + j, position t -> row j * s + t
        if s == 1:  # decoding: one mask row, broadcast over the group's query heads
            m = mask[:, None]
        else:
            m = mask[:, None, None].expand(b, 1, q_per_kv, s, mask.shape[-1]).reshape(b, 1, q_per_kv * s, -1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=dropout_p)
        return out.reshape(b, heads, s, d)

    return call


class _LeanForward:
    """The decoder run directly on the layers' weights and the KV cache buffers, for prefill and decoding.

    The same operations, in the same order, as torchtune 0.6.1's ``TransformerSelfAttentionLayer``
    / ``MultiHeadAttention`` / ``RotaryPositionalEmbeddings`` forward with a KV cache and
    ``_GroupedQueryAttention`` (so the same values: tested), minus their per-call bookkeeping: the
    RoPE rotation is looked up once per call for all layers and applied to whole tensors (``_rotate``),
    keys and values are written straight into their cache slots. ``usable`` is False for a layer
    layout it does not recognise (q/k norms, other position embeddings, ...): the caller then keeps
    torchtune's own forward. Hooks on the decoder layers themselves do not run here (those on their
    projections, norms and MLPs do); ``lean_decode=False`` runs the layers as modules.
    """

    def __init__(self, model: nn.Module, window: "_CacheWindow"):
        self.model, self.window = model, window
        layers = list(getattr(model, "layers", []))
        self.usable = (
            bool(layers)
            and len(layers) == len(window.full)
            and all(map(_plain_layer, layers))
            and all(l.attn.num_heads % k.shape[1] == 0 for l, (k, _) in zip(layers, window.full))
        )

    def __call__(self, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, start: int) -> torch.Tensor:
        """Fp32 logits [B, V] of the last position after feeding embeddings ``x`` [B, s, D] into cache
        slots ``start .. start + s - 1``; ``mask`` [B, s, start + s] (True: may attend), ``pos`` [B, s]."""
        model = self.model
        b, s_len = x.shape[:2]
        end = start + s_len
        ropes = {}
        for layer, (k_cache, v_cache) in zip(model.layers, self.window.full):
            a = layer.attn
            heads, kv_heads, d = a.num_heads, k_cache.shape[1], a.head_dim  # the cache has the true kv heads
            q_per_kv = heads // kv_heads
            rope = a.pos_embeddings
            if rope is not None and id(rope) not in ropes:
                ropes[id(rope)] = _rotation(rope.cache[pos], b, s_len, d)
            h = layer.sa_norm(x)
            # heads first ([B, heads, s, d]): the rotation then broadcasts over an outer axis (fast)
            q = a.q_proj(h).view(b, s_len, heads, d).transpose(1, 2)
            k = a.k_proj(h).view(b, s_len, kv_heads, d).transpose(1, 2)
            v = a.v_proj(h).view(b, s_len, kv_heads, d).transpose(1, 2)
            if rope is not None:
                q, k = _rotate(q, *ropes[id(rope)]), _rotate(k, *ropes[id(rope)])
            k_cache[:, :, start:end] = k
            v_cache[:, :, start:end] = v
            # query heads of a group folded into the query axis, as _folded_sdpa does
            q = q.reshape(b, kv_heads, q_per_kv * s_len, d)
            m = mask[:, None, None].expand(b, 1, q_per_kv, s_len, end).reshape(b, 1, q_per_kv * s_len, end)
            out = F.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=m)
            out = out.reshape(b, heads, s_len, d).transpose(1, 2).reshape(b, s_len, heads * d)
            h = layer.sa_scale(a.output_proj(out)) + x
            x = h + layer.mlp_scale(layer.mlp(layer.mlp_norm(h)))
        return model.output(model.norm(x[:, -1])).float()


def _plain_layer(layer: nn.Module) -> bool:
    a = getattr(layer, "attn", None)
    if a is None or not all(hasattr(layer, n) for n in ("sa_norm", "mlp_norm", "mlp", "sa_scale", "mlp_scale")):
        return False
    if not all(
        hasattr(a, n) for n in ("q_proj", "k_proj", "v_proj", "output_proj", "num_heads", "num_kv_heads", "head_dim")
    ):
        return False
    if (
        getattr(a, "q_norm", None) is not None
        or getattr(a, "k_norm", None) is not None
        or getattr(a, "kv_cache", None) is None
    ):
        return False
    rope = getattr(a, "pos_embeddings", None)
    return rope is None or type(rope).__name__ in ("RotaryPositionalEmbeddings", "Llama3ScaledRoPE")


def _rotation(rope_cache: torch.Tensor, b: int, s_len: int, head_dim: int):
    """torchtune's RoPE cache rows [B, s, d/2, 2] (cos, sin) as whole-vector factors for ``_rotate``
    on heads-first tensors: ``cos`` on both elements of a pair, and ``sin`` signed ``(-sin, +sin)``."""
    rc = rope_cache.view(b, 1, s_len, head_dim // 2, 2)
    cos, sin = rc[..., :1], rc[..., 1:]
    return cos.expand(b, 1, s_len, head_dim // 2, 2).contiguous(), torch.cat([-sin, sin], -1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """torchtune's interleaved RoPE in fp32 on ``x`` [B, heads, s, d]: pair ``(x0, x1)`` becomes
    ``(x0 c - x1 s, x1 c + x0 s)``, computed as ``x c + swap(x) (-s, s)``: the same products and the
    same sums (``a + (-b)`` is ``a - b`` exactly), on whole tensors instead of strided halves."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    out = xs * cos + xs.flip(-1) * signed_sin
    return out.flatten(3).type_as(x)


def _last_logits(model: nn.Module, h: torch.Tensor, mask: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """Decoder layers on embeddings ``h`` [B, s, D]; fp32 logits of the last position [B, V].

    ``forward_embeds`` (models/llms.py) without its full-sequence unembedding: at prefill
    only the last position's logits are needed ([B, P, V] fp32 would be 94 MB for SmolLM2 at
    B=8, P=60, and GBs for 128k-vocabulary LLMs).
    """
    for layer in model.layers:
        h = layer(h, mask=mask, input_pos=input_pos)
    return model.output(model.norm(h[:, -1])).float()


# ----------------------------------------------------------------------------- decoding
@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    prompt_embeds: Sequence[torch.Tensor],
    max_new_tokens: int = 150,
    stop_ids: Iterable[int] = (),
    pad_to_multiple: Optional[int] = None,
    stop_at_newline: bool = False,
    max_new_tokens_per_item: Optional[Sequence[int]] = None,
    stuck_guard: Optional[StuckGuard] = None,
    newline_ids: Optional[Iterable[int]] = None,
    compact: bool = True,
    grouped_attention: bool = True,
    lean_decode: bool = True,
) -> List[GenerationResult]:
    """Greedy-decode every prompt of ``prompt_embeds`` (each ``[L_i, D]``) as one batch.

    ``model``: a torchtune ``TransformerDecoder`` (frozen LLM); embeddings are cast to its
    dtype and device. ``stop_ids``: ids that end a sample (e.g. ``ChatTokenizer.stop_ids``),
    not kept in the output. ``stop_at_newline``: also stop after the first token of
    ``newline_ids`` (see ``newline_token_ids``) that follows some other token (newlines
    opening the answer do not stop it); that token is kept. ``max_new_tokens_per_item``:
    per-sample caps (``min``-ed with ``max_new_tokens``; stopping there is ``"cap"``,
    at ``max_new_tokens`` ``"length"``). ``pad_to_multiple``: round the padded prompt length
    up (fewer distinct shapes). ``compact``: drop finished rows from the batch;
    ``grouped_attention``: attend with unexpanded kv heads (``_GroupedQueryAttention``);
    ``lean_decode``: prefill and decode without torchtune's per-module bookkeeping (``_LeanForward``);
    none changes any output (tested), all only save time. Results come in input
    order; "stuck" is flagged by ``detect_stuck`` (or set by ``stuck_guard``).
    """
    # ---- checks
    if not prompt_embeds:
        return []
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    emb_table = model.tok_embeddings.weight
    dim, dtype, device = emb_table.shape[1], emb_table.dtype, emb_table.device
    lens = []
    for i, e in enumerate(prompt_embeds):
        if e.dim() != 2 or e.shape[1] != dim or e.shape[0] < 1:
            raise ValueError(f"prompt {i} must be [L >= 1, {dim}], got {tuple(e.shape)}")
        lens.append(int(e.shape[0]))
    batch = len(lens)
    if max_new_tokens_per_item is None:
        caps = [max_new_tokens] * batch
    else:
        if len(max_new_tokens_per_item) != batch:
            raise ValueError(f"{len(max_new_tokens_per_item)} per-item caps for {batch} prompts")
        if any(int(c) < 0 for c in max_new_tokens_per_item):
            raise ValueError("max_new_tokens_per_item must be >= 0")
        caps = [min(int(c), max_new_tokens) for c in max_new_tokens_per_item]
    stops = frozenset(int(i) for i in stop_ids or ())
    if stop_at_newline and not newline_ids:
        raise ValueError("stop_at_newline needs newline_ids (see newline_token_ids(tokenizer))")
    newlines = frozenset(int(i) for i in newline_ids or ()) if stop_at_newline else frozenset()

    results: List[Optional[GenerationResult]] = [None] * batch
    outputs: List[List[int]] = [[] for _ in range(batch)]
    trackers = [stuck_guard.tracker() if stuck_guard else None for _ in range(batch)]
    for i, cap in enumerate(caps):
        if cap == 0:
            results[i] = _finish([], "cap" if cap < max_new_tokens else "length")
    max_steps = max(caps)
    if max_steps == 0:
        return results  # type: ignore[return-value]

    prompt_len = max(lens)
    if pad_to_multiple:
        prompt_len = -(-prompt_len // pad_to_multiple) * pad_to_multiple
    cache_len = prompt_len + max_steps - 1  # the last generated token is never fed back
    if max(l + c for l, c in zip(lens, caps)) > model.max_seq_len or cache_len > model.max_seq_len:
        raise ValueError(f"prompt + new tokens exceed the LLM's max_seq_len {model.max_seq_len}")

    # ---- left-padded prompts, key-validity mask and per-sample positions
    h = torch.zeros(batch, prompt_len, dim, dtype=dtype, device=device)
    valid = torch.zeros(batch, cache_len, dtype=torch.bool, device=device)  # which cache slots are real
    for i, e in enumerate(prompt_embeds):
        h[i, prompt_len - lens[i] :] = e.to(device=device, dtype=dtype)
        valid[i, prompt_len - lens[i] : prompt_len] = True
    lens_t = torch.tensor(lens, device=device)
    offsets = prompt_len - lens_t  # first real slot of each row
    cols = torch.arange(prompt_len, device=device)
    input_pos = (cols[None, :] - offsets[:, None]).clamp(min=0)  # [B, P], 0 on padding
    causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=device).tril()
    mask = causal[None] & valid[:, None, :prompt_len]
    # padding queries see nothing real: let them see themselves (no all-masked softmax -> NaN)
    mask[:, cols, cols] |= ~valid[:, :prompt_len]

    was_training = model.training
    if model.caches_are_setup():
        log.warning("greedy_generate: deleting the KV caches already set up on the model")
        delete_caches(model)
    model.eval()
    stack = contextlib.ExitStack()
    try:
        with torch.device(device):  # KVCache allocates on the default device
            model.setup_caches(batch_size=batch, dtype=dtype, decoder_max_seq_len=cache_len)
        window = _CacheWindow(model)
        window.show(prompt_len)
        if grouped_attention:
            stack.enter_context(_GroupedQueryAttention(model))
        lean = _LeanForward(model, window) if lean_decode else None
        lean = lean if lean is not None and lean.usable else None
        logits = lean(h, mask, input_pos, 0) if lean is not None else _last_logits(model, h, mask, input_pos)
        rows = list(range(batch))  # sample index of each cache row
        next_pos = lens_t.clone()  # position id of the next fed token, per row
        for step in range(max_steps):
            tokens = logits.argmax(-1)
            for row, tok in enumerate(tokens.tolist()):
                i = rows[row]
                if results[i] is None:
                    results[i] = _advance(tok, outputs[i], caps[i], max_new_tokens, stops, newlines, trackers[i])
            active = [r for r, i in enumerate(rows) if results[i] is None]
            if not active:
                break
            if compact and len(rows) - len(active) >= max(1, len(rows) // 4):
                keep = torch.tensor(active, device=device)
                window.keep(keep)
                rows = [rows[r] for r in active]
                tokens, valid, next_pos = tokens[keep], valid[keep], next_pos[keep]
            length = prompt_len + step + 1  # cache slots in use once this token is fed
            valid[:, length - 1] = True
            if lean is not None:
                logits = lean(
                    model.tok_embeddings(tokens)[:, None], valid[:, None, :length], next_pos[:, None], length - 1
                )
            else:
                window.show(length)
                logits = _last_logits(
                    model, model.tok_embeddings(tokens)[:, None], valid[:, None, :length], next_pos[:, None]
                )
            next_pos += 1
    finally:
        stack.close()
        delete_caches(model)
        model.train(was_training)
    return results  # type: ignore[return-value]


def _advance(
    tok: int,
    out: List[int],
    cap: int,
    max_new_tokens: int,
    stops: FrozenSet[int],
    newlines: FrozenSet[int],
    tracker: Optional[_LoopTracker],
) -> Optional[GenerationResult]:
    """Append one sample's new token ``tok`` to ``out``; return its result when it is done."""
    if tok in stops:
        return _finish(out, "eos")
    out.append(tok)
    if tok in newlines and any(t not in newlines for t in out[:-1]):  # leading newlines do not end the answer
        return _finish(out, "newline")
    if tracker is not None:
        hit = tracker.push(out)
        if hit is not None:
            period, span = hit
            if tracker.guard.trim:
                del out[len(out) - span + period :]
            return GenerationResult(out, "stuck_guard", [STUCK])
    if len(out) >= cap:
        return _finish(out, "cap" if cap < max_new_tokens else "length")
    return None


def _finish(out: List[int], reason: str) -> GenerationResult:
    flags = [STUCK] if detect_stuck(out, hit_length_limit=reason in ("length", "cap")) else []
    return GenerationResult(out, reason, flags)


__all__ = [
    "GenerationResult",
    "STOP_REASONS",
    "StuckGuard",
    "delete_caches",
    "detect_stuck",
    "greedy_generate",
    "newline_token_ids",
    "tail_period_span",
]
