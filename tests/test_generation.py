"""Batched greedy decoding from embeddings: stop rules, stuck detection, batch independence,
cache lifecycle, and token-exact parity with transformers' ``generate(inputs_embeds=...)``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from speechmapper_tune.generation import (
    GenerationResult,
    StuckGuard,
    detect_stuck,
    greedy_generate,
    newline_token_ids,
    tail_period_span,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The test machines share 2 cores: OpenMP with 2 threads under load is ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- detect_stuck
def _words(text):
    """Crafted 'token ids': one id per word."""
    vocab = {}
    return [vocab.setdefault(w, len(vocab)) for w in text.split()]


HER_SISTER = _words("her sister is " + "her sister " * 74)  # paper table 10, 150 tokens


@pytest.mark.parametrize(
    "ids",
    [
        _words("the cat " + "sat " * 40),  # one token
        HER_SISTER,  # bigram
        _words("and then " + "we went to the shop " * 12),  # 5-gram
        _words("a b c d e f g h " * 6),  # 8-gram, whole output
    ],
    ids=["token", "bigram", "5-gram", "8-gram"],
)
def test_stuck_at_the_length_limit(ids):
    assert detect_stuck(ids, hit_length_limit=True)
    assert not detect_stuck(ids, hit_length_limit=False)  # ended by EOS: a loop that stopped


@pytest.mark.parametrize(
    "text",
    [
        "i am from the cutter lying off the coast and i went home after that day",  # normal
        "it was very very cold that night and we stayed in the house until the morning",  # very very
        "her sister " * 10 + "went to the market to buy bread milk eggs cheese and some apples for us all",  # recovered
        "one two three four five six seven eight nine ten " * 3,  # 10-gram: longer than max_period
        "yes yes",  # 2 copies only
    ],
    ids=["sentence", "very-very", "loop-then-recovered", "10-gram", "two-copies"],
)
def test_not_stuck(text):
    assert not detect_stuck(_words(text), hit_length_limit=True)


def test_stuck_rule_thresholds():
    tail = _words("x y " * 5)  # 10 tokens, 5 copies of a bigram
    assert tail_period_span(tail, 2) == 10 and tail_period_span(tail, 1) == 1
    head = list(range(100, 111))  # 11 distinct tokens before the loop: loop covers 10/21 < 50%
    assert not detect_stuck(head + tail, True)
    assert detect_stuck(head[:10] + tail, True)  # exactly 50%
    assert not detect_stuck(_words("a b a b"), True)  # 2 copies < min_repeats=3
    assert detect_stuck(_words("a b a b"), True, min_repeats=2)
    assert not detect_stuck([], True)


# ----------------------------------------------------------------------------- loop logic on a scripted LM
class _Cache(nn.Module):
    def __init__(self, batch, length):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(batch, 1, length, 1), persistent=False)
        self.register_buffer("v_cache", torch.zeros(batch, 1, length, 1), persistent=False)
        self.batch_size = batch


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.kv_cache, self.cache_enabled = None, False


class _CheckingLayer(nn.Module):
    """Identity layer that checks the shapes greedy_generate feeds a torchtune layer."""

    def __init__(self):
        super().__init__()
        self.attn = _Attn()

    def forward(self, h, mask=None, input_pos=None):
        cache = self.attn.kv_cache
        assert cache is not None and cache.k_cache.shape[0] == h.shape[0]
        assert mask.dtype == torch.bool and mask.shape == (h.shape[0], h.shape[1], cache.k_cache.shape[2])
        assert input_pos.shape == h.shape[:2]
        return h


class MarkovLM(nn.Module):
    """Greedy output = ``nxt[previous token]`` (0 when absent): a scripted decoder."""

    def __init__(self, nxt, vocab=32):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, vocab)
        self.tok_embeddings.weight.data = torch.eye(vocab)
        self.output = nn.Linear(vocab, vocab, bias=False)
        self.output.weight.data.zero_()
        for a, b in nxt.items():
            self.output.weight.data[b, a] = 1.0
        self.layers = nn.ModuleList([_CheckingLayer()])
        self.norm = nn.Identity()
        self.max_seq_len = 512
        self.setups = []

    def setup_caches(self, batch_size, dtype, *, decoder_max_seq_len=None, encoder_max_seq_len=None):
        self.setups.append((batch_size, decoder_max_seq_len))
        for layer in self.layers:
            layer.attn.kv_cache, layer.attn.cache_enabled = _Cache(batch_size, decoder_max_seq_len), True

    def caches_are_setup(self):
        return self.layers[0].attn.kv_cache is not None

    def prompt(self, *ids):
        return self.tok_embeddings(torch.tensor(ids))


EOS, NL = 0, 9
CHAINS = {1: 2, 2: 3, 3: EOS, 4: 5, 5: 6, 6: 5, 7: 8, 8: NL, NL: 10, 10: 11, 11: 12, 12: 13, 13: 14, 14: 15, 15: 16}


def test_stop_rules_and_input_order():
    lm = MarkovLM(CHAINS)
    prompts = [lm.prompt(20, 21, 1), lm.prompt(4), lm.prompt(22, 7), lm.prompt(10), lm.prompt(3), lm.prompt(11)]
    res = greedy_generate(
        lm, prompts, max_new_tokens=20, stop_ids=[EOS], stop_at_newline=True, newline_ids={NL},
        max_new_tokens_per_item=[20, 20, 20, 20, 20, 3],
    )  # fmt: skip
    assert [r.ids for r in res] == [[2, 3], [5, 6] * 10, [8, NL], [11, 12, 13, 14, 15, 16], [], [12, 13, 14]]
    assert [r.stopped_by for r in res] == ["eos", "length", "newline", "eos", "eos", "cap"]
    assert [r.flags for r in res] == [[], ["stuck"], [], [], [], []]
    assert all(isinstance(r, GenerationResult) for r in res)
    assert not lm.caches_are_setup() and lm.setups == [(6, 3 + 20 - 1)]
    with pytest.raises(ValueError, match="newline_ids"):
        greedy_generate(lm, prompts, stop_at_newline=True)


def test_compaction_changes_nothing_and_shrinks_the_batch():
    lm = MarkovLM(CHAINS)
    prompts = [lm.prompt(1), lm.prompt(4), lm.prompt(7), lm.prompt(10), lm.prompt(2), lm.prompt(5)]
    kwargs = dict(max_new_tokens=12, stop_ids=[EOS])
    full = greedy_generate(lm, prompts, compact=False, **kwargs)
    sizes = []
    lm.layers[0].register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    compacted = greedy_generate(lm, prompts, compact=True, **kwargs)
    assert [(r.ids, r.stopped_by, r.flags) for r in compacted] == [(r.ids, r.stopped_by, r.flags) for r in full]
    assert sizes[0] == 6 and sizes[-1] == 2  # the two loops (4 -> 5 6 5 6 ..., 5 -> ...) are left


def test_stuck_guard_stops_and_trims():
    lm = MarkovLM(CHAINS)
    prompts = [lm.prompt(4), lm.prompt(1)]
    res = greedy_generate(lm, prompts, max_new_tokens=150, stop_ids=[EOS], stuck_guard=StuckGuard())
    assert (res[0].ids, res[0].stopped_by, res[0].flags) == ([5, 6], "stuck_guard", ["stuck"])
    assert (res[1].ids, res[1].stopped_by) == ([2, 3], "eos")
    kept = greedy_generate(lm, [lm.prompt(4)], max_new_tokens=150, stuck_guard=StuckGuard(trim=False))[0]
    assert kept.ids == [5, 6] * 6  # a bigram needs ceil(12 / 2) = 6 copies
    # legit short repetitions never trigger it
    guard = StuckGuard()
    tracker = guard.tracker()
    sentence = _words("it was very very very cold and we had had enough of it so so so we left")
    assert all(tracker.push(sentence[: i + 1]) is None for i in range(len(sentence)))
    assert guard.repeats_needed(1) == 12 and guard.repeats_needed(2) == 6 and guard.repeats_needed(5) == 4


def test_zero_caps_and_empty_batch():
    lm = MarkovLM(CHAINS)
    assert greedy_generate(lm, []) == []
    res = greedy_generate(lm, [lm.prompt(4), lm.prompt(1)], max_new_tokens=5, max_new_tokens_per_item=[0, 9])
    assert (res[0].ids, res[0].stopped_by) == ([], "cap")
    assert (res[1].ids, res[1].stopped_by) == ([2, 3, 0, 0, 0], "length")  # no stop ids: EOS is a token
    with pytest.raises(ValueError, match="must be"):
        greedy_generate(lm, [torch.zeros(3, 5)])


# ----------------------------------------------------------------------------- real SmolLM2 (fp32)
MESSAGES = [
    "What is the capital of France?",
    'Repeat the previous text between the quotes: "<speech>"',
    "Translate to French: good morning, my friend.",
    "Hi",
    'Transcribe: "<speech>" and then stop.',
]
SPEECH_LEN = (12, 30)


@pytest.fixture(scope="module")
def smollm2():
    from speechmapper_tune.assets import smollm2_dir
    from speechmapper_tune.models.chat_format import ChatTokenizer
    from speechmapper_tune.models.llms import load_llm

    path = smollm2_dir()
    model, dim, _ = load_llm("smollm2_135m", path, dtype=torch.float32)
    tok = ChatTokenizer.from_dir(path, chat_format="smollm2")
    g = torch.Generator().manual_seed(0)
    embeds, speech = [], iter(SPEECH_LEN)
    for text in MESSAGES:
        messages = [{"role": "user", "content": text}]
        if "<speech>" in text:  # speech-like: random vectors with the token embeddings' norm
            n = next(speech)
            ids, start = tok.render_with_speech(messages, n)
            e = model.tok_embeddings(torch.tensor(ids)).clone()
            e[start : start + n] = torch.randn(n, dim, generator=g) * (e.norm(dim=-1).mean() / dim**0.5)
        else:
            e = model.tok_embeddings(torch.tensor(tok.render(messages)))
        embeds.append(e)
    return path, model, tok, embeds


def test_batched_equals_one_by_one(smollm2):
    _, model, tok, embeds = smollm2
    assert len({e.shape[0] for e in embeds}) == len(embeds)  # all lengths differ: real left padding
    kwargs = dict(max_new_tokens=16, stop_ids=tok.stop_ids)
    batched = greedy_generate(model, embeds, **kwargs)
    padded = greedy_generate(model, embeds, pad_to_multiple=64, compact=False, **kwargs)
    # one by one through torchtune's own modules (kv heads expanded per query head, its KV cache update)
    singles = [greedy_generate(model, [e], grouped_attention=False, lean_decode=False, **kwargs)[0] for e in embeds]
    for b, p, s in zip(batched, padded, singles):
        assert b.ids == s.ids == p.ids and b.stopped_by == s.stopped_by
    assert {r.stopped_by for r in batched} == {"eos", "length"}  # both endings exercised
    assert "Paris" in tok.decode(batched[0].ids)


def test_lean_decode_step_equals_torchtunes_modules(smollm2):
    """Prefill and decoding on the layers' weights give the logits torchtune's modules give, so the same ids."""
    from speechmapper_tune import generation

    _, model, tok, embeds = smollm2
    kwargs = dict(max_new_tokens=24, stop_ids=tok.stop_ids)
    lean = greedy_generate(model, embeds, **kwargs)
    modules = greedy_generate(model, embeds, lean_decode=False, **kwargs)
    assert [(r.ids, r.stopped_by) for r in lean] == [(r.ids, r.stopped_by) for r in modules]
    seen = []
    real = generation._LeanForward.__call__
    generation._LeanForward.__call__ = lambda self, *a: seen.append(1) or real(self, *a)
    try:
        greedy_generate(model, embeds[:2], max_new_tokens=3)
    finally:
        generation._LeanForward.__call__ = real
    assert len(seen) == 3  # the lean step ran (prefill + 2 decode steps), not a silent fallback


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_tensor_rope_equals_torchtunes_bit_for_bit(dtype):
    from torchtune.modules import RotaryPositionalEmbeddings

    from speechmapper_tune.generation import _rotate, _rotation

    rope = RotaryPositionalEmbeddings(dim=64, max_seq_len=256)
    x = (torch.randn(3, 7, 9, 64) * 4).to(dtype)
    pos = torch.randint(0, 200, (3, 7))
    heads_first = _rotate(x.transpose(1, 2), *_rotation(rope.cache[pos], 3, 7, 64))
    assert torch.equal(heads_first.transpose(1, 2), rope(x, input_pos=pos))


def test_model_is_reusable_for_training_afterwards(smollm2):
    from speechmapper_tune.models.llms import forward_embeds

    _, model, _, embeds = smollm2
    x = embeds[3][None]
    before = forward_embeds(model, x)
    attn = model.layers[0].attn
    kv_heads, call = attn.num_kv_heads, attn._attention_call
    greedy_generate(model, embeds[:2], max_new_tokens=3)
    greedy_generate(model, embeds[:1], max_new_tokens=2)  # another batch size

    def fail(*_):
        raise RuntimeError("boom")

    handle = model.layers[7].mlp.register_forward_pre_hook(fail)
    try:  # an error mid-decoding restores the model too
        pytest.raises(RuntimeError, greedy_generate, model, embeds[:2], max_new_tokens=3)
    finally:
        handle.remove()
    assert not model.caches_are_setup() and not model.caches_are_enabled() and not model.training
    assert attn.num_kv_heads == kv_heads == 3 and attn._attention_call is call
    assert torch.equal(forward_embeds(model, x), before)  # plain causal forward, no cache left
    model.train()
    try:
        leaf = x.detach().clone().requires_grad_()
        forward_embeds(model, leaf).logsumexp(-1).mean().backward()  # e.g. stage 2: grads reach the inputs
        assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    finally:
        model.eval()


def test_parity_with_transformers_generate(smollm2):
    """Token-exact vs ``LlamaForCausalLM.generate(inputs_embeds=...)`` on the same left-padded batch."""
    from transformers import LlamaForCausalLM

    path, model, tok, embeds = smollm2
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    n = 20
    width = max(e.shape[0] for e in embeds)
    inputs = torch.zeros(len(embeds), width, embeds[0].shape[1])
    attention = torch.zeros(len(embeds), width, dtype=torch.long)
    for i, e in enumerate(embeds):
        inputs[i, width - e.shape[0] :], attention[i, width - e.shape[0] :] = e, 1
    with torch.no_grad():  # eos_token_id=[]: no stop, all 20 tokens compared
        ref = hf.generate(
            inputs_embeds=inputs, attention_mask=attention, max_new_tokens=n, do_sample=False,
            eos_token_id=[], pad_token_id=tok.pad_id,
        )  # fmt: skip
        ref_eos = hf.generate(inputs_embeds=inputs, attention_mask=attention, max_new_tokens=n, do_sample=False)
    ours = greedy_generate(model, embeds, max_new_tokens=n)
    assert [r.ids for r in ours] == ref.tolist()
    # with the chat stop ids: transformers stops at <|im_end|> (its generation_config eos) and pads
    ours_eos = greedy_generate(model, embeds, max_new_tokens=n, stop_ids=tok.stop_ids)
    for r, row in zip(ours_eos, ref_eos.tolist()):
        stop = next((k for k, t in enumerate(row) if t in tok.stop_ids), len(row))
        assert r.ids == row[:stop] and r.stopped_by == ("eos" if stop < len(row) else "length")


def test_newline_ids_of_smollm2(smollm2):
    _, _, tok, _ = smollm2
    ids = newline_token_ids(tok)
    assert tok.encode_text("\n")[0] in ids and tok.encode_text("a")[0] not in ids
    assert all("\n" in tok.decode([i]) for i in ids)


def test_leading_newlines_do_not_stop_the_answer():
    from speechmapper_tune.generation import _advance

    newlines, out = frozenset({10}), []
    assert _advance(10, out, 50, 50, frozenset({2}), newlines, None) is None  # answer opens with a newline: go on
    assert _advance(7, out, 50, 50, frozenset({2}), newlines, None) is None
    res = _advance(10, out, 50, 50, frozenset({2}), newlines, None)
    assert res.stopped_by == "newline" and res.ids == [10, 7, 10]
