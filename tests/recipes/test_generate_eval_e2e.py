"""`tune run speechmapper_generate` then `speechmapper_eval` on the tiny setup."""

import json

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tune):
    out = tmp_path_factory.mktemp("s1")
    tune(["run", "speechmapper_pretrain", "--config", "tiny/stage1", f"output_dir={out}", "max_steps=20",
          "val_every_n_steps=0", "save_every_n_steps=0"], cwd=out)
    return out


def _gen(tune, trained, out, *extra):
    return tune(["run", "speechmapper_generate", "--config", "tiny/generate", f"projector_checkpoint={trained}/checkpoints/step_20",
                 f"manifest={trained}/data/val.jsonl.gz", f"llm.checkpoint={trained}/data/llm", f"output_dir={out}", *extra],
                cwd=trained)


def test_generate_resume_and_eval(tmp_path, tune, trained):
    gen = tmp_path / "gen"
    _gen(tune, trained, gen, "max_items=6")
    rows = [json.loads(l) for l in (gen / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"id", "task", "prompt", "hypothesis", "reference", "flags"} <= set(rows[0])
    assert all(r["span_vectors"] > 0 and r["reference"] for r in rows)
    # a killed run leaves a torn last line: the rerun drops it and generates what is missing
    text = (gen / "generations.jsonl").read_text().splitlines()
    (gen / "generations.jsonl").write_text("\n".join(text[:3]) + "\n" + text[3][:20])
    proc = _gen(tune, trained, gen, "max_items=8")
    assert "8 items (3 already generated)" in proc.stderr + proc.stdout
    rows = [json.loads(l) for l in (gen / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and len({r["id"] for r in rows}) == 8

    top = tmp_path / "top"
    _gen(tune, trained, top, "max_items=8", "span_source=transcript")
    top_rows = [json.loads(l) for l in (top / "generations.jsonl").read_text().splitlines()]
    assert all(r["span_source"] == "transcript" for r in top_rows)

    ev = tmp_path / "eval"
    proc = tune(["run", "speechmapper_eval", "--config", "eval/default", f"output_dir={ev}",
                 f"generations={{speechmapper: {gen}/generations.jsonl, topline: {top}/generations.jsonl}}"], cwd=tmp_path)
    res = {r["name"]: r for r in json.loads((ev / "results.json").read_text())}
    assert set(res) == {"speechmapper", "topline"} and res["speechmapper"]["n"] == 8
    assert res["speechmapper"]["stuck"] == sum("stuck" in r["flags"] for r in rows)
    assert res["speechmapper"]["wer"] >= 0 and "| speechmapper | asr | 8 |" in (ev / "results.md").read_text()


def test_eval_sqa_judge_and_st_rows(tmp_path, tune, trained):
    rows = [{"id": f"q{i}", "task": "sqa", "instruction": "red", "context": "blue", "reference": "cat", "hypothesis": "dog",
             "flags": []} for i in range(3)]
    rows += [{"id": f"t{i}", "task": "st", "target_lang": "fr", "reference": "le chat est noir", "hypothesis": h, "flags": []}
             for i, h in enumerate(["le chat est noir", "the cat is black"])]
    gen = tmp_path / "g.jsonl"
    gen.write_text("".join(json.dumps(r) + "\n" for r in rows))
    judge = (f"judge={{llm: {{name: hf_llama, checkpoint: {trained}/data/llm, chat_format: chatml, dtype: fp32}}, "
             f"batch_size: 2}}")
    tune(["run", "speechmapper_eval", "--config", "eval/default", f"output_dir={tmp_path}/ev", f"generations={{mixed: {gen}}}",
          judge], cwd=tmp_path)
    res = {r["task"]: r for r in json.loads((tmp_path / "ev" / "results.json").read_text())}
    assert res["sqa"]["n"] == 3 and "unparsed_judgements" in res["sqa"]  # a random tiny judge: verdicts parsed or counted
    fr = res["st"]["by_language"]["fr"]
    assert 0 < fr["bleu"] < 100 and "nrefs:1" in fr["bleu_signature"] and fr["target_share"] == 50.0


def test_generation_warns_when_the_prompt_differs_from_training(caplog):
    from omegaconf import OmegaConf

    from speechmapper_generate import _check_trained_prompt
    from speechmapper_tune.data.stage2 import PromptTemplate

    trained = {"system": None, "user": "{speech} {instruction}", "instruction": "red", "assistant_prefix": "Transcript:"}
    cfg = OmegaConf.create({"projector_checkpoint": "ckpt", "task": "asr", "instructions": None})
    _check_trained_prompt(trained, PromptTemplate(user="{speech} {instruction}", instruction="red", assistant_prefix="Transcript:"), cfg)
    assert "another prompt" not in caplog.text
    _check_trained_prompt(trained, PromptTemplate(user="{speech} {instruction}", instruction="red"), cfg)
    assert "prompt.assistant_prefix='Transcript:' in training, '' here" in caplog.text
