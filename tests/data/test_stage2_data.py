import json

import pytest
import torch

from speechmapper_tune.assets import smollm2_dir
from speechmapper_tune.data.manifest import SkipCounter, load_feature_items
from speechmapper_tune.data.stage2 import (
    PromptTemplate,
    assemble_batch,
    prepare_asr_examples,
    prepare_instruction_examples,
    split_prompt,
)
from speechmapper_tune.data.synthetic import write_synthetic_split
from speechmapper_tune.losses import IGNORE_INDEX
from speechmapper_tune.models.chat_format import ChatTokenizer

TEMPLATE = PromptTemplate(
    user="Speech: {speech}\n{instruction}",
    instruction="Can you transcribe the Speech content?",
    system="You are a helpful assistant.",
    assistant_prefix="Transcript:",
)


@pytest.fixture(scope="module")
def chat():
    return ChatTokenizer.from_dir(smollm2_dir(), chat_format="smollm2", pad_token=16)


def test_split_prompt_matches_the_chat_template_around_the_span(chat):
    parts = split_prompt(chat, TEMPLATE)
    ids, start = chat.render_with_speech(TEMPLATE.messages(), 5, placeholder="<speech>")
    assert parts.prefix == ids[:start]
    assert parts.suffix == ids[start + 5 :] + chat.encode_text("Transcript:")
    assert chat.decode(parts.prefix).endswith("Speech: ")
    assert chat.decode(parts.suffix).startswith("\nCan you transcribe")


def test_assembled_labels_cover_the_response_only(chat):
    parts = split_prompt(chat, TEMPLATE)
    resp = chat.encode_text("hello world") + [chat.eos_id]
    asm = assemble_batch([parts.prefix] * 2, [parts.suffix] * 2, [resp, resp[:1] + resp[-1:]], [4, 7], 16, chat.eos_id)
    for b, n in enumerate([4, 7]):
        start = len(parts.prefix)
        assert asm.input_ids[b, start : start + n].eq(16).all()
        assert int(asm.speech_starts[b]) == start and int(asm.speech_lengths[b]) == n
        labelled = asm.labels[b][asm.labels[b] != IGNORE_INDEX].tolist()
        assert labelled == ([*resp] if b == 0 else resp[:1] + resp[-1:])
        first = start + n + len(parts.suffix)
        assert asm.labels[b, :first].eq(IGNORE_INDEX).all()
    assert torch.equal(asm.placeholder_mask, asm.input_ids == 16)


def test_too_long_items_are_skipped(tmp_path, chat):
    items = load_feature_items(write_synthetic_split(tmp_path, "x", 5, 16, seed=0))
    skipped = SkipCounter()
    ex = prepare_asr_examples(items, chat, TEMPLATE, lambda n: n // 4, max_seq_len=40, skipped=skipped)
    assert ex == [] and skipped.counts["prompt + speech + response longer than max_seq_len"] == 5


def test_template_needs_exactly_one_speech_marker():
    with pytest.raises(ValueError, match="exactly once"):
        PromptTemplate(user="no speech here").messages()


def test_non_string_prompt_field_is_a_clear_error():
    # `prompt.assistant_prefix=Answer:` on a command line parses to {"Answer": None}
    with pytest.raises(ValueError, match="prompt.assistant_prefix must be a string"):
        PromptTemplate(user="{speech}", assistant_prefix={"Answer": None})


def test_a_non_utf8_byte_in_instructions_names_the_line(tmp_path, chat):
    items = load_feature_items(write_synthetic_split(tmp_path, "x", 2, 16, seed=0))
    path = tmp_path / "instructions.jsonl"
    row = '{"features": "%s", "instruction": "Translate", "answer": "%s"}\n'
    path.write_bytes((row % (items[0].id, "ok") + row % (items[1].id, "caf\u00e9")).encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{path}, line 2: not UTF-8 text \(byte 0xe9"):
        prepare_instruction_examples(
            path, {it.id: it for it in items}, chat, TEMPLATE, lambda n: n // 4, 512, SkipCounter(), "st"
        )


def test_each_question_about_one_cut_keeps_its_row_id(tmp_path, chat):
    """Spoken-SQuAD asks several questions per paragraph: generation rows, resume and merging go by the row id."""
    from speechmapper_tune.data.stage2 import Stage2Collator, Stage2Dataset

    items = load_feature_items(write_synthetic_split(tmp_path, "x", 2, 16, seed=0))
    path = tmp_path / "instructions.jsonl"
    rows = [
        {"id": f"{items[0].id}/q{k}", "features": items[0].id, "instruction": f"Question {k}?", "answer": "yes"}
        for k in range(2)
    ] + [{"features": items[1].id, "instruction": "Question?", "answer": "no"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    skipped = SkipCounter()
    exs = prepare_instruction_examples(
        path, {it.id: it for it in items}, chat, TEMPLATE, lambda n: n // 4, 512, skipped, "sqa"
    )
    assert [e.id for e in exs] == [f"{items[0].id}/q0", f"{items[0].id}/q1", items[1].id]  # no id: the cut's
    batch = Stage2Collator(lambda n: n // 4, 16)([Stage2Dataset(exs)[i] for i in range(3)])
    assert batch["ids"] == [e.id for e in exs]


def test_written_targets_give_the_written_response_and_mse_targets(tmp_path, chat):
    from dataclasses import replace

    items = load_feature_items(write_synthetic_split(tmp_path, "x", 3, 16, seed=0))
    items = [replace(it, written=it.text.capitalize() + ".") for it in items]
    plain = prepare_asr_examples(items, chat, TEMPLATE, lambda n: n, 4096, SkipCounter())
    written = prepare_asr_examples(items, chat, TEMPLATE, lambda n: n, 4096, SkipCounter(), target_text="written")
    for it, p, w in zip(items, plain, written):
        assert p.response == chat.encode_text(it.text) + [chat.eos_id] and p.target_ids == chat.encode_text(it.text)
        assert w.response == chat.encode_text(it.written) + [chat.eos_id] and w.target_ids == chat.encode_text(
            it.written
        )
    with pytest.raises(ValueError, match="target_text='cased'"):
        prepare_asr_examples(items, chat, TEMPLATE, lambda n: n, 4096, SkipCounter(), target_text="cased")
