"""SpeechLM: training and generation read the same LLM input; checkpoints are checked once, before the LLM loads."""

from __future__ import annotations

import pytest
import torch

from speechmapper_tune.checkpoint.embedding_table import load_embedding_table
from speechmapper_tune.checkpoint.projector_io import embedding_fingerprint, save_projector
from speechmapper_tune.data.manifest import FeatureItem
from speechmapper_tune.data.stage2 import Stage2Collator, Stage2Example, split_prompt
from speechmapper_tune.models import speech_lm
from speechmapper_tune.models.projector import speechmapper_tiny
from speechmapper_tune.models.speech_lm import SpeechLM
from speechmapper_tune.models.tiny_llm import write_tiny_llm

WORDS = "a cat sat on the mat and dog ran far away red".split()
PROMPT = {"user": "{speech} {instruction}", "instruction": "red", "assistant_prefix": "cat"}


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    return write_tiny_llm(tmp_path_factory.mktemp("tiny_llm"), WORDS, dim=32)


def _llm(llm_dir):
    return {"name": "hf_llama", "checkpoint": str(llm_dir), "chat_format": "chatml", "pad_id": 4, "dtype": "fp32"}


def _checkpoint(tmp_path, llm_dir, **meta):
    torch.manual_seed(0)
    folder = tmp_path / "ckpt"
    table = load_embedding_table(llm_dir)
    llm = {
        "name": "hf_llama",
        "chat_format": "chatml",
        "pad_id": 4,
        "dim": 32,
        "fingerprint": embedding_fingerprint(table),
    }
    save_projector(
        folder, speechmapper_tiny(input_dim=16, output_dim=32), {"stage": 2, "llm": llm, "prompt": PROMPT, **meta}
    )
    return folder


def _batch(lm, lengths):
    parts = split_prompt(lm.chat, lm.template)
    samples = []
    for i, n in enumerate(lengths):
        item = FeatureItem(f"u{i}", "cat sat", n, 16, "none", "", "", duration=n / 25)
        ex = Stage2Example(
            item,
            parts,
            lm.chat.encode_text("a dog") + [lm.chat.eos_id],
            lm.chat.encode_text("cat sat"),
            lm.projector.output_length(n),
        )
        samples.append({"id": item.id, "features": torch.randn(n, 16), "example": ex})
    return Stage2Collator(lm.projector.output_length, lm.pad_id)(samples), parts


def test_training_and_generation_read_the_same_input(tmp_path, llm_dir, monkeypatch):
    lm = SpeechLM.from_checkpoint(_checkpoint(tmp_path, llm_dir), llm=_llm(llm_dir))
    torch.manual_seed(1)
    batch, parts = _batch(lm, [40, 23, 31])
    seen = {}
    real_forward, real_generate = speech_lm.forward_embeds, speech_lm.greedy_generate

    def forward_embeds(model, embeds, **kw):  # what the LLM reads in training
        seen["train"] = embeds.detach()
        return real_forward(model, embeds, **kw)

    def greedy_generate(model, prompts, **kw):  # what the LLM reads in generation
        seen["gen"] = prompts
        return real_generate(model, prompts, **kw)

    monkeypatch.setattr(speech_lm, "forward_embeds", forward_embeds)
    monkeypatch.setattr(speech_lm, "greedy_generate", greedy_generate)
    with torch.no_grad():
        lm(batch)  # the training forward (SpeechLM.forward, as speechmapper_adapt calls it)
        pred, _, span = lm.project(batch["features"], batch["lengths"])
        spans = [pred[b, : int(n)] for b, n in enumerate(span)]
        lm.generate(spans, [parts] * 3, max_new_tokens=2)  # as speechmapper_generate and `speechmapper` call it
    for b, prompt in enumerate(seen["gen"]):
        n_prompt = len(parts.prefix) + int(span[b]) + len(parts.suffix)
        assert prompt.shape[0] == n_prompt
        assert torch.equal(seen["train"][b, :n_prompt], prompt), b  # the same vectors, bit for bit
    # the speech span sits right after the prompt prefix and holds the projector output
    assert torch.equal(seen["gen"][1][len(parts.prefix) : len(parts.prefix) + int(span[1])], spans[1])
    # one item alone gets the same prompt as in the batch
    alone = lm.build_inputs([spans[2]], [parts.prefix], [parts.suffix]).prompts()[0]
    assert torch.equal(alone, seen["gen"][2])


def test_the_checkpoint_prompt_is_the_default(tmp_path, llm_dir):
    lm = SpeechLM.from_checkpoint(_checkpoint(tmp_path, llm_dir), llm=_llm(llm_dir))
    assert (lm.template.user, lm.template.assistant_prefix) == (PROMPT["user"], "cat")
    assert lm.prompt_parts().suffix[-1] == lm.chat.encode_text("cat")[-1]  # the forced prefix ends the prompt
    asked = lm.prompt_parts("dog ran")  # an instruction prompt: no forced ASR prefix
    assert lm.chat.decode(asked.suffix).count("cat") == 0 and "dog ran" in lm.chat.decode(asked.suffix)
    other = SpeechLM.from_checkpoint(_checkpoint(tmp_path, llm_dir), llm=_llm(llm_dir), prompt={"user": "{speech}"})
    assert other.template.user == "{speech}" and other.template.assistant_prefix == ""


def test_stage1_checkpoints_use_the_paper_zero_shot_prompt(tmp_path, llm_dir):
    lm = SpeechLM.from_checkpoint(_checkpoint(tmp_path, llm_dir, stage=1, prompt=None), llm=_llm(llm_dir))
    assert "Repeat the previous text" in lm.template.user and lm.stop_at_newline


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dim": 32, "fingerprint": "0000000000000000"}, "trained for another LLM"),
        ({"dim": 48}, None),
    ],
)
def test_incompatible_checkpoints_fail_before_the_llm_loads(tmp_path, llm_dir, monkeypatch, change, message):
    folder = _checkpoint(tmp_path, llm_dir)
    if "fingerprint" in change:
        meta_file = folder / "projector_config.json"
        meta_file.write_text(
            meta_file.read_text().replace(embedding_fingerprint(load_embedding_table(llm_dir)), change["fingerprint"])
        )
    else:
        save_projector(
            folder, speechmapper_tiny(input_dim=16, output_dim=48), {"stage": 2, "llm": {"pad_id": 4}, "prompt": PROMPT}
        )
    monkeypatch.setattr(speech_lm, "load_llm", lambda *a, **k: pytest.fail("the LLM was loaded before the check"))
    with pytest.raises(ValueError, match=message or "outputs 48-dim vectors but the LLM's embeddings are 32-dim"):
        SpeechLM.from_checkpoint(folder, llm=_llm(llm_dir))


def test_lora_checkpoint_without_its_adapters_fails_before_the_llm_loads(tmp_path, llm_dir, monkeypatch):
    folder = _checkpoint(
        tmp_path,
        llm_dir,
        lora={"rank": 2, "alpha": 4, "dropout": 0.0, "attn_modules": ["q_proj"], "apply_to_mlp": False},
    )
    monkeypatch.setattr(speech_lm, "load_llm", lambda *a, **k: pytest.fail("the LLM was loaded before the check"))
    with pytest.raises(FileNotFoundError, match="has no lora_adapters.safetensors"):
        SpeechLM.from_checkpoint(folder, llm=_llm(llm_dir))


def test_unknown_projector_names_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="smollm2_135m_whisper_base_stage2_asr_lora"):
        speech_lm.resolve_projector("no_such_projector")
    assert speech_lm.resolve_projector("smollm2_135m_whisper_base_stage1").is_dir()


def test_an_llm_cache_shares_one_frozen_llm_between_projectors(tmp_path, llm_dir):
    cache = {}
    first = SpeechLM.from_checkpoint(_checkpoint(tmp_path / "a", llm_dir), llm=_llm(llm_dir), llm_cache=cache)
    second = SpeechLM.from_checkpoint(_checkpoint(tmp_path / "b", llm_dir), llm=_llm(llm_dir), llm_cache=cache)
    assert second.llm is first.llm and second.embedding.data_ptr() == first.embedding.data_ptr()
    assert second.projector is not first.projector
    alone = SpeechLM.from_checkpoint(_checkpoint(tmp_path / "c", llm_dir), llm=_llm(llm_dir))
    assert alone.llm is not first.llm  # without a cache each model loads its own
