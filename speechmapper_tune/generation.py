"""Batched greedy decoding from input embeddings (text + speech) with a KV cache.

The paper (section 3, "Inference and evaluation") decodes greedily with at most 150 new
tokens from prompts whose embeddings are partly token embeddings and partly projector
vectors. torchtune's ``generate`` only takes token ids, so this module has its own loop,
``greedy_generate``, which reads top to bottom: the layout check (``_LeanDecoder``), argument
checks (``_checked``), lengths (``_lengths``), left-padded prompts (``_left_padded``), then
``_decode`` (with the model in eval mode, ``_generating``):

* prompts ``[L_i, D]`` are **left**-padded (zero vectors) to a common length ``P``;
* a mask lets each query see only its own sample's real positions (causal), and position ids
  start at 0 at each sample's first real position, so a sample's output does not depend on
  the batch it is in (checked in the tests, token for token, on SmolLM2 in fp32);
* the prompt is run once (prefill, logits of the last position only), then one token per
  step for the whole batch, feeding each generated token's embedding (``tok_embeddings``);
* each sample stops at a stop id (EOS/end of turn; the token is not kept), optionally at
  the first token containing a newline (kept, as it may carry text before the newline), at
  its own cap (``max_new_tokens_per_item``, e.g. from the audio duration), at
  ``max_new_tokens``, or (optional, off by default) when a ``StuckGuard`` sees a loop.
* rows of finished samples are dropped from the batch and the KV cache ("compaction")
  once a quarter of the rows are finished, so one long sample does not cost a full batch.

One decoder path: ``_LeanDecoder`` runs torchtune 0.6.1's ``TransformerSelfAttentionLayer`` /
``MultiHeadAttention`` operations, in their order, directly on the layers' weights, with a KV
cache of its own (one tensor pair per layer, sized prompt + new tokens - 1, freed with the call).
It recognises torchtune's self-attention layers with RoPE (``RotaryPositionalEmbeddings``,
``Llama3ScaledRoPE``) or none, grouped-query attention, optional q/k norms (Qwen3-style),
projections with or without biases (plain ``nn.Linear`` weights are multiplied directly, other
modules such as LoRA are called); anything else is refused with a ValueError naming the layer
and what is missing, before any work. Nothing of torchtune is patched, and the model object is
not changed: it is in eval mode for the call, its mode restored on exit (also on error), and
torchtune KV caches found set up on it are deleted (with a warning), so the same object can then
decode batches of other sizes, or train.

Speed (bench/generate.py, against transformers' ``generate(inputs_embeds=...)``): no
per-module bookkeeping; query heads of a kv group folded into the query axis instead of copying
the cache to every query head; attention reads the cache only up to its filled length, with an
additive mask built once per step for all layers; RoPE factors looked up once per step and
applied as one complex product; and ``_Linears``: on CPU in fp32, decode steps multiply oneDNN-prepacked
copies of the weights (kept with the model: ``_PackedWeights``), and bf16 weights are widened to fp32 a
slice at a time where the CPU has no native bf16.

Stuck decodings (paper appendix B.2, table 10: "her sister her sister ..." until the token
limit) are *flagged* by ``detect_stuck``; see its docstring for the exact rule.

No torchtune import here: the layout is recognised from the model object's classes (by name,
from the ``torchtune`` package, forward not overridden) and attributes (``tok_embeddings``,
``layers``, ``norm``, ``output``, ``max_seq_len``; per layer ``attn``, ``mlp``, norms, scales;
per attention the projections, head counts, ``pos_embeddings``, ``q_norm``, ``k_norm``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
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


# ----------------------------------------------------------------------------- the model's layout
_ROPES = ("RotaryPositionalEmbeddings", "Llama3ScaledRoPE")  # interleaved pairs, cache [len, d/2, (cos, sin)]
_LAYER_PARTS = ("attn", "mlp", "sa_norm", "mlp_norm", "sa_scale", "mlp_scale")
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "output_proj", "num_heads", "num_kv_heads", "head_dim")


def _torchtune(obj, name: str, method: str = "forward") -> bool:
    """Whether ``obj`` is torchtune's class ``name``, or a subclass of it that keeps its ``method``."""
    for cls in type(obj).__mro__:
        if cls.__name__ == name and cls.__module__.startswith("torchtune."):
            return getattr(type(obj), method) is getattr(cls, method)
    return False


def _hooked(module) -> bool:
    return isinstance(module, nn.Module) and bool(module._forward_hooks or module._forward_pre_hooks)


def _plain_linear(module) -> bool:
    """An ``nn.Linear`` (not a subclass: LoRA, NF4, ...) with dense weights and no hooks: its weights can be
    multiplied directly; anything else is called as the module it is."""
    return type(module) is nn.Linear and type(module.weight) in (nn.Parameter, torch.Tensor) and not _hooked(module)


def _refuse(where: str, problem: str):
    raise ValueError(f"greedy_generate cannot run {where}: {problem}")


def _check_model(model: nn.Module) -> None:
    missing = [n for n in ("tok_embeddings", "layers", "norm", "output", "max_seq_len") if not hasattr(model, n)]
    if missing:
        _refuse(
            f"the model ({type(model).__name__})", f"no {', '.join(missing)} (a torchtune TransformerDecoder has them)"
        )
    if len(model.layers) == 0:
        _refuse(f"the model ({type(model).__name__})", "it has no layers")


def _check_part(where: str, module: nn.Module, class_name: str, parts: Sequence[str]) -> None:
    """Refuse ``module`` unless it is torchtune's ``class_name`` (own forward), unhooked, with every attribute of ``parts``."""
    if not _torchtune(module, class_name):
        _refuse(where, f"only torchtune's {class_name} (with its own forward) is supported")
    if _hooked(module):
        _refuse(where, "it has forward hooks, which would not run")
    missing = [n for n in parts if getattr(module, n, None) is None]
    if missing:
        _refuse(where, f"it has no {', '.join(missing)}")


def _check_layer(i: int, layer: nn.Module) -> None:
    """Raise a ValueError naming what the lean decoder does not recognise in ``layer``."""
    _check_part(f"layer {i} ({type(layer).__name__})", layer, "TransformerSelfAttentionLayer", _LAYER_PARTS)
    attn = layer.attn
    where = f"layer {i}'s attention ({type(attn).__name__})"
    _check_part(where, attn, "MultiHeadAttention", _ATTENTION_PARTS)
    if attn.num_heads % attn.num_kv_heads:
        _refuse(where, f"num_heads {attn.num_heads} is not a multiple of num_kv_heads {attn.num_kv_heads}")
    rope = getattr(attn, "pos_embeddings", None)
    if rope is not None:
        if not any(_torchtune(rope, name) for name in _ROPES):
            _refuse(where, f"pos_embeddings {type(rope).__name__} is not one of torchtune's {', '.join(_ROPES)}")
        cache = getattr(rope, "cache", None)
        if cache is None or tuple(cache.shape[1:]) != (attn.head_dim // 2, 2):
            _refuse(where, f"its {type(rope).__name__} has no RoPE cache [positions, {attn.head_dim // 2}, 2]")


# ----------------------------------------------------------------------------- linear maps
_SCRATCH_BYTES = 1 << 20  # bf16 weights are widened to fp32 this many bytes at a time (stays in cache)
_PACK_MAX_ROWS = 64  # products with at most this many rows (decode steps) use the packed weights
_PACK_MAX_BYTES = 4 << 30  # a model with more fp32 weight bytes than this is not packed (the copy doubles them)


class _PackedWeights:
    """oneDNN's prepacked copies of a model's fp32 ``nn.Linear`` weights, for the few-row products of decode
    steps on CPU, where torch's sgemm on unpacked weights is the step's bottleneck (79% of a step; 1.2-1.25x
    faster decoding end to end with packed ones, BENCHMARKS.md). Weights applied to the same input are
    packed as one (q/k/v, w1/w3). The price is a second copy of the weights, kept as long as the model
    lives (+540 MB for SmolLM2-135M fp32; packing it takes ~0.6 s, once), so models over ``_PACK_MAX_BYTES``
    are not packed. A weight changed in place (its version counter) or replaced is packed again before use.
    """

    _by_model: "weakref.WeakKeyDictionary[nn.Module, _PackedWeights]" = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, model: nn.Module) -> Optional["_PackedWeights"]:
        """The model's packed weights, or None where packing does not apply (not fp32 on CPU, no oneDNN, too large)."""
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
            return None
        weight = next(model.parameters(), None)
        if weight is None or weight.device.type != "cpu" or weight.dtype != torch.float32:
            return None
        if model not in cls._by_model:
            if sum(p.numel() * 4 for p in model.parameters()) > _PACK_MAX_BYTES:
                return None
            cls._by_model[model] = cls()
        return cls._by_model[model]

    def __init__(self):
        # ids of the weights -> (weak references to them, their data pointers and versions, packed weight);
        # the references tell a live weight from a new tensor that got a freed one's id
        self._packs = {}

    def __call__(self, weights: Sequence[torch.Tensor]) -> torch.Tensor:
        key = tuple(id(w) for w in weights)
        stamp = tuple((w.data_ptr(), w._version) for w in weights)
        hit = self._packs.get(key)
        if hit is None or hit[1] != stamp or any(ref() is not w for ref, w in zip(hit[0], weights)):
            if hit is None:  # a new set of weights: forget the packs of weights that no longer exist
                self._packs = {k: v for k, v in self._packs.items() if all(ref() is not None for ref in v[0])}
            w = torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0].detach().contiguous()
            packed = torch.ops.mkldnn._reorder_linear_weight(w, _PACK_MAX_ROWS)
            hit = self._packs[key] = (tuple(weakref.ref(w) for w in weights), stamp, packed)
        return hit[2]


class _Linears:
    """The products ``x W^T (+ b)`` of this call's plain ``nn.Linear`` weights, on its device and dtype.

    Everywhere, several weights applied to the same input are given together (q/k/v, the MLP's w1/w3). Three
    CPU cases are computed differently from ``F.linear``, for speed, with the same inputs and fp32 sums:

    * fp32, products of at most ``_PACK_MAX_ROWS`` rows (decode steps) with weights without bias: oneDNN's
      linear on the weights prepacked for it (``_PackedWeights``, given as ``packed``), the grouped weights as
      one product. Prefill keeps ``F.linear``: packed weights were slower there (measured).
    * fp32, the LM head (vocabulary x width) otherwise: ``W @ x^T`` streams the large weight once; ``F.linear``
      with a few rows was 1.4-1.7x slower on it (measured; the layers' own weights show no such difference).
    * bf16 on a CPU without native bf16 (``dtypes.native_bf16``: AVX2 only): torch emulates bf16 products,
      2-8x slower than fp32 (BENCHMARKS.md). Here the weights are widened to fp32 a slice of rows at a time
      into a small buffer, multiplied in fp32 and the result rounded to bf16: the products of bf16 numbers
      are exact in fp32 and torch's bf16 kernels also sum in fp32, so only the order of the sums differs
      (results within a bf16 rounding, tested), at fp32 speed, with no extra copy of the weights kept.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device, packed: Optional[_PackedWeights] = None):
        from speechmapper_tune.dtypes import native_bf16

        cpu = device.type == "cpu"
        self.dtype = dtype
        self.widen = cpu and dtype == torch.bfloat16 and not native_bf16("cpu")
        self.rows_first_head = cpu and dtype == torch.float32
        self.packed = packed if cpu and dtype == torch.float32 else None
        self._scratch: Optional[torch.Tensor] = None

    def _use_packed(self, x: torch.Tensor, biases: Sequence) -> bool:
        return self.packed is not None and x.numel() <= _PACK_MAX_ROWS * x.shape[-1] and all(b is None for b in biases)

    def __call__(self, x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence) -> List[torch.Tensor]:
        """``[x W_i^T + b_i for each weight]``."""
        if self._use_packed(x, biases):
            y = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed(weights), None, "none", [], "")
            return list(y.split([w.shape[0] for w in weights], -1))
        if not self.widen:
            return [F.linear(x, w, b) for w, b in zip(weights, biases)]
        return list(self._widened(x, weights, biases).split([w.shape[0] for w in weights], -1))

    def head(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self._use_packed(x, [bias]):
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed([weight]), None, "none", [], "")
        if self.widen:
            return self._widened(x, [weight], [bias])
        if self.rows_first_head and bias is None and x.dim() == 2:
            return torch.mm(weight, x.t()).t()
        return F.linear(x, weight, bias)

    def _widened(self, x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence) -> torch.Tensor:
        k = x.shape[-1]
        x32 = x.reshape(-1, k).float()
        total = sum(w.shape[0] for w in weights)
        out = torch.empty(total, x32.shape[0], dtype=torch.float32, device=x.device)  # (W x^T): W's rows in order
        rows = max(1, _SCRATCH_BYTES // (4 * k))
        if self._scratch is None or self._scratch.numel() < rows * k:
            self._scratch = torch.empty(rows * k, dtype=torch.float32, device=x.device)
        top = 0
        for w, b in zip(weights, biases):
            for first in range(0, w.shape[0], rows):
                part = w[first : first + rows]
                wide = self._scratch[: part.numel()].view(part.shape).copy_(part)
                torch.mm(wide, x32.t(), out=out[top + first : top + first + part.shape[0]])
            if b is not None:
                out[top : top + w.shape[0]] += b.float()[:, None]
            top += w.shape[0]
        return out.t().to(self.dtype, memory_format=torch.contiguous_format).view(*x.shape[:-1], total)


class _Projection:
    """Linear modules applied to the same input: their weights multiplied directly when they are all plain
    ``nn.Linear`` (``_Linears``), else each module called (LoRA, quantised, hooked modules)."""

    def __init__(self, linears: _Linears, modules: Sequence[nn.Module]):
        self.linears, self.modules = linears, list(modules)
        self.direct = all(map(_plain_linear, self.modules))

    def __call__(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self.direct:
            return self.linears(x, [m.weight for m in self.modules], [m.bias for m in self.modules])
        return [m(x) for m in self.modules]


def _identity_or(module: nn.Module) -> Optional[nn.Module]:
    return None if type(module) is nn.Identity else module


class _Layer:
    """One ``TransformerSelfAttentionLayer``, checked, with its projections grouped."""

    def __init__(self, layer: nn.Module, linears: _Linears):
        a = layer.attn
        self.heads, self.kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.sa_norm, self.mlp_norm = layer.sa_norm, layer.mlp_norm
        self.sa_scale, self.mlp_scale = _identity_or(layer.sa_scale), _identity_or(layer.mlp_scale)
        self.qkv = _Projection(linears, [a.q_proj, a.k_proj, a.v_proj])
        self.output = _Projection(linears, [a.output_proj])
        self.rope, self.q_norm, self.k_norm = a.pos_embeddings, a.q_norm, a.k_norm
        mlp = layer.mlp
        self.feed_forward = _torchtune(mlp, "FeedForward") and not _hooked(mlp)
        if self.feed_forward:  # torchtune's FeedForward: w2(activation(w1(x)) * w3(x)), w3 optional
            self.activation = mlp.activation
            self.gate_up = _Projection(linears, [mlp.w1] + ([mlp.w3] if mlp.w3 is not None else []))
            self.down = _Projection(linears, [mlp.w2])
        else:
            self.mlp = mlp

    def feed(self, h: torch.Tensor) -> torch.Tensor:
        if not self.feed_forward:
            return self.mlp(h)
        gate_up = self.gate_up(h)
        h = self.activation(gate_up[0])
        if len(gate_up) == 2:
            h = h * gate_up[1]
        return self.down(h)[0]


# ----------------------------------------------------------------------------- the decoder
class _LeanDecoder:
    """A torchtune decoder's prefill and decode steps, run on its layers' weights and this call's KV cache.

    Per layer the operations of torchtune 0.6.1's ``TransformerSelfAttentionLayer`` and ``MultiHeadAttention``
    forward with a KV cache, in their order: ``sa_norm``; q/k/v projections; RoPE on q and k together
    (``_rotate``, bit-equal to ``RotaryPositionalEmbeddings``, tested); ``q_norm``/``k_norm`` when set (Qwen3-style, applied
    after RoPE as torchtune does); keys and values into the cache; scaled dot-product attention;
    ``output_proj``, ``sa_scale``, residual; ``mlp_norm``, MLP, ``mlp_scale``, residual. Then ``norm`` and the
    output projection on the last position only. Differences, none changing the maths:

    * the query heads of a kv group are folded into the query axis (``q`` [B, kv_heads, q_per_kv * s, d]
      against the unexpanded cache) instead of copying keys and values to every query head;
    * the mask is given to attention in additive form, built once per step for all layers, and covers only the
      filled part of the cache; RoPE factors are looked up once per step for all layers sharing a RoPE module;
    * the linear maps go through ``_Linears``;
    * the KV cache is this call's own tensors (one [B, kv_heads, length, d] pair per layer), not torchtune's
      ``KVCache``, so the model object is never put in its caching state.

    Layouts it does not recognise are refused with a ValueError when it is built (``_check_layer``), before
    any work. Hooks on projections, norms and MLPs run (such modules are called); hooks on the layers or
    attention modules are refused.
    """

    def __init__(self, model: nn.Module):
        _check_model(model)
        for i, layer in enumerate(model.layers):
            _check_layer(i, layer)
        emb = model.tok_embeddings.weight
        self.model, self.dtype, self.device = model, emb.dtype, emb.device
        self.linears = _Linears(self.dtype, self.device, _PackedWeights.of(model))
        self.layers = [_Layer(layer, self.linears) for layer in model.layers]
        self.head = self._head(model.output)

    def _head(self, output):
        if _torchtune(output, "TiedLinear", "__call__") and not _hooked(output.linear):
            weight = output.tied_module.weight
            if type(weight) in (nn.Parameter, torch.Tensor):
                return lambda x: self.linears.head(x, weight, None)
        elif _plain_linear(output):
            return lambda x: self.linears.head(x, output.weight, output.bias)
        return output

    # -- state: this call's KV cache, the additive key mask and the next position id, per batch row
    def prefill(self, prompt: "_Prompt", cache_len: int) -> torch.Tensor:
        """Set up the cache for ``prompt`` and return the fp32 logits [B, V] of its last position."""
        batch, plen = prompt.valid.shape
        self.kv = _kv_cache(self.layers, batch, cache_len, self.dtype, self.device)
        self.key_mask = torch.full((batch, cache_len), float("-inf"), dtype=self.dtype, device=self.device)
        self.key_mask[:, :plen].masked_fill_(prompt.valid, 0.0)
        self.next_pos = prompt.lens.clone()  # position id of the next fed token
        self.filled = plen
        return self._forward(prompt.embeds, prompt.positions, _additive(prompt.attend, self.dtype), 0)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; fp32 logits [B, V] of the next."""
        slot = self.filled
        self.key_mask[:, slot] = 0.0
        x = self.model.tok_embeddings(tokens)[:, None]
        logits = self._forward(x, self.next_pos[:, None], self.key_mask[:, None, : slot + 1], slot)
        self.filled += 1
        self.next_pos += 1
        return logits

    def keep(self, rows: torch.Tensor) -> None:
        """Drop the batch rows not in ``rows`` (finished samples)."""
        self.kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.kv]
        self.key_mask, self.next_pos = self.key_mask[rows], self.next_pos[rows]

    def _forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
        """Embeddings ``x`` [B, s, D] into cache slots ``start .. start + s - 1``, position ids ``pos`` [B, s],
        additive ``mask`` [B, s, start + s]; fp32 logits [B, V] of the last position."""
        b, s = x.shape[:2]
        end = start + s
        rotations, masks = {}, {}
        for layer, (k_cache, v_cache) in zip(self.layers, self.kv):
            heads, kv_heads, d = layer.heads, layer.kv_heads, layer.head_dim
            group = heads // kv_heads
            h = layer.sa_norm(x)
            qkv = torch.cat(layer.qkv(h), -1).view(b, s, heads + 2 * kv_heads, d).transpose(1, 2)
            qk = qkv[:, : heads + kv_heads]  # heads first: RoPE broadcasts over an outer axis (fast)
            if layer.rope is not None:
                if id(layer.rope) not in rotations:
                    rotations[id(layer.rope)] = _rotation(layer.rope.cache[pos], b, s, d)
                qk = _rotate(qk, rotations[id(layer.rope)])
            q, k = qk[:, :heads], qk[:, heads:]
            if layer.q_norm is not None:
                q = layer.q_norm(q)
            if layer.k_norm is not None:
                k = layer.k_norm(k)
            k_cache[:, :, start:end] = k
            v_cache[:, :, start:end] = qkv[:, heads + kv_heads :]
            if group not in masks:
                masks[group] = _grouped_mask(mask, group)
            out = F.scaled_dot_product_attention(
                q.reshape(b, kv_heads, group * s, d), k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=masks[group]
            )
            out = out.view(b, heads, s, d).transpose(1, 2).reshape(b, s, heads * d)
            out = layer.output(out)[0]
            h = (out if layer.sa_scale is None else layer.sa_scale(out)) + x
            out = layer.feed(layer.mlp_norm(h))
            x = h + (out if layer.mlp_scale is None else layer.mlp_scale(out))
        return self.head(self.model.norm(x[:, -1])).float()


def _kv_cache(layers: Sequence[_Layer], batch: int, length: int, dtype: torch.dtype, device) -> List[tuple]:
    """One (keys, values) pair [batch, kv_heads, length, head_dim] per layer, uninitialised: attention reads
    slots ``:end`` only, all written first (the prefill writes every prompt slot, padding included)."""
    shapes = [(batch, layer.kv_heads, length, layer.head_dim) for layer in layers]
    return [(torch.empty(s, dtype=dtype, device=device), torch.empty(s, dtype=dtype, device=device)) for s in shapes]


def _additive(attend: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean "may attend" as the additive mask attention applies (0 or -inf), as SDPA converts it."""
    return torch.zeros(attend.shape, dtype=dtype, device=attend.device).masked_fill_(~attend, float("-inf"))


def _grouped_mask(mask: torch.Tensor, group: int) -> torch.Tensor:
    """Mask [B, s, L] for queries folded as [B, kv_heads, group * s, d] (row ``j * s + t``: head ``j`` of the
    group, position ``t``): [B, 1, group * s, L]; a single query position broadcasts: [B, 1, 1, L]."""
    b, s, length = mask.shape
    if s == 1:
        return mask[:, None]
    return mask[:, None, None].expand(b, 1, group, s, length).reshape(b, 1, group * s, length)


def _rotation(rope_cache: torch.Tensor, b: int, s_len: int, head_dim: int) -> torch.Tensor:
    """torchtune's RoPE cache rows [B, s, d/2, 2] (cos, sin) as complex factors ``cos + i sin`` [B, 1, s, d/2],
    broadcasting over the heads of a heads-first tensor (``_rotate``); in fp32, as torchtune's products promote
    a cache of the model's dtype."""
    return torch.view_as_complex(rope_cache.float().reshape(b, 1, s_len, head_dim // 2, 2))


def _rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """torchtune's interleaved RoPE in fp32 on ``x`` [B, heads, s, d]: pair ``(x0, x1)`` becomes
    ``(x0 c - x1 s, x1 c + x0 s)``, computed as the complex product ``(x0 + i x1)(c + i s)``: the same
    products and the same sums (torch multiplies complex numbers as ``(ac - bd) + i(ad + bc)``), bit-equal
    to ``RotaryPositionalEmbeddings`` (tested), in one pass instead of its strided halves and stack."""
    xs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xs * rotation).flatten(3).type_as(x)


# ----------------------------------------------------------------------------- decoding
@dataclass
class _Prompt:
    """Prompts left-padded to one length P: ``embeds`` [B, P, D] (zero vectors on padding), ``valid`` [B, P]
    (real positions), ``attend`` [B, P, P] (causal, own real positions only), ``positions`` [B, P] (0 at
    each sample's first real position) and ``lens`` [B]."""

    embeds: torch.Tensor
    valid: torch.Tensor
    attend: torch.Tensor
    positions: torch.Tensor
    lens: torch.Tensor


def _left_padded(prompt_embeds: Sequence[torch.Tensor], lens: List[int], plen: int, dtype, device) -> _Prompt:
    batch, dim = len(lens), prompt_embeds[0].shape[1]
    embeds = torch.zeros(batch, plen, dim, dtype=dtype, device=device)
    valid = torch.zeros(batch, plen, dtype=torch.bool, device=device)
    for i, e in enumerate(prompt_embeds):
        embeds[i, plen - lens[i] :] = e.to(device=device, dtype=dtype)
        valid[i, plen - lens[i] :] = True
    lens_t = torch.tensor(lens, device=device)
    cols = torch.arange(plen, device=device)
    positions = (cols[None, :] - (plen - lens_t)[:, None]).clamp(min=0)  # 0 on padding
    attend = torch.ones(plen, plen, dtype=torch.bool, device=device).tril()[None] & valid[:, None, :]
    # padding queries see nothing real: let them see themselves (no all-masked softmax -> NaN)
    attend[:, cols, cols] |= ~valid
    return _Prompt(embeds, valid, attend, positions, lens_t)


class _StopRules:
    """Each sample's output so far, and when it is done (``_advance``)."""

    def __init__(self, caps, max_new_tokens, stop_ids, newline_ids, stuck_guard):
        self.caps, self.max_new_tokens = caps, max_new_tokens
        self.stops, self.newlines = stop_ids, newline_ids
        self.outputs: List[List[int]] = [[] for _ in caps]
        self.trackers = [stuck_guard.tracker() if stuck_guard else None for _ in caps]
        self.results: List[Optional[GenerationResult]] = [
            _finish([], "cap" if cap < max_new_tokens else "length") if cap == 0 else None for cap in caps
        ]

    def advance(self, i: int, tok: int) -> None:
        if self.results[i] is None:
            self.results[i] = _advance(
                tok, self.outputs[i], self.caps[i], self.max_new_tokens, self.stops, self.newlines, self.trackers[i]
            )

    def done(self, i: int) -> bool:
        return self.results[i] is not None


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
) -> List[GenerationResult]:
    """Greedy-decode every prompt of ``prompt_embeds`` (each ``[L_i, D]``) as one batch.

    ``model``: a torchtune ``TransformerDecoder`` (frozen LLM) whose layers ``_LeanDecoder`` recognises (else
    a ValueError before any work); embeddings are cast to its dtype and device. ``stop_ids``: ids that end a
    sample (e.g. ``ChatTokenizer.stop_ids``), not kept in the output. ``stop_at_newline``: also stop after
    the first token of ``newline_ids`` (see ``newline_token_ids``) that follows some other token (newlines
    opening the answer do not stop it); that token is kept. ``max_new_tokens_per_item``: per-sample caps
    (``min``-ed with ``max_new_tokens``; stopping there is ``"cap"``, at ``max_new_tokens`` ``"length"``).
    ``pad_to_multiple``: round the padded prompt length up (fewer distinct shapes). Results come in input
    order; "stuck" is flagged by ``detect_stuck`` (or set by ``stuck_guard``).
    """
    if not prompt_embeds:
        return []
    decoder = _LeanDecoder(model)  # refuses a layout it does not recognise, before any work
    rules, lens = _checked(
        model, prompt_embeds, max_new_tokens, stop_ids, stop_at_newline, max_new_tokens_per_item, newline_ids,
        stuck_guard,
    )  # fmt: skip
    if max(rules.caps) == 0:
        return rules.results  # type: ignore[return-value]
    plen, cache_len = _lengths(model, lens, rules.caps, pad_to_multiple)
    prompt = _left_padded(prompt_embeds, lens, plen, decoder.dtype, decoder.device)
    with _generating(model):
        _decode(decoder, prompt, cache_len, rules)
    return rules.results  # type: ignore[return-value]


def _checked(
    model, prompt_embeds, max_new_tokens, stop_ids, stop_at_newline, max_new_tokens_per_item, newline_ids, stuck_guard
) -> Tuple[_StopRules, List[int]]:
    """The arguments checked (ValueError otherwise): each sample's stop rules, and the prompt lengths."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    dim = model.tok_embeddings.weight.shape[1]
    lens = []
    for i, e in enumerate(prompt_embeds):
        if e.dim() != 2 or e.shape[1] != dim or e.shape[0] < 1:
            raise ValueError(f"prompt {i} must be [L >= 1, {dim}], got {tuple(e.shape)}")
        lens.append(int(e.shape[0]))
    if max_new_tokens_per_item is None:
        caps = [max_new_tokens] * len(lens)
    else:
        if len(max_new_tokens_per_item) != len(lens):
            raise ValueError(f"{len(max_new_tokens_per_item)} per-item caps for {len(lens)} prompts")
        if any(int(c) < 0 for c in max_new_tokens_per_item):
            raise ValueError("max_new_tokens_per_item must be >= 0")
        caps = [min(int(c), max_new_tokens) for c in max_new_tokens_per_item]
    if stop_at_newline and not newline_ids:
        raise ValueError("stop_at_newline needs newline_ids (see newline_token_ids(tokenizer))")
    stops = frozenset(int(i) for i in stop_ids or ())
    newlines = frozenset(int(i) for i in newline_ids or ()) if stop_at_newline else frozenset()
    return _StopRules(caps, max_new_tokens, stops, newlines, stuck_guard), lens


def _lengths(model, lens: List[int], caps: List[int], pad_to_multiple: Optional[int]) -> Tuple[int, int]:
    """The padded prompt length, and the KV cache length (prompt + new tokens - 1: the last generated token is
    never fed back); ValueError beyond the LLM's ``max_seq_len``."""
    plen = max(lens)
    if pad_to_multiple:
        plen = -(-plen // pad_to_multiple) * pad_to_multiple
    cache_len = plen + max(caps) - 1
    if max(l + c for l, c in zip(lens, caps)) > model.max_seq_len or cache_len > model.max_seq_len:
        raise ValueError(f"prompt + new tokens exceed the LLM's max_seq_len {model.max_seq_len}")
    return plen, cache_len


@contextlib.contextmanager
def _generating(model: nn.Module):
    """The model in eval mode for the call, its mode restored on exit (also on error). KV caches found set up
    on it are deleted (with a warning): a model left with caches cannot train."""
    if _attention_modules_with_cache(model):
        log.warning("greedy_generate: deleting the KV caches already set up on the model")
        delete_caches(model)
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _decode(decoder: _LeanDecoder, prompt: _Prompt, cache_len: int, rules: _StopRules) -> None:
    """Prefill, then one token per step for the rows still going; rows of finished samples are dropped once
    a quarter of the rows are finished ("compaction": one long sample does not cost a full batch)."""
    logits = decoder.prefill(prompt, cache_len)
    rows = list(range(len(rules.caps)))  # sample index of each batch row
    for _ in range(max(rules.caps)):
        tokens = logits.argmax(-1)
        for row, tok in enumerate(tokens.tolist()):
            rules.advance(rows[row], tok)
        active = [r for r, i in enumerate(rows) if not rules.done(i)]
        if not active:
            break
        if len(rows) - len(active) >= max(1, len(rows) // 4):
            keep = torch.tensor(active, device=tokens.device)
            decoder.keep(keep)
            rows, tokens = [rows[r] for r in active], tokens[keep]
        logits = decoder.step(tokens)


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
