"""Behaviour alignment on the tiny LLM: the transcript-fed teacher against the speech-fed student.

``SpeechLM.forward(batch, teacher=True)`` runs the same frozen LLM on ``prefix | transcript tokens |
suffix | response`` and ``Stage2Loss(kl_ratio>0)`` takes the KL over the response positions. Checked
here: exactly 0 when the projector emits the transcript's embeddings; the value against logits computed
independently (torchtune's token-id forward for the teacher, one unbatched student) and the KL summed by
hand in float64; a batch equals its items one by one (token-weighted, as CE); items without a
transcript have no teacher rows.
"""

from __future__ import annotations

import pytest
import torch
from tolerances import FP32_SHALLOW, assert_close_to_scale
from torch import nn

from speechmapper_tune.checkpoint.embedding_table import load_embedding_table
from speechmapper_tune.checkpoint.projector_io import embedding_fingerprint, save_projector
from speechmapper_tune.data.manifest import FeatureItem
from speechmapper_tune.data.stage2 import Stage2Collator, Stage2Example, split_prompt
from speechmapper_tune.losses import Stage2Loss, behaviour_kl
from speechmapper_tune.models.llms import forward_embeds
from speechmapper_tune.models.projector import speechmapper_tiny
from speechmapper_tune.models.speech_lm import SpeechLM
from speechmapper_tune.models.tiny_llm import write_tiny_llm

WORDS = "a cat sat on the mat and dog ran far away red".split()
PROMPT = {"user": "{speech} {instruction}", "instruction": "red", "assistant_prefix": ""}
ITEMS = [
    ("cat sat on the mat", "a dog ran"),
    ("dog", "far away and a cat"),
    ("the red mat", "sat"),
]  # (transcript, response)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    llm_dir = write_tiny_llm(tmp_path_factory.mktemp("tiny_llm"), WORDS, dim=32)
    table = load_embedding_table(llm_dir)
    meta_llm = {
        "name": "hf_llama",
        "chat_format": "chatml",
        "pad_id": 4,
        "dim": 32,
        "fingerprint": embedding_fingerprint(table),
    }
    folder = tmp_path_factory.mktemp("ckpt") / "p"
    torch.manual_seed(0)
    save_projector(
        folder, speechmapper_tiny(input_dim=16, output_dim=32), {"stage": 2, "llm": meta_llm, "prompt": PROMPT}
    )
    llm = {"name": "hf_llama", "checkpoint": str(llm_dir), "chat_format": "chatml", "pad_id": 4, "dtype": "fp32"}
    return SpeechLM.from_checkpoint(folder, llm=llm)


def _batch(lm, items, frames=(40, 23, 31), has_transcript=(True, True, True)):
    parts = split_prompt(lm.chat, lm.template)
    samples = []
    torch.manual_seed(1)
    for i, ((text, answer), n, has) in enumerate(zip(items, frames, has_transcript)):
        item = FeatureItem(f"u{i}", text, n, 16, "none", "", "", duration=n / 25)
        targets = lm.chat.encode_text(text) if has else []
        ex = Stage2Example(
            item, parts, lm.chat.encode_text(answer) + [lm.chat.eos_id], targets, lm.projector.output_length(n)
        )
        samples.append({"id": item.id, "features": torch.randn(n, 16), "example": ex})
    return Stage2Collator(lm.projector.output_length, lm.pad_id)(samples)


class TranscriptProjector(nn.Module):
    """Emits exactly the LLM's embeddings of each item's transcript tokens (no pad vectors)."""

    def __init__(self, table, target_ids, num_words):
        super().__init__()
        self.table, self.ids, self.words = table, target_ids, num_words

    def forward(self, features, lengths):
        T = int(self.words.max())
        return self.table[self.ids[:, :T].clamp_min(0)], self.words.clone()


def _kl(lm, batch, loss, projector=None):
    with torch.no_grad():
        out = lm(batch, projector=projector, teacher=True)
    assert out["teacher_logits"].shape[0] == int(out["teacher_rows"].sum())
    return behaviour_kl(out["teacher_logits"], out["logits"][out["teacher_rows"]], loss.kl_temperature), out


def test_kl_is_exactly_zero_when_the_projector_emits_the_transcript_embeddings(lm):
    batch = _batch(lm, ITEMS)
    exact = TranscriptProjector(lm.llm.tok_embeddings.weight.detach(), batch["target_ids"], batch["num_words"])
    kl, out = _kl(lm, batch, Stage2Loss(sigma=0.0, kl_ratio=1.0, kl_temperature=2.0), exact)
    assert kl.item() == 0.0
    assert torch.equal(out["teacher_logits"], out["logits"])  # the same input, so the same logits, bit for bit
    random_kl, _ = _kl(lm, batch, Stage2Loss(kl_ratio=1.0))  # the random tiny projector: far from the teacher
    assert random_kl.item() > 1e-3


def _hand_logits(lm, prefix, span_embeds, suffix, response):
    """Full-sequence logits for one item, unbatched; rows that predict the response tokens."""
    emb = lm.llm.tok_embeddings
    x = torch.cat([emb(torch.tensor(prefix)), span_embeds, emb(torch.tensor(suffix)), emb(torch.tensor(response))])
    start = len(prefix) + span_embeds.shape[0] + len(suffix) - 1  # predicts response[0]
    return x, slice(start, start + len(response))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_matches_logits_computed_apart_and_summed_by_hand(lm, temperature):
    batch = _batch(lm, ITEMS)
    loss = Stage2Loss(sigma=0.0, kl_ratio=1.0, kl_temperature=temperature)
    with torch.no_grad():
        out = lm(batch, teacher=True)
        pred, _, span = lm.project(batch["features"], batch["lengths"])
        terms = []
        for b in range(len(ITEMS)):
            prefix, suffix, response = batch["prefix"][b], batch["suffix"][b], batch["response"][b]
            words = batch["target_ids"][b, : int(batch["num_words"][b])].tolist()
            tokens = torch.tensor([prefix + words + suffix + response])
            teacher = lm.llm(tokens)[0]  # torchtune's own token-id forward: the teacher, another code path
            t_rows = slice(
                len(prefix) + len(words) + len(suffix) - 1, len(prefix) + len(words) + len(suffix) - 1 + len(response)
            )
            x, s_rows = _hand_logits(lm, prefix, pred[b, : int(span[b])], suffix, response)
            student = forward_embeds(lm.llm, x[None])[0]
            for t_row, s_row in zip(teacher[t_rows].double(), student[s_rows].double()):  # sum_v p (log p - log q)
                p, q = torch.softmax(t_row / temperature, -1), torch.softmax(s_row / temperature, -1)
                terms.append(temperature**2 * float((p * (p.log() - q.log())).sum()))
        expected = torch.tensor(sum(terms) / len(terms))
        got = loss(
            out["logits"],
            out["labels"],
            out["pred"],
            out["pred"].detach(),
            out["out_lengths"],
            batch["num_words"],
            batch["has_mse"],
            batch["target_ids"],
            out["teacher_logits"],
            out["teacher_rows"],
        )
    assert len(terms) == len(out["labels"])  # every response position, the end-of-turn token's included
    assert expected.item() > 1e-3
    assert_close_to_scale(got["kl"], expected, FP32_SHALLOW)
    assert_close_to_scale(got["objective"], expected, FP32_SHALLOW)  # sigma 0, kl_ratio 1: KL alone


def test_a_batch_equals_its_items_one_by_one(lm):
    loss = Stage2Loss(kl_ratio=1.0, kl_temperature=2.0)
    batch = _batch(lm, ITEMS)
    kl, out = _kl(lm, batch, loss)
    parts, counts = [], []
    for i, frames in enumerate((40, 23, 31)):
        one = _batch(lm, [ITEMS[i]], frames=(frames,))
        one["features"] = batch["features"][i : i + 1, :frames]  # the same features as in the batch
        k, o = _kl(lm, one, loss)
        parts.append(k)
        counts.append(o["logits"].shape[0])
    expected = sum(k * n for k, n in zip(parts, counts)) / sum(counts)  # a token mean, as CE
    assert_close_to_scale(kl, expected, FP32_SHALLOW)


def test_items_without_a_transcript_have_no_teacher_rows(lm):
    batch = _batch(lm, ITEMS, has_transcript=(True, False, True))
    loss = Stage2Loss(kl_ratio=1.0)
    kl, out = _kl(lm, batch, loss)
    per_item = [len(r) for r in batch["response"]]
    assert out["teacher_rows"].tolist() == [True] * per_item[0] + [False] * per_item[1] + [True] * per_item[2]
    none = _batch(lm, ITEMS, has_transcript=(False, False, False))
    kl0, out0 = _kl(lm, none, loss)
    assert out0["teacher_logits"].shape[0] == 0 and kl0.item() == 0.0


def test_the_teacher_is_the_llm_without_its_lora_adapters(lm, tmp_path):
    """With LoRA on the LLM (trained with the projector), the teacher is the LLM as pretrained."""
    batch = _batch(lm, ITEMS)
    with torch.no_grad():
        plain = lm.teacher_logits(batch)
    folder = lm.checkpoint
    lora_lm = SpeechLM.from_checkpoint(
        folder,
        llm={**lm.llm_meta, "checkpoint": lm.llm_meta["checkpoint"], "dtype": "fp32"},
        lora={"rank": 2, "alpha": 4.0, "dropout": 0.0, "attn_modules": ["q_proj", "v_proj"]},
    )
    with torch.no_grad():
        for _name, p in lora_lm.llm.named_parameters():
            if p.requires_grad:  # adapters away from their identity init: the LLM with them is another model
                p.copy_(torch.randn_like(p))
        with_adapters = lora_lm(batch, teacher=True)
    assert_close_to_scale(with_adapters["teacher_logits"], plain, FP32_SHALLOW)
    assert with_adapters["logits"].shape == plain.shape
    assert any(p.requires_grad for p in lora_lm.llm.parameters())  # the adapters are back on after the teacher
