"""Batched greedy decoding from embeddings: stop rules, stuck detection, batch independence,
cache lifecycle, and token-exact parity with transformers' ``generate(inputs_embeds=...)``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
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
def _zero_layer(dim, heads=2, kv_heads=1, max_seq_len=512):
    """A real torchtune layer (RoPE, grouped-query attention over the cache, SwiGLU MLP) whose attention and
    MLP outputs are zeroed: the identity, computed through the whole decoder."""
    from torchtune.modules import (
        FeedForward,
        MultiHeadAttention,
        RMSNorm,
        RotaryPositionalEmbeddings,
        TransformerSelfAttentionLayer,
    )

    hd = dim // heads
    attn = MultiHeadAttention(
        embed_dim=dim, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd,
        q_proj=nn.Linear(dim, heads * hd, bias=False), k_proj=nn.Linear(dim, kv_heads * hd, bias=False),
        v_proj=nn.Linear(dim, kv_heads * hd, bias=False), output_proj=nn.Linear(heads * hd, dim, bias=False),
        pos_embeddings=RotaryPositionalEmbeddings(hd, max_seq_len=max_seq_len), max_seq_len=max_seq_len,
    )  # fmt: skip
    mlp = FeedForward(
        gate_proj=nn.Linear(dim, 2 * dim, bias=False), down_proj=nn.Linear(2 * dim, dim, bias=False),
        up_proj=nn.Linear(dim, 2 * dim, bias=False),
    )  # fmt: skip
    nn.init.zeros_(attn.output_proj.weight)
    nn.init.zeros_(mlp.w2.weight)
    return TransformerSelfAttentionLayer(attn, mlp, sa_norm=RMSNorm(dim), mlp_norm=RMSNorm(dim))


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
        self.layers = nn.ModuleList([_zero_layer(vocab)])
        self.norm = nn.Identity()
        self.max_seq_len = 512

    def prompt(self, *ids):
        return self.tok_embeddings(torch.tensor(ids)).detach()


@pytest.fixture
def kv_caches(monkeypatch):
    """(batch, length) of every KV cache greedy_generate allocates."""
    from speechmapper_tune import generation

    sizes, real = [], generation._kv_cache
    monkeypatch.setattr(
        generation, "_kv_cache", lambda layers, b, n, *a: sizes.append((b, n)) or real(layers, b, n, *a)
    )
    return sizes


def _no_torchtune_caches(model):
    return all(getattr(m, "kv_cache", None) is None for m in model.modules())


EOS, NL = 0, 9
CHAINS = {1: 2, 2: 3, 3: EOS, 4: 5, 5: 6, 6: 5, 7: 8, 8: NL, NL: 10, 10: 11, 11: 12, 12: 13, 13: 14, 14: 15, 15: 16}


def test_stop_rules_and_input_order(kv_caches):
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
    assert kv_caches == [(6, 3 + 20 - 1)]  # one cache: padded prompt + new tokens - 1 (the last is never fed)
    assert _no_torchtune_caches(lm)
    with pytest.raises(ValueError, match="newline_ids"):
        greedy_generate(lm, prompts, stop_at_newline=True)


def test_compaction_changes_nothing_and_shrinks_the_batch():
    lm = MarkovLM(CHAINS)
    prompts = [lm.prompt(1), lm.prompt(4), lm.prompt(7), lm.prompt(10), lm.prompt(2), lm.prompt(5)]
    kwargs = dict(max_new_tokens=12, stop_ids=[EOS])
    one_by_one = [greedy_generate(lm, [p], **kwargs)[0] for p in prompts]  # a batch of one is never compacted
    rows = []
    lm.output.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))  # once per step
    compacted = greedy_generate(lm, prompts, **kwargs)
    assert [(r.ids, r.stopped_by, r.flags) for r in compacted] == [(r.ids, r.stopped_by, r.flags) for r in one_by_one]
    assert rows[0] == 6 and rows[-1] == 2  # the two loops (4 -> 5 6 5 6 ..., 5 -> ...) are left
    assert len(rows) == 12  # prefill + 11 steps: the 12th token is never fed back


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


# ----------------------------------------------------------------------------- layouts
class _NotALayer(nn.Module):
    def forward(self, h, mask=None, input_pos=None):
        return h


def test_unrecognised_layouts_are_refused_before_any_work(kv_caches):
    from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings
    from torchtune.modules import TransformerSelfAttentionLayer

    def refused(lm, match):
        with pytest.raises(ValueError, match=match):
            greedy_generate(lm, [lm.prompt(1)], max_new_tokens=3)

    lm = MarkovLM(CHAINS)
    lm.layers.append(_NotALayer())
    refused(lm, r"layer 1 \(_NotALayer\): only torchtune's TransformerSelfAttentionLayer")

    class OwnForward(TransformerSelfAttentionLayer):  # a subclass with other maths
        def forward(self, x, **kwargs):
            return 2 * super().forward(x, **kwargs)

    lm = MarkovLM(CHAINS)
    lm.layers[0].__class__ = OwnForward
    refused(lm, r"layer 0 \(OwnForward\): only torchtune's TransformerSelfAttentionLayer \(with its own forward\)")

    lm = MarkovLM(CHAINS)
    lm.layers[0].attn.pos_embeddings = Qwen2RotaryPositionalEmbeddings(16, max_seq_len=512)  # halves, not pairs
    refused(lm, r"layer 0's attention \(MultiHeadAttention\): pos_embeddings Qwen2RotaryPositionalEmbeddings")

    lm = MarkovLM(CHAINS)
    lm.layers[0].attn.k_proj = None
    refused(lm, r"layer 0's attention \(MultiHeadAttention\): it has no k_proj")

    lm = MarkovLM(CHAINS)
    lm.layers[0].register_forward_pre_hook(lambda m, args: None)
    refused(lm, r"layer 0 \(TransformerSelfAttentionLayer\): it has forward hooks")

    del lm.norm
    refused(lm, r"the model \(MarkovLM\): no norm")
    assert kv_caches == []  # refused before anything was allocated or run


def _tiny(variant: str, dtype=torch.float32) -> nn.Module:
    """Test-size torchtune Llamas covering the layouts the decoder runs: tied head (TiedLinear), untied head
    with Llama3ScaledRoPE, LoRA projections (called as modules), q/k norms with q/k/v biases."""
    import dataclasses

    from torchtune.modules import RMSNorm

    from speechmapper_tune.models.llms import Llama3RopeScaling, LoraConfig, _build, tiny_hparams

    torch.manual_seed(0)
    if variant == "untied_scaled_rope":
        model = _build(dataclasses.replace(tiny_hparams(False), rope_scaling=Llama3RopeScaling(factor=8.0)))
    elif variant == "lora":
        model = _build(tiny_hparams(), LoraConfig(attn_modules=("q_proj", "v_proj"), apply_to_mlp=True))
        with torch.no_grad():  # LoRA's B starts at zero: make the adapters count
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    else:
        model = _build(tiny_hparams())
    if variant == "qk_norm_bias":  # Qwen3-style q/k norms (after RoPE in torchtune), Qwen2-style biases
        for layer in model.layers:
            a = layer.attn
            a.q_norm, a.k_norm = RMSNorm(a.head_dim), RMSNorm(a.head_dim)
            for norm in (a.q_norm, a.k_norm):
                nn.init.uniform_(norm.scale, 0.5, 1.5)
            for name in ("q_proj", "k_proj", "v_proj"):
                old = getattr(a, name)
                setattr(a, name, nn.Linear(old.in_features, old.out_features, bias=True))
    model = model.to(dtype).eval()
    for m in model.modules():  # as load_llm: norm scales stay fp32
        if isinstance(m, RMSNorm):
            m.scale.data = m.scale.data.float()
    return model


def _step_logits(model, prompts, n, widen=None):
    """fp32 logits [B, n, V] of the greedy steps through the decoder's prefill and steps (batched, left-padded)."""
    from speechmapper_tune import generation

    decoder = generation._LeanDecoder(model)
    if widen is not None:
        decoder.linears.widen = widen
    lens = [p.shape[0] for p in prompts]
    prompt = generation._left_padded(prompts, lens, max(lens), decoder.dtype, decoder.device)
    with torch.no_grad():
        logits = [decoder.prefill(prompt, max(lens) + n - 1)]
        for _ in range(n - 1):
            logits.append(decoder.step(logits[-1].argmax(-1)))
    return torch.stack(logits, 1)


def _plain_logits(model, prompt, ids):
    """Reference: torchtune's own modules on the whole sequence (prompt + ids[:-1]) at once, no KV cache,
    causal: fp32 logits [len(ids), V] of the positions that predicted ``ids``."""
    from speechmapper_tune.models.llms import forward_embeds

    with torch.no_grad():
        seq = torch.cat([prompt, model.tok_embeddings(torch.tensor(ids[:-1], dtype=torch.long))])
        positions = torch.zeros(1, seq.shape[0], dtype=torch.bool)
        positions[0, -len(ids) :] = True
        return forward_embeds(model, seq[None], positions=positions)


def _assert_greedy_path(ours, ids, ref, rel):
    """``ours`` logits within ``rel`` of the reference's scale, and each chosen id a maximum of the reference
    up to that tolerance (so near-ties may go either way on another CPU)."""
    tol = rel * ref.abs().max()
    assert (ours - ref).abs().max() <= tol, ((ours - ref).abs().max(), tol)
    chosen = ref.gather(-1, torch.tensor(ids)[:, None])[:, 0]
    assert (chosen >= ref.max(-1).values - 2 * tol).all()


# fp32 differences come from the order of sums only: measured up to 5e-7 of the logits' scale on the tiny
# models, 2.2e-6 on SmolLM2 (30 layers): 10x margin over the larger
FP32_REL = 2e-5
# bf16: one bf16 rounding is 2^-8 = 3.9e-3 relative; ours and torchtune's round differently in places (SDPA,
# folded heads, sums), ~5e-3 of the scale measured on these models: 4 roundings allowed
BF16_REL = 4 * 2**-8


@pytest.mark.parametrize("variant", ["tied", "untied_scaled_rope", "lora", "qk_norm_bias"])
def test_decoder_equals_a_plain_forward_of_torchtunes_modules(variant):
    model = _tiny(variant)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randn(n, 64, generator=g) for n in (5, 9, 7)]  # left padding of 4 and 2
    n = 6
    ours = _step_logits(model, prompts, n)
    res = greedy_generate(model, prompts, max_new_tokens=n)
    assert [r.ids for r in res] == ours.argmax(-1).tolist()  # greedy_generate takes these steps
    for i, p in enumerate(prompts):
        _assert_greedy_path(ours[i], res[i].ids, _plain_logits(model, p, res[i].ids), FP32_REL)


@pytest.mark.parametrize("widen", [True, False], ids=["bf16-widened-to-fp32", "bf16-products"])
def test_bf16_decoder_within_bf16_rounding_of_torchtunes(widen):
    """bf16 through both ways of ``_Linears`` (widening is the default on CPUs without native bf16)."""
    model = _tiny("qk_norm_bias", torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randn(n, 64, generator=g).to(torch.bfloat16) for n in (5, 9, 7)]
    ours = _step_logits(model, prompts, 6, widen=widen)
    for i, p in enumerate(prompts):
        ids = ours[i].argmax(-1).tolist()
        _assert_greedy_path(ours[i], ids, _plain_logits(model, p, ids), BF16_REL)


@pytest.mark.parametrize("shape", [(8, 576, 1536), (480, 1536, 576), (8, 576, 5000)], ids=["decode", "prefill", "head"])
def test_widened_bf16_products_equal_torchs_up_to_one_rounding(shape):
    from speechmapper_tune.generation import _Linears

    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(torch.bfloat16)
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    lin = _Linears(torch.bfloat16, torch.device("cpu"))
    lin.widen = True
    size = x.float().abs() @ w.float().abs().t() + b.float().abs()  # sum of the terms' magnitudes
    for ours, ref in ((lin(x, [w[:100], w[100:]], [b[:100], b[100:]]), [F.linear(x, w, b)]),
                      ([lin.head(x, w, None)], [F.linear(x, w)])):  # fmt: skip
        ours, ref = torch.cat(ours, -1).float(), ref[0].float()
        assert ours.shape == ref.shape
        # the same exact products summed in fp32 in another order (a difference of at most ~k fp32 roundings
        # of the terms' size), then rounded to bf16: results differ rarely, by one bf16 step (2^-8 relative)
        assert ((ours - ref).abs() <= ref.abs() * 2**-7 + k * 2**-24 * size).all()
        assert (ours == ref).float().mean() > 0.99


def test_fp32_head_equals_f_linear():
    from speechmapper_tune.generation import _Linears

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 576, generator=g), torch.randn(5000, 576, generator=g) / 24
    ours, ref = _Linears(torch.float32, torch.device("cpu")).head(x, w, None), F.linear(x, w)
    size = x.abs() @ w.abs().t()  # sum of the terms' magnitudes
    # two orders of the same fp32 sums: each within ~k roundings of the terms' size from the exact sum
    assert ((ours - ref).abs() <= 2 * 576 * 2**-24 * size).all()


def test_weight_updates_are_seen_by_the_next_call():
    """No weight state survives a call: after an optimizer step, the next call decodes the updated model."""
    from speechmapper_tune.models.llms import forward_embeds

    model = _tiny("untied_scaled_rope")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randn(n, 64, generator=g) for n in (5, 9)]
    before = [r.ids for r in greedy_generate(model, prompts, max_new_tokens=4)]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    (-sum(forward_embeds(model, p[None])[0, :, 7].sum() for p in prompts)).backward()  # every weight towards id 7
    optimizer.step()
    after = greedy_generate(model, prompts, max_new_tokens=4)
    assert [r.ids for r in after] != before
    for i, p in enumerate(prompts):
        ours = _step_logits(model, [p], 4)[0]
        assert ours.argmax(-1).tolist() == after[i].ids
        _assert_greedy_path(ours, after[i].ids, _plain_logits(model, p, after[i].ids), FP32_REL)


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
    padded = greedy_generate(model, embeds, pad_to_multiple=64, **kwargs)
    singles = [greedy_generate(model, [e], **kwargs)[0] for e in embeds]  # no padding, no batch partners
    for b, p, s in zip(batched, padded, singles):
        assert b.ids == s.ids == p.ids and b.stopped_by == s.stopped_by == p.stopped_by
    assert {r.stopped_by for r in batched} == {"eos", "length"}  # both endings exercised
    assert "Paris" in tok.decode(batched[0].ids)


def test_decoder_equals_a_plain_forward_of_torchtunes_smollm2(smollm2):
    """Prefill and decode steps, batched and left-padded, give the logits torchtune's own modules give on each
    whole sequence at once (no KV cache, no padding), so the same greedy ids."""
    _, model, _, embeds = smollm2
    n = 8
    ours = _step_logits(model, embeds, n)
    res = greedy_generate(model, embeds, max_new_tokens=n)
    assert [r.ids for r in res] == ours.argmax(-1).tolist()
    for i, e in enumerate(embeds):
        _assert_greedy_path(ours[i], res[i].ids, _plain_logits(model, e, res[i].ids), FP32_REL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_tensor_rope_equals_torchtunes_bit_for_bit(dtype):
    from torchtune.modules import RotaryPositionalEmbeddings

    from speechmapper_tune.generation import _rotate, _rotation

    x = (torch.randn(3, 7, 9, 64) * 4).to(dtype)
    pos = torch.randint(0, 200, (3, 7))
    for rope in (RotaryPositionalEmbeddings(dim=64, max_seq_len=256), RotaryPositionalEmbeddings(64, 256).to(dtype)):
        heads_first = _rotate(x.transpose(1, 2), _rotation(rope.cache[pos], 3, 7, 64))  # fp32 cache, or x's dtype
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


def test_packed_fp32_products_equal_f_linear():
    """Decode-step products on oneDNN-packed weights (grouped weights as one) match ``F.linear``."""
    from speechmapper_tune.generation import _Linears, _PackedWeights

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 576, generator=g)
    ws = [torch.randn(n, 576, generator=g) / 24 for n in (576, 192, 192)]
    lin = _Linears(torch.float32, torch.device("cpu"), _PackedWeights())
    assert lin._use_packed(x, [None] * 3) and not lin._use_packed(torch.randn(480, 576), [None])
    for ours, w in zip(lin(x, ws, [None] * 3), ws):
        ref, size = F.linear(x, w), x.abs() @ w.abs().t()  # size: the sum of the terms' magnitudes
        assert ours.shape == ref.shape
        assert ((ours - ref).abs() <= 2 * 576 * 2**-24 * size).all()  # two orders of the same fp32 sums


def test_packed_weights_follow_in_place_updates_and_skip_large_models(monkeypatch):
    from speechmapper_tune import generation
    from speechmapper_tune.generation import _PackedWeights

    packs = _PackedWeights()
    w = torch.randn(64, 32)
    x = torch.randn(4, 32)
    first = torch.ops.mkldnn._linear_pointwise(x, packs([w]), None, "none", [], "")
    with torch.no_grad():
        w.mul_(2.0)  # an optimizer step: same storage, new version
    second = torch.ops.mkldnn._linear_pointwise(x, packs([w]), None, "none", [], "")
    assert torch.allclose(second, 2 * first, rtol=1e-5, atol=1e-5 * first.abs().max().item())
    model = torch.nn.Linear(32, 64)
    monkeypatch.setattr(generation, "_PACK_MAX_BYTES", 64 * 32 * 4)  # smaller than the model's weights + bias
    assert _PackedWeights.of(model) is None


def test_packed_weights_follow_a_replaced_weight_and_skip_other_dtypes():
    """A new tensor given where an old one was (an id Python may reuse) is packed anew; bf16 models get no packs."""
    import gc

    from speechmapper_tune.generation import _PackedWeights

    packs, x = _PackedWeights(), torch.randn(4, 32)
    w = torch.randn(64, 32)
    packs([w])
    for _ in range(20):  # free the weight and make new ones until one lands on its id (CPython reuses them)
        old = id(w)
        del w
        gc.collect()
        w = torch.randn(64, 32)
        if id(w) == old:
            break
    got = torch.ops.mkldnn._linear_pointwise(x, packs([w]), None, "none", [], "")
    ref = x @ w.t()
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert len(packs._packs) == 1  # the freed weight's pack was dropped
    assert _PackedWeights.of(torch.nn.Linear(32, 64).to(torch.bfloat16)) is None
    assert _PackedWeights.of(torch.nn.Linear(32, 64)) is not None
