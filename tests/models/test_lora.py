"""Optional LoRA on the frozen LLM (``load_llm(..., lora=...)``): identity at init, only the
adapters train, and their state dict round-trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tolerances import FP32_SHALLOW, assert_close_to_scale
from transformers import LlamaConfig, LlamaForCausalLM

from speechmapper_tune.models.llms import (
    forward_embeds,
    load_llm,
    load_lora_state_dict,
    lora_state_dict,
    tiny_hparams,
)
from speechmapper_tune.models.tiny_llm import write_tiny_llm

WORDS = "a cat sat on the mat and dog ran far away".split()
RANK = 4
LORA = {"rank": RANK, "alpha": 8, "dropout": 0.0, "attn_modules": ["q_proj", "v_proj"], "apply_to_mlp": False}
DIM, LAYERS, HEADS, KV_HEADS = 64, 2, 4, 2  # write_tiny_llm's defaults


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return write_tiny_llm(tmp_path_factory.mktemp("tiny_llm"), WORDS)


def _tokens(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens):
    with torch.no_grad():
        return forward_embeds(model, model.tok_embeddings(tokens))


def test_lora_at_init_equals_base(llm_dir):
    base, dim, vocab = load_llm("hf_llama", llm_dir, dtype=torch.float32)
    lora, dim2, vocab2 = load_llm("hf_llama", llm_dir, dtype=torch.float32, lora=LORA)
    assert (dim, vocab) == (dim2, vocab2) == (DIM, vocab)
    assert lora.output.tied_module is lora.tok_embeddings  # tied head kept
    tokens = _tokens(vocab)
    assert_close_to_scale(_logits(lora, tokens), _logits(base, tokens), FP32_SHALLOW)  # B = 0: only kernels differ
    with torch.no_grad():
        assert_close_to_scale(lora(tokens), base(tokens), FP32_SHALLOW)
    b = [p for n, p in lora.named_parameters() if n.endswith("lora_b.weight")]
    assert b and all(torch.count_nonzero(p) == 0 for p in b)


def test_untied_lora_at_init_equals_base(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**tiny_hparams(tie_word_embeddings=False).hf_config())).save_pretrained(tmp_path)
    base, _, vocab = load_llm("hf_llama", tmp_path, dtype=torch.float32)
    lora, _, _ = load_llm("hf_llama", tmp_path, dtype=torch.float32, lora={**LORA, "apply_to_mlp": True})
    tokens = _tokens(vocab)
    assert_close_to_scale(_logits(lora, tokens), _logits(base, tokens), FP32_SHALLOW)


def test_only_adapters_trainable_and_counted(llm_dir):
    model, _, _ = load_llm("hf_llama", llm_dir, dtype=torch.float32, lora=LORA)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_a." in n or ".lora_b." in n for n in trainable)
    assert set(trainable) == set(lora_state_dict(model))
    head_dim = DIM // HEADS
    q = RANK * DIM + HEADS * head_dim * RANK  # A: r x dim, B: (heads * head_dim) x r
    v = RANK * DIM + KV_HEADS * head_dim * RANK  # v_proj is GQA: kv_heads * head_dim outputs
    assert sum(p.numel() for p in trainable.values()) == LAYERS * (q + v) == 1792
    assert not model.training


def test_adamw_step_changes_only_adapters(llm_dir):
    torch.manual_seed(0)
    model, _, vocab = load_llm("hf_llama", llm_dir, dtype=torch.float32, lora=LORA)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapters = set(lora_state_dict(model))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    tokens = _tokens(vocab, seed=1)
    for _ in range(2):  # B = 0 at init, so A only gets a gradient from the second step on
        logits = forward_embeds(model, model.tok_embeddings(tokens))
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in adapters:
            assert not torch.equal(p, before[n]), f"adapter {n} did not change"
        else:
            assert p.grad is None and torch.equal(p, before[n]), f"base parameter {n} changed"


def test_lora_state_dict_round_trip(llm_dir, tmp_path):
    torch.manual_seed(0)
    model, _, vocab = load_llm("hf_llama", llm_dir, dtype=torch.float32, lora=LORA)
    with torch.no_grad():  # stand-in for training: non-zero B
        for n, p in model.named_parameters():
            if n.endswith("lora_b.weight"):
                p.normal_(0, 0.1)
    sd = lora_state_dict(model)
    assert all(t.device.type == "cpu" and t.is_contiguous() and t.dtype == torch.float32 for t in sd.values())
    save_file(sd, str(tmp_path / "lora.safetensors"))

    fresh, _, _ = load_llm("hf_llama", llm_dir, dtype=torch.float32, lora=LORA)
    tokens = _tokens(vocab, seed=2)
    assert (_logits(fresh, tokens) - _logits(model, tokens)).abs().max().item() > 1e-3
    load_lora_state_dict(fresh, load_file(str(tmp_path / "lora.safetensors")))
    assert torch.equal(_logits(fresh, tokens), _logits(model, tokens))

    other_rank, _, _ = load_llm("hf_llama", llm_dir, dtype=torch.float32, lora={**LORA, "rank": RANK * 2})
    with pytest.raises(ValueError, match="another shape"):
        load_lora_state_dict(other_rank, sd)
    with pytest.raises(ValueError, match="missing"):
        load_lora_state_dict(fresh, {k: v for k, v in sd.items() if "layers.0." not in k})
    base, _, _ = load_llm("hf_llama", llm_dir, dtype=torch.float32)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        load_lora_state_dict(base, sd)


def test_bf16_base_keeps_fp32_adapters(llm_dir):
    model, _, vocab = load_llm("hf_llama", llm_dir, dtype=torch.bfloat16, lora=LORA)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if ".lora_" in n} == {torch.float32}
    # base weights bf16, except RMSNorm scales (kept fp32 for the fused rms_norm, models/llms.py)
    assert {d for n, d in dtypes.items() if ".lora_" not in n and not n.endswith("scale")} == {torch.bfloat16}
    tokens = _tokens(vocab)
    h = model.layers[0](model.tok_embeddings(tokens))
    assert h.dtype == torch.bfloat16  # adapters compute in the activations' dtype
    logits = forward_embeds(model, model.tok_embeddings(tokens))  # torchtune's unembed returns fp32
    logits.logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)


def test_bad_lora_options(llm_dir):
    with pytest.raises(ValueError, match="unknown LoRA option"):
        load_llm("hf_llama", llm_dir, lora={**LORA, "ranks": 4})
    with pytest.raises(ValueError, match="attn_modules"):
        load_llm("hf_llama", llm_dir, lora={**LORA, "attn_modules": ["o_proj"]})
