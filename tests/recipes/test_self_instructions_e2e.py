"""`speechmapper_instructions task=self` on the tiny set: the LLM's own answers from the transcripts become
stage-2 rows (with a shuffled-transcript reference for held-out rows), and stage 2 trains on them with KL."""

import json
import shutil

import pytest

from speechmapper_tune.data.generation_data import read_rows

pytestmark = pytest.mark.e2e
TINY_LLM = ["answer.llm.name=hf_llama", "answer.llm.chat_format=chatml", "answer.llm.pad_id=4", "answer.llm.dtype=fp32",
            "answer.llm.tokenizer=null", 'answer.prompt.user="{speech} {instruction}"', "answer.max_new_tokens=4"]


def test_self_generated_rows_are_the_llms_answers_and_stage2_trains_on_them_with_kl(tmp_path, tune, trained):
    data = tmp_path / "data"
    shutil.copytree(trained / "data", data)
    out = tmp_path / "rows"
    args = ["run", "speechmapper_instructions", "--config", "instructions/self_heldout", f"manifest={data}/val.jsonl.gz",
            f"output_dir={out}", f"answer.llm.checkpoint={data}/llm", *TINY_LLM, "pool=[red blue,green,dog cat]", "max_items=10"]
    tune(args, cwd=tmp_path)
    rows = read_rows(out / "instructions.jsonl")
    answers = {g["id"]: g for g in read_rows(out / "answers" / "generations.jsonl")}
    shuffled = {g["id"]: g for g in read_rows(out / "shuffled" / "generations.jsonl")}
    assert rows and all(r["instruction"] in ("red blue", "green", "dog cat") for r in rows)
    for r in rows:  # the answer is the transcript-fed generation; the shuffled one read another cut's transcript
        assert r["answer"] == answers[r["id"]]["hypothesis"] and r["shuffled_answer"] == shuffled[r["id"]]["hypothesis"]
        assert answers[r["id"]]["span_source"] == "transcript" and r["instruction"] in answers[r["id"]]["prompt"]
    first = (out / "instructions.jsonl").read_text()
    tune(args, cwd=tmp_path)  # a rerun resumes: nothing left to generate, the same rows
    assert (out / "instructions.jsonl").read_text() == first

    run = tmp_path / "kl"
    tune(["run", "speechmapper_adapt", "--config", "tiny/stage2", f"output_dir={run}", "from_scratch=False",
          f"projector_checkpoint={trained}/checkpoints/step_20", f"prepare.out_dir={data}", f"llm.checkpoint={data}/llm",
          f"data.train.manifest={data}/val.jsonl.gz", f"data.train.instructions={out}/instructions.jsonl",
          "data.val=null", "loss.sigma=0.0", "loss.kl_ratio=1.0", "batch_size=2", "gradient_accumulation_steps=1",
          "max_steps=2", "log_every_n_steps=1", "save_every_n_steps=0", "val_every_n_steps=0"], cwd=tmp_path)
    logged = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "kl" in r] == [1, 2] and all(r["kl"] > 0 for r in logged if "kl" in r)
