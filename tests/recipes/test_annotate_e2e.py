"""`tune run speechmapper_annotate` on the tiny LLM: stage-2 instruction rows, resumable, bad items counted."""

import importlib
import json

import numpy as np
import pytest
import soundfile as sf
from documented_variants import fixture_config

from speechmapper_tune.data.manifest import SkipCounter
from speechmapper_tune.data.stage2 import PromptTemplate, prepare_instruction_examples

pytestmark = pytest.mark.e2e
annotate = importlib.import_module("speechmapper_annotate")


def test_labels_from_replies():
    lab = annotate.label_from_reply
    assert lab("sa", " Positive.", "i love it") == ("Positive", "")
    assert lab("sa", "I think it's negative", "x") == ("Negative", "")
    assert lab("sa", "maybe", "x")[0] is None and lab("sa", "  ", "x") == (None, "empty reply")
    text = "Mr Smith flew to Paris on Monday"
    # a hallucinated phrase (London) and a tag outside SLUE's set are dropped; chatter after the list ignored
    assert lab("ner", "PERSON: Smith; PLACE: London; WHEN: monday; FOOD: paris\n\nThese are the entities.", text) == (
        "PERSON: Smith; WHEN: monday",
        "2 entities dropped",
    )
    assert lab("ner", "none", text) == ("none", "") and lab("ner", "None.", text) == ("none", "")
    assert lab("ner", "I cannot do that", text)[0] is None
    assert lab("ner", "PLACE: Rome", text) == (
        None,
        "no entity of the reply has a SLUE tag and a phrase of the transcript",
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from speechmapper_tune.data.synthetic import WORDS
    from speechmapper_tune.models.tiny_llm import write_tiny_llm

    root = tmp_path_factory.mktemp("annotate")
    # Positive/Negative/Neutral in the vocabulary so the random tiny LLM can name a class (seed 4 names one for
    # half of the items and not for the others: both paths run)
    llm = write_tiny_llm(root / "llm", list(WORDS) + ["Positive", "Negative", "Neutral"], dim=32, seed=4)
    texts = ["red cat runs", "blue dog sleeps", "the small bird sings", "quick fish eats", "", "red dog eats"]
    rows = []
    for i, t in enumerate(texts):
        sf.write(root / f"u{i}.wav", np.zeros(1600, dtype="float32"), 16000)
        rows.append({"id": f"u{i}", "audio": f"u{i}.wav", "text": t})
    manifest = root / "dev.jsonl"  # the corpus builder's JSON-lines form
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, llm, manifest


def _run(tune, root, llm, manifest, out, *extra, check=True):
    return tune(
        [
            "run",
            "speechmapper_annotate",
            "--config",
            fixture_config("tiny/annotate_sa"),
            f"manifest={manifest}",
            f"llm.checkpoint={llm}",
            f"output_dir={out}",
            *extra,
        ],
        cwd=root,
        check=check,
    )


def _rows(path):
    return [json.loads(l) for l in path.read_text().splitlines()] if path.is_file() else []


def test_annotate_resume_and_stage2_reads_the_rows(tmp_path, tune, setup):
    root, llm, manifest = setup
    out = tmp_path / "ann"
    _run(tune, root, llm, manifest, out)
    labels, skipped = _rows(out / "labels.jsonl"), _rows(out / "not_annotated.jsonl")
    summary = json.loads((out / "annotate_summary.json").read_text())
    # every item is either labelled or skipped with its reason, and the summary counts both
    assert sorted(r["id"] for r in labels + skipped) == [f"u{i}" for i in range(6)]
    assert {"id": "u4", "reason": "empty transcript"} in skipped
    assert summary["labelled"] == len(labels) and summary["skipped"] == len(skipped) == 6 - len(labels)
    assert labels, "the tiny LLM named no class: the rows below would go untested"
    assert any(r["reason"].startswith("the reply names no sentiment") and r["raw"] for r in skipped)
    for r in labels:
        assert r["answer"] in ("Negative", "Neutral", "Positive") and r["features"] == r["id"] and r["task"] == "sa"
        assert r["instruction"] == "sentiment" and r["transcript"]
    # stage 2 reads them as instruction data
    from speechmapper_tune.data.manifest import FeatureItem
    from speechmapper_tune.models.chat_format import ChatTokenizer

    chat = ChatTokenizer.from_dir(llm, chat_format="chatml", pad_token="<|pad|>")
    items = {r["id"]: FeatureItem(r["id"], r["transcript"], 40, 16, "numpy_files", "", "") for r in labels}
    exs = prepare_instruction_examples(
        out / "labels.jsonl",
        items,
        chat,
        PromptTemplate(user="{speech} {instruction}"),
        lambda n: n // 2,
        512,
        SkipCounter(),
        task="sa",
    )
    assert [e.item.id for e in exs] == [r["id"] for r in labels] and all(e.target_ids for e in exs)

    # a killed run leaves a torn last line: the rerun drops it and labels only what is missing
    first = (out / "labels.jsonl").read_text().splitlines()
    (out / "labels.jsonl").write_text("\n".join(first[:-1]) + "\n" + first[-1][:15])
    proc = _run(tune, root, llm, manifest, out)
    assert "6 items (" in proc.stderr + proc.stdout
    assert _rows(out / "labels.jsonl") == labels and _rows(out / "not_annotated.jsonl") == skipped

    # other settings refuse the old rows unless overwrite=True
    proc = _run(tune, root, llm, manifest, out, "task=ner", check=False)
    assert proc.returncode != 0 and "task: 'sa' -> 'ner'" in proc.stderr + proc.stdout
    _run(tune, root, llm, manifest, out, "task=ner", "overwrite=True", "max_new_tokens=6")
    assert json.loads((out / "annotate_summary.json").read_text())["task"] == "ner"


def test_unknown_setting_and_bad_task(tmp_path, tune_in_process, setup):
    root, llm, manifest = setup
    tune = lambda args, cwd, check: tune_in_process(args, cwd)  # noqa: E731  (refused at the settings)
    proc = _run(tune, root, llm, manifest, tmp_path / "o", "max_new_token=3", check=False)
    assert proc.returncode != 0 and "did you mean 'max_new_tokens'" in proc.stderr + proc.stdout
    proc = _run(tune, root, llm, manifest, tmp_path / "o", "task=qa", check=False)
    assert proc.returncode != 0 and "task='qa': expected one of ('sa', 'ner')" in proc.stderr + proc.stdout


def test_slue_gold_labels_become_the_same_rows(tmp_path, tune):
    """labels=manifest: a SLUE folder's own labels, no LLM (llm.checkpoint is never read)."""
    import csv

    root = tmp_path / "slue-voxceleb"
    (root / "dev_raw").mkdir(parents=True)
    rows = [
        ["a1", "i loved it", "s1", "dev", "0.0", "0.5", "Positive"],
        ["a2", "", "s1", "dev", "0.0", "0.5", "Neutral"],
        ["a3", "it was bad", "s2", "dev", "0.0", "0.5", "Negative"],
    ]
    with open(root / "slue-voxceleb_dev.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["id", "normalized_text", "speaker_id", "split", "start_second", "end_second", "sentiment"])
        w.writerows(rows)
    for r in rows:
        sf.write(root / "dev_raw" / f"{r[0]}.flac", np.zeros(16000, dtype="float32"), 16000)
    out = tmp_path / "gold"
    _run(tune, tmp_path, tmp_path / "no-llm-here", root, out, "labels=manifest", "instruction=What is the sentiment?")
    labels = _rows(out / "labels.jsonl")
    assert [(r["id"], r["answer"], r["annotator"]) for r in labels] == [
        ("a1", "Positive", "manifest"),
        ("a3", "Negative", "manifest"),
    ]
    assert _rows(out / "not_annotated.jsonl") == [{"id": "a2", "reason": "empty transcript"}]
    assert labels[0]["instruction"] == "What is the sentiment?" and labels[0]["transcript"] == "i loved it"
