"""torchtune LLM builders and ``load_llm``: logits parity with transformers, frozen weights."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tolerances import FP32_DEEP, FP32_PARITY, assert_close_to_scale, rel_diff
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from speechmapper_tune.assets import smollm2_dir
from speechmapper_tune.models.llms import LLMS, _build, check_hf_config, hparams_from_hf_config, load_llm, tiny_hparams

# meta-llama/Llama-3.1-8B-Instruct config.json, as published (the public copies in
# transformers' and TensorRT-LLM's tests agree); only what describes the network.
LLAMA31_8B_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "vocab_size": 128256,
}  # fmt: skip
# utter-project/EuroLLM-9B-Instruct config.json (public mirrors cited in llms.py): plain RoPE, untied.
EUROLLM_9B_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 12288, "max_position_embeddings": 4096, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 42, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "vocab_size": 128000,
}  # fmt: skip
REAL_CONFIGS = {"llama3_1_8b": LLAMA31_8B_INSTRUCT, "eurollm_9b": EUROLLM_9B_INSTRUCT}

PROMPT = [{"role": "user", "content": "Repeat only the following sentence one more time and nothing else: a cat sat."}]


def _assert_frozen(model):
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_dir()


def test_smollm2_logits_match_transformers(smollm2):
    model, dim, vocab = load_llm("smollm2_135m", smollm2, dtype=torch.float32)
    assert (dim, vocab) == (576, 49152)
    _assert_frozen(model)
    hf = LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(smollm2).apply_chat_template(
        PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    tokens = torch.tensor([ids])
    with torch.no_grad():
        ours, ref = model(tokens), hf(tokens).logits
    print(f"smollm2 fp32 max |logit diff| = {rel_diff(ours, ref):.2e} of scale over {tokens.shape[1]} tokens")
    assert_close_to_scale(ours, ref, FP32_PARITY)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def test_smollm2_bf16_keeps_fp32_norm_scales(smollm2):
    model, _, _ = load_llm("smollm2_135m", smollm2, dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    # RMSNorm scales stay fp32 (torchtune normalises in fp32; a bf16 scale blocks the fused kernel)
    assert {d for n, d in dtypes.items() if not n.endswith("scale")} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if n.endswith("scale")} == {torch.float32}
    assert model.output.tied_module is model.tok_embeddings  # tied head shares the table
    _assert_frozen(model)


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_random_llama_parity(tmp_path, tied):
    torch.manual_seed(0)
    hp = tiny_hparams(tie_word_embeddings=tied)
    hf = LlamaForCausalLM(LlamaConfig(**hp.hf_config())).eval()
    # untied: also exercise the sharded (index.json) path
    hf.save_pretrained(tmp_path, max_shard_size="50KB" if not tied else "10GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == (not tied)
    name = "tiny_llm" if tied else "tiny_llm_untied"
    model, dim, vocab = load_llm(name, tmp_path, dtype=torch.float32)
    assert (dim, vocab) == (64, 128)
    _assert_frozen(model)
    tokens = torch.randint(0, vocab, (2, 17))
    with torch.no_grad():
        assert_close_to_scale(model(tokens), hf(tokens).logits, FP32_PARITY)


def test_hf_llama_sizes_itself_from_config(tmp_path):
    torch.manual_seed(1)
    config = {**tiny_hparams().hf_config(), "vocab_size": 77, "hidden_size": 48, "head_dim": 12, "num_hidden_layers": 3}
    hf = LlamaForCausalLM(LlamaConfig(**config)).eval()
    hf.save_pretrained(tmp_path)
    model, dim, vocab = load_llm("hf_llama", tmp_path, dtype=torch.float32)
    assert (dim, vocab, len(model.layers)) == (48, 77, 3)
    tokens = torch.randint(0, vocab, (1, 9))
    with torch.no_grad():
        assert_close_to_scale(model(tokens), hf(tokens).logits, FP32_PARITY)
    for rope in ({"rope_type": "llama3", "factor": 8.0}, {"rope_type": "yarn", "factor": 4.0}):
        assert "not supported" in str(
            pytest.raises(ValueError, hparams_from_hf_config, {**config, "rope_scaling": rope}).value
        )
    other_window = {**LLAMA31_8B_INSTRUCT["rope_scaling"], "original_max_position_embeddings": 4096}
    with pytest.raises(ValueError, match="fixes all but the factor"):
        _build(hparams_from_hf_config({**config, "rope_scaling": other_window}))


def test_wrong_checkpoint_is_refused(tmp_path):
    LlamaForCausalLM(LlamaConfig(**tiny_hparams().hf_config())).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hidden_size: checkpoint 64 != smollm2_135m 576"):
        load_llm("smollm2_135m", tmp_path)
    with pytest.raises(ValueError, match="unknown LLM"):
        load_llm("gpt5", tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llm("tiny_llm", tmp_path / "missing")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_llm("tiny_llm", tmp_path)


def test_untied_config_for_tied_builder_is_refused(tmp_path):
    config = tiny_hparams(tie_word_embeddings=False).hf_config()
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        load_llm("tiny_llm", tmp_path)


# Published sizes: SmolLM2-135M 134,515,008; EuroLLM-9B "9.15B" (HF model page);
# Llama-3.1-8B 8,030,261,248.
@pytest.mark.parametrize(
    "name,params", [("smollm2_135m", 134_515_008), ("eurollm_9b", 9.15e9), ("llama3_1_8b", 8_030_261_248)]
)
def test_full_size_builders_match_hf_shapes(name, params):
    entry = LLMS[name]
    with torch.device("meta"):
        ours = entry.build()
        ref = LlamaForCausalLM(LlamaConfig(**entry.hparams.hf_config()))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    assert round(count / 1e9, 2) == round(params / 1e9, 2)
    pairs = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "layers.0.attn.q_proj.weight": "model.layers.0.self_attn.q_proj.weight",
        "layers.0.attn.k_proj.weight": "model.layers.0.self_attn.k_proj.weight",
        "layers.0.attn.v_proj.weight": "model.layers.0.self_attn.v_proj.weight",
        "layers.0.attn.output_proj.weight": "model.layers.0.self_attn.o_proj.weight",
        "layers.0.mlp.w1.weight": "model.layers.0.mlp.gate_proj.weight",
        "layers.0.mlp.w2.weight": "model.layers.0.mlp.down_proj.weight",
        "layers.0.mlp.w3.weight": "model.layers.0.mlp.up_proj.weight",
    }
    theirs = dict(ref.named_parameters())
    for tt_name, tensor in ours.named_parameters():
        if tt_name in pairs:
            assert tensor.shape == theirs[pairs[tt_name]].shape, tt_name
    assert len(ours.layers) == entry.hparams.num_layers


def test_eurollm_values_are_the_cited_ones():
    config = LLMS["eurollm_9b"].hparams.hf_config()
    cited = json.loads(
        '{"hidden_size": 4096, "intermediate_size": 12288, "max_position_embeddings": 4096,'
        ' "num_attention_heads": 32, "num_hidden_layers": 42, "num_key_value_heads": 8,'
        ' "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": false,'
        ' "vocab_size": 128000, "head_dim": 128}'
    )  # utter-project/EuroLLM-9B-Instruct config.json (see the comment in llms.py)
    assert {k: config[k] for k in cited} == cited


def test_forward_embeds_positions_equals_full_logits_there(smollm2):
    """Training asks for logits at label positions only; they equal the full pass's there."""
    from speechmapper_tune.models.llms import forward_embeds

    model, _, _ = load_llm("smollm2_135m", smollm2, dtype=torch.float32)
    torch.manual_seed(0)
    embeds = model.tok_embeddings(torch.randint(0, 1000, (2, 12)))
    positions = torch.zeros(2, 12, dtype=torch.bool)
    positions[0, 3:7], positions[1, 9:] = True, True
    with torch.no_grad():
        full = forward_embeds(model, embeds)
        some = forward_embeds(model, embeds, positions=positions)
    assert some.shape == (7, full.shape[-1]) and some.dtype == torch.float32
    assert_close_to_scale(some, full[positions], FP32_DEEP)  # 7-row vs 24-row matmuls: other kernels


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_named_builders_are_the_published_configs(name):
    """The named builder is exactly what the model's own config.json describes (RoPE included)."""
    assert hparams_from_hf_config(REAL_CONFIGS[name]) == LLMS[name].hparams
    check_hf_config(name, REAL_CONFIGS[name])
    with pytest.raises(ValueError, match="rope_scaling"):
        check_hf_config(
            name, {**REAL_CONFIGS[name], "rope_scaling": {**LLAMA31_8B_INSTRUCT["rope_scaling"], "factor": 32.0}}
        )


def test_llama31_rope_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    with torch.device("meta"):
        model = LLMS["llama3_1_8b"].build()
    rope = model.layers[0].attn.pos_embeddings
    with torch.device("cpu"):
        rope.rope_init()
    ref, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**LLAMA31_8B_INSTRUCT))
    # elementwise: each frequency is computed on its own (no sums), and they span 1 to 1e-7
    torch.testing.assert_close(rope.theta, ref, rtol=1e-6, atol=0)
    assert attention_factor == 1.0
    plain = 1.0 / 500_000.0 ** (torch.arange(0, 128, 2).float() / 128)
    assert (rope.theta / plain).min() == pytest.approx(1 / 8)  # the scaling is really on


# 2 layers and a 2048-token vocabulary (not 128K: two fp32 copies of 4096 x 128K tables would
# take 8 GB); hidden size, heads, KV heads, FFN width and RoPE are the real ones.
@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_paper_llm_depth_reduced_logits_match_transformers(tmp_path, name):
    config = {**REAL_CONFIGS[name], "num_hidden_layers": 2, "vocab_size": 2048}
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**config)).eval()
    hf.save_pretrained(tmp_path)
    model, dim, vocab = load_llm("hf_llama", tmp_path, dtype=torch.float32)
    assert (dim, vocab, len(model.layers)) == (4096, 2048, 2)
    assert hparams_from_hf_config(config) == dataclasses.replace(LLMS[name].hparams, num_layers=2, vocab_size=2048)

    tokens = torch.randint(0, vocab, (2, 24))
    # the second half sits far past the first: relative distances beyond Llama-3.1's original
    # 8192-position window, where the scaled low frequencies decide the attention
    far = 9000 if name == "llama3_1_8b" else 3000  # EuroLLM's window is 4096
    pos = torch.cat([torch.arange(12), far + torch.arange(12)]).expand(2, -1)
    with torch.no_grad():
        ours_near, ref_near = model(tokens), hf(tokens).logits
        ours_far = model(tokens, input_pos=pos)
        # an explicit all-ones mask keeps transformers from reading the position jump as a packed sequence
        ref_far = hf(tokens, position_ids=pos, attention_mask=torch.ones_like(tokens)).logits
    near, far_diff = rel_diff(ours_near, ref_near), rel_diff(ours_far, ref_far)
    print(
        f"{name} (2 layers) fp32 max |logit diff| of scale: {near:.2e} at positions 0-23, {far_diff:.2e} with the jump"
    )
    assert_close_to_scale(ours_near, ref_near, FP32_PARITY)
    assert_close_to_scale(ours_far, ref_far, FP32_PARITY)
    assert rel_diff(ref_far, ref_near) > 100 * FP32_PARITY  # the jump changes the logits: the test can see RoPE


def test_llama31_lora_variant_is_torchtunes():
    """The LoRA build goes through the same hparams: torchtune's own lora_llama3_1_8b, name for name."""
    from torchtune.models.llama3_1 import lora_llama3_1_8b

    from speechmapper_tune.models.llms import LoraConfig

    lora = LoraConfig(rank=4, attn_modules=("q_proj", "v_proj"))
    with torch.device("meta"):
        ours = LLMS["llama3_1_8b"].build_with(lora)
        ref = lora_llama3_1_8b(**lora.builder_kwargs())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert ours.layers[0].attn.pos_embeddings.scale_factor == 8
