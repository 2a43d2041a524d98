"""`tune run speechmapper_generate` then `speechmapper_eval` on the tiny setup."""

import json
import shutil

import pytest
from documented_variants import fixture_config

pytestmark = pytest.mark.e2e


def _gen(tune, trained, out, *extra, check=True):
    return tune(
        [
            "run",
            "speechmapper_generate",
            "--config",
            fixture_config("tiny/generate"),
            f"projector_checkpoint={trained}/checkpoints/step_20",
            f"manifest={trained}/data/val.jsonl.gz",
            f"llm.checkpoint={trained}/data/llm",
            f"output_dir={out}",
            *extra,
        ],
        cwd=trained,
        check=check,
    )


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

    # `runs`: both systems in one process (one LLM load), row for row what the two processes wrote
    runs = f"runs=[{{output_dir: {tmp_path}/both/projector}}, {{output_dir: {tmp_path}/both/transcript, span_source: transcript}}]"
    proc = tune(
        [
            "run",
            "speechmapper_generate",
            "--config",
            fixture_config("tiny/generate"),
            f"projector_checkpoint={trained}/checkpoints/step_20",
            f"manifest={trained}/data/val.jsonl.gz",
            f"llm.checkpoint={trained}/data/llm",
            "max_items=8",
            runs,
        ],
        cwd=trained,
    )
    assert "Run 2 of 2" in proc.stderr + proc.stdout
    for name, alone in (("projector", rows), ("transcript", top_rows)):
        together = [json.loads(l) for l in (tmp_path / "both" / name / "generations.jsonl").read_text().splitlines()]
        key = lambda r: (r["id"], r["hypothesis"], r["span_source"])
        assert sorted(map(key, together)) == sorted(map(key, alone))

    ev = tmp_path / "eval"
    proc = tune(
        [
            "run",
            "speechmapper_eval",
            "--config",
            "eval/default",
            f"output_dir={ev}",
            f"generations={{speechmapper: {gen}/generations.jsonl, topline: {top}/generations.jsonl}}",
        ],
        cwd=tmp_path,
    )
    res = {r["name"]: r for r in json.loads((ev / "results.json").read_text())}
    assert set(res) == {"speechmapper", "topline"} and res["speechmapper"]["n"] == 8
    assert res["speechmapper"]["stuck"] == sum("stuck" in r["flags"] for r in rows)
    assert res["speechmapper"]["wer"] >= 0 and "| speechmapper | asr | 8 |" in (ev / "results.md").read_text()


def test_eval_sqa_judge_and_st_rows(tmp_path, tune, trained):
    rows = [
        {
            "id": f"q{i}",
            "task": "sqa",
            "instruction": "red",
            "context": "blue",
            "reference": "cat",
            "hypothesis": "dog",
            "flags": [],
        }
        for i in range(3)
    ]
    rows += [
        {
            "id": f"t{i}",
            "task": "st",
            "target_lang": "fr",
            "reference": "le chat est noir",
            "hypothesis": h,
            "flags": [],
        }
        for i, h in enumerate(["le chat est noir", "the cat is black"])
    ]
    gen = tmp_path / "g.jsonl"
    gen.write_text("".join(json.dumps(r) + "\n" for r in rows))
    judge = (
        f"judge={{llm: {{name: hf_llama, checkpoint: {trained}/data/llm, chat_format: chatml, dtype: fp32}}, "
        f"batch_size: 2}}"
    )
    tune(
        [
            "run",
            "speechmapper_eval",
            "--config",
            "eval/default",
            f"output_dir={tmp_path}/ev",
            f"generations={{mixed: {gen}}}",
            judge,
        ],
        cwd=tmp_path,
    )
    res = {r["task"]: r for r in json.loads((tmp_path / "ev" / "results.json").read_text())}
    assert (
        res["sqa"]["n"] == 3 and "unparsed_judgements" in res["sqa"]
    )  # a random tiny judge: verdicts parsed or counted
    fr = res["st"]["by_language"]["fr"]
    assert 0 < fr["bleu"] < 100 and "nrefs:1" in fr["bleu_signature"] and fr["target_share"] == 50.0


def test_generation_warns_when_the_prompt_differs_from_training(caplog):
    from omegaconf import OmegaConf
    from speechmapper_generate import _check_trained_prompt

    from speechmapper_tune.data.stage2 import PromptTemplate

    trained = {
        "system": None,
        "user": "{speech} {instruction}",
        "instruction": "red",
        "assistant_prefix": "Transcript:",
    }
    cfg = OmegaConf.create({"projector_checkpoint": "ckpt", "task": "asr", "instructions": None})
    _check_trained_prompt(
        trained, PromptTemplate(user="{speech} {instruction}", instruction="red", assistant_prefix="Transcript:"), cfg
    )
    assert "another prompt" not in caplog.text
    _check_trained_prompt(trained, PromptTemplate(user="{speech} {instruction}", instruction="red"), cfg)
    assert "prompt.assistant_prefix='Transcript:' in training, '' here" in caplog.text


def _rows(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_a_rerun_with_another_checkpoint_or_decoding_refuses_the_old_rows(tmp_path, tune, trained):
    from safetensors.torch import load_file, save_file

    gen = tmp_path / "gen"
    _gen(tune, trained, gen, "max_items=4")
    settings = json.loads((gen / "generation_settings.json").read_text())
    assert settings["projector"]["weights_sha256"] and settings["decoding"]["max_new_tokens"] == 12
    other = tmp_path / "other"
    shutil.copytree(trained / "checkpoints" / "step_20", other)
    weights = load_file(other / "projector.safetensors")
    save_file({k: v + 0.01 for k, v in weights.items()}, other / "projector.safetensors")
    proc = tune(
        [
            "run",
            "speechmapper_generate",
            "--config",
            fixture_config("tiny/generate"),
            f"projector_checkpoint={other}",
            f"manifest={trained}/data/val.jsonl.gz",
            f"llm.checkpoint={trained}/data/llm",
            f"output_dir={gen}",
            "max_items=4",
        ],
        cwd=trained,
        check=False,
    )
    assert proc.returncode != 0 and "was made with other settings (projector.weights_sha256" in proc.stderr
    proc = _gen(tune, trained, gen, "max_items=4", "max_new_tokens=5", check=False)
    assert proc.returncode != 0 and "decoding.max_new_tokens: 12 -> 5" in proc.stderr
    _gen(tune, trained, gen, "max_items=4", "max_new_tokens=5", "overwrite=True")
    assert len(_rows(gen / "generations.jsonl")) == 4
    assert json.loads((gen / "generation_settings.json").read_text())["decoding"]["max_new_tokens"] == 5


def test_items_without_transcript_are_generated_and_every_dropped_item_is_listed(tmp_path, tune, trained):
    from lhotse import CutSet
    from lhotse.utils import fastcopy

    cuts = list(CutSet.from_file(trained / "data" / "val.jsonl.gz"))[:6]
    edited = [
        fastcopy(cuts[0], supervisions=[fastcopy(s, text="") for s in cuts[0].supervisions]),  # a user's own audio
        # a transcript far longer than the projector output: a training-only rule, generated all the same
        fastcopy(cuts[1], supervisions=[fastcopy(s, text=(s.text + " ") * 12) for s in cuts[1].supervisions]),
        fastcopy(cuts[2], features=fastcopy(cuts[2].features, storage_path=str(tmp_path / "gone.safetensors"))),
        *cuts[3:],
    ]
    manifest = tmp_path / "edited.jsonl.gz"
    CutSet.from_cuts(edited).to_file(manifest)
    gen = tmp_path / "gen"
    _gen(tune, trained, gen, f"manifest={manifest}", "max_new_tokens=4")
    rows = {r["id"]: r for r in _rows(gen / "generations.jsonl")}
    assert set(rows) == {c.id for c in edited} - {cuts[2].id}
    assert rows[cuts[0].id]["reference"] is None and rows[cuts[1].id]["reference"]
    assert _rows(gen / "not_generated.jsonl") == [{"id": cuts[2].id, "reason": "feature file missing"}]
    ev = tmp_path / "eval"
    tune(
        [
            "run",
            "speechmapper_eval",
            "--config",
            "eval/default",
            f"output_dir={ev}",
            f"generations={{mine: {gen}/generations.jsonl}}",
        ],
        cwd=tmp_path,
    )
    res = json.loads((ev / "results.json").read_text())[0]
    assert res["n"] == 4 and res["no_reference"] == 1 and res["not_generated"] == 1
    assert res["not_generated_reasons"] == {"feature file missing": 1} and res["settings"]["span_source"] == "projector"
    assert "| mine | asr | 4 |" in (ev / "results.md").read_text()


def test_generate_on_an_audio_manifest_without_transcripts(tmp_path, tune):
    """A user's own recordings: features made on the fly with the encoder the shipped checkpoint records."""
    import glob

    files = sorted(glob.glob("/usr/share/pocketsphinx/test/data/librivox/*.wav"))[:2]
    if len(files) != 2:
        pytest.fail("real speech not found: apt-get install -y pocketsphinx-testdata")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    rows = [{"id": f"utt{i}", "audio": f} for i, f in enumerate(files)] + [
        {"id": "bad", "audio": str(tmp_path / "corrupt.wav")}
    ]
    manifest = tmp_path / "mine.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    gen = tmp_path / "gen"
    tune(
        [
            "run",
            "speechmapper_generate",
            "--config",
            "smollm2_135M/generate",
            f"manifest={manifest}",
            "projector_checkpoint=smollm2_135m_whisper_base_stage2_asr",
            'prompt.assistant_prefix="Transcript:"',
            f"output_dir={gen}",
            "max_new_tokens=40",
            "stop_at_newline=True",
        ],
        cwd=tmp_path,
    )
    out = {r["id"]: r for r in _rows(gen / "generations.jsonl")}
    assert set(out) == {"utt0", "utt1"} and all(
        r["reference"] is None and len(r["hypothesis"].split()) >= 3 for r in out.values()
    )
    missing = _rows(gen / "not_generated.jsonl")
    assert [m["id"] for m in missing] == ["bad"] and "corrupt.wav" in missing[0]["reason"]
    assert list((gen / "features").glob("whisper_base_trimmed_avg2-*/cuts.jsonl.gz"))
