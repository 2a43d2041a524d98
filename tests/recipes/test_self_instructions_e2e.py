"""`speechmapper_instructions task=self` on the tiny set: the LLM's own answers from the transcripts become
stage-2 rows (with a shuffled-transcript reference for held-out rows); stage 2 trains on them with KL + MSE,
logs and records the term, and resumes exactly."""

import json
import shutil

import pytest

from speechmapper_tune.checkpoint.projector_io import read_projector_meta
from speechmapper_tune.data.generation_data import read_rows

pytestmark = pytest.mark.e2e
TINY_LLM = [
    "answer.llm.name=hf_llama",
    "answer.llm.chat_format=chatml",
    "answer.llm.pad_id=4",
    "answer.llm.dtype=fp32",
    "answer.llm.tokenizer=null",
    'answer.prompt.user="{speech} {instruction}"',
    "answer.max_new_tokens=4",
]


def metrics(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


def test_self_generated_rows_train_stage2_with_kl_and_it_resumes_exactly(tmp_path, tune, trained):
    data = tmp_path / "data"
    shutil.copytree(trained / "data", data)
    rows_dir = tmp_path / "rows"
    tune(
        [
            "run",
            "speechmapper_instructions",
            "--config",
            "instructions/self_heldout",
            f"manifest={data}/val.jsonl.gz",
            f"output_dir={rows_dir}",
            f"answer.llm.checkpoint={data}/llm",
            *TINY_LLM,
            "pool=[red blue,green,dog cat]",
            "max_items=12",
        ],
        cwd=tmp_path,
    )
    rows = read_rows(rows_dir / "instructions.jsonl")
    answers = {g["id"]: g for g in read_rows(rows_dir / "answers" / "generations.jsonl")}
    shuffled = {g["id"]: g for g in read_rows(rows_dir / "shuffled" / "generations.jsonl")}
    assert len(rows) >= 6 and all(r["instruction"] in ("red blue", "green", "dog cat") for r in rows)
    for r in rows:  # the answer is the transcript-fed generation; the shuffled one read another cut's transcript
        assert r["answer"] == answers[r["id"]]["hypothesis"] and r["shuffled_answer"] == shuffled[r["id"]]["hypothesis"]
        assert answers[r["id"]]["span_source"] == "transcript" and r["instruction"] in answers[r["id"]]["prompt"]

    common = [
        "run",
        "speechmapper_adapt",
        "--config",
        "tiny/stage2",
        "from_scratch=False",
        f"projector_checkpoint={trained}/checkpoints/step_20",
        f"prepare.out_dir={data}",
        f"llm.checkpoint={data}/llm",
        f"data.train.manifest={data}/val.jsonl.gz",
        f"data.train.instructions={rows_dir}/instructions.jsonl",
        "data.train.task=self",
        f"data.val.manifest={data}/val.jsonl.gz",
        f"data.val.instructions={rows_dir}/instructions.jsonl",
        "data.val.task=self",
        "data.val.max_items=4",
        "loss.sigma=0.5",
        "loss.kl_ratio=1.0",
        "loss.kl_temperature=2.0",
        "batch_size=2",
        "gradient_accumulation_steps=1",
        "log_every_n_steps=1",
        "val_every_n_steps=2",
        "save_every_n_steps=2",
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    tune([*common, f"output_dir={full}", "max_steps=4"], cwd=tmp_path)
    tune([*common, f"output_dir={part}", "max_steps=2"], cwd=tmp_path)
    tune([*common, f"output_dir={part}", "max_steps=4", "resume=True"], cwd=tmp_path)
    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):  # same kernels, same machine, same data order: exact, timing aside
        assert {k: v for k, v in ra.items() if k != "tokens_per_second"} == {
            k: v for k, v in rb.items() if k != "tokens_per_second"
        }, ra["step"]
    train = [r for r in a if "kl" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all(r["kl"] > 0 for r in train)
    assert any("val_kl" in r for r in a)
    meta = read_projector_meta(full / "checkpoints" / "step_4")
    assert (meta["kl_ratio"], meta["kl_temperature"], meta["sigma"]) == (1.0, 2.0, 0.5)
