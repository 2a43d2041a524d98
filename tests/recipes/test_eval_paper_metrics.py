"""speechmapper_eval as the papers report: COMET from a local folder, several LLM judges averaged,
target-language shares, SLUE NER / sentiment F1."""

import importlib
import json
import sys
import types

import numpy as np
import pytest
import soundfile as sf
from omegaconf import OmegaConf

from speechmapper_tune.metrics import ner_scores, parse_entities, sentiment_scores

ev = importlib.import_module("speechmapper_eval")


def _write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ST_ROWS = [
    {
        "id": f"t{i}",
        "task": "st",
        "target_lang": "fr",
        "reference": "le chat est noir",
        "hypothesis": h,
        "flags": [],
        **({"transcript": "the cat is black"} if i < 2 else {}),
    }
    for i, h in enumerate(["le chat est noir", "the cat is black", "le chien est noir"])
]


def _recipe(tmp_path, gens, **extra):
    cfg = OmegaConf.create({"output_dir": str(tmp_path / "ev"), "generations": gens, **extra})
    recipe = ev.EvalRecipe(cfg)
    recipe.setup()
    return recipe


def _comet_folder(root):
    """The layout of a downloaded COMET model: hparams.yaml + checkpoints/model.ckpt."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "model.ckpt").write_bytes(b"")
    (root / "hparams.yaml").write_text("pretrained_model: xlm-roberta-large\n")
    return root


def test_comet_asked_for_but_unusable_stops_before_scoring(tmp_path, monkeypatch):
    gen = _write_rows(tmp_path / "g.jsonl", ST_ROWS)
    absent = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=f"comet.model_dir={absent}: no such file or folder"):
        _recipe(tmp_path, {"st": str(gen)}, comet={"model_dir": str(absent)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError, match="comet.model_dir=.*empty: not a COMET checkpoint .*model.ckpt is missing"
    ):
        _recipe(tmp_path, {"st": str(gen)}, comet={"model_dir": str(tmp_path / "empty")})
    monkeypatch.setitem(sys.modules, "comet", None)  # unbabel-comet not installed
    folder = _comet_folder(tmp_path / "wmt22-comet-da")
    with pytest.raises(ImportError, match=f"comet.model_dir={folder}: the `comet` module is not importable"):
        _recipe(tmp_path, {"st": str(gen)}, comet={"model_dir": str(folder)})
    assert not (tmp_path / "ev").exists()  # nothing was scored or written


def test_comet_error_through_tune_run(tmp_path, tune):
    gen = _write_rows(tmp_path / "g.jsonl", ST_ROWS)
    proc = tune(
        [
            "run",
            "speechmapper_eval",
            "--config",
            "eval/default",
            f"output_dir={tmp_path}/ev",
            f"generations={{st: {gen}}}",
            f"comet.model_dir={tmp_path}/absent",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0 and f"comet.model_dir={tmp_path}/absent" in proc.stderr + proc.stdout
    assert not (tmp_path / "ev" / "results.json").exists()


def test_st_rows_get_comet_and_language_shares(tmp_path, monkeypatch):
    seen = {}

    class FakeCometModel:  # the unbabel-comet package cannot be installed beside this torch/numpy
        def predict(self, data, batch_size, gpus, progress_bar):
            seen.update(data=data, batch_size=batch_size)
            return types.SimpleNamespace(scores=[0.9 if d["mt"] == d["ref"] else 0.3 for d in data])

    fake = types.ModuleType("comet")
    fake.load_from_checkpoint = lambda path: seen.setdefault("path", path) and FakeCometModel()
    monkeypatch.setitem(sys.modules, "comet", fake)
    folder = _comet_folder(tmp_path / "wmt22-comet-da")
    gen = _write_rows(tmp_path / "g.jsonl", ST_ROWS)
    recipe = _recipe(tmp_path, {"st": str(gen)}, comet={"model_dir": str(folder), "batch_size": 4})
    recipe.run()
    (res,) = json.loads((tmp_path / "ev" / "results.json").read_text())
    fr = res["by_language"]["fr"]
    assert seen["path"] == str(folder / "checkpoints" / "model.ckpt") and seen["batch_size"] == 4
    # the third row has no transcript: COMET's source is the reference transcription (paper), so it is counted, not scored
    assert [d["src"] for d in seen["data"]] == ["the cat is black"] * 2
    assert fr["comet"] == pytest.approx((90 + 30) / 2) and fr["comet_n"] == 2 and fr["comet_no_source"] == 1

    # comet.sources: the test set's manifest gives every row its transcript as written
    sf.write(tmp_path / "t2.wav", np.zeros(1600, dtype="float32"), 16000)
    manifest = _write_rows(tmp_path / "m.jsonl", [{"id": "t2", "audio": "t2.wav", "text": "The dog is black."}])
    recipe = _recipe(tmp_path, {"st": str(gen)}, comet={"model_dir": str(folder), "sources": str(manifest)})
    recipe.run()
    fr = json.loads((tmp_path / "ev" / "results.json").read_text())[0]["by_language"]["fr"]
    assert [d["src"] for d in seen["data"]] == ["the cat is black"] * 2 + ["The dog is black."]
    assert fr["comet_n"] == 3 and fr["comet_no_source"] == 0 and fr["comet"] == pytest.approx((90 + 30 + 30) / 3)
    # target-language adherence (paper table 9): 2 of 3 outputs are French, 1 English
    assert fr["target_share"] == pytest.approx(200 / 3) and fr["english_share"] == pytest.approx(100 / 3)
    assert "| st | st | 3 |" in (tmp_path / "ev" / "results.md").read_text()


@pytest.fixture(scope="module")
def judges(tmp_path_factory):
    from speechmapper_tune.models.tiny_llm import write_tiny_llm

    root = tmp_path_factory.mktemp("judges")
    # Yes/No in the vocabulary so that a random tiny judge can answer; seeds 1 and 2 answer differently
    return [write_tiny_llm(root / f"j{s}", ["Yes", "No", "cat", "dog", "red", "blue"], dim=32, seed=s) for s in (1, 2)]


def _judge(path, **extra):
    return {
        "llm": {"name": "hf_llama", "checkpoint": str(path), "chat_format": "chatml", "dtype": "fp32"},
        "batch_size": 2,
        **extra,
    }


SQA_ROWS = [
    {
        "id": f"q{i}",
        "task": "sqa",
        "instruction": "red",
        "context": "blue",
        "reference": r,
        "hypothesis": h,
        "flags": [],
    }
    for i, (r, h) in enumerate([("cat", "dog"), ("cat", "cat"), ("red cat", "a red cat")])
]


def test_several_judges_each_reported_and_averaged(tmp_path, judges):
    gen = _write_rows(tmp_path / "g.jsonl", SQA_ROWS + [{**SQA_ROWS[0], "id": "noref", "reference": None}])
    other = _write_rows(tmp_path / "h.jsonl", SQA_ROWS[:2])
    recipe = _recipe(
        tmp_path, {"a": str(gen), "b": str(other)}, judges=[_judge(judges[0], name="tiny1"), _judge(judges[1])]
    )
    recipe.run()
    res = {r["name"]: r for r in json.loads((tmp_path / "ev" / "results.json").read_text())}
    # the same judges run on their own, item by item, give the verdicts the recipe averaged
    expected = {}
    for name, path in (("tiny1", judges[0]), ("hf_llama", judges[1])):
        verdicts = ev._Judge({**_judge(path), "where": name})(SQA_ROWS)
        assert any(v is not None for v in verdicts), f"judge {name} parsed nothing: the test would prove nothing"
        expected[name] = verdicts
    for set_name, n in (("a", 3), ("b", 2)):
        per = res[set_name]["judges"]
        assert set(per) == {"tiny1", "hf_llama"} and res[set_name]["n"] == n
        accs = []
        for name, verdicts in expected.items():
            ok = [v for v in verdicts[:n] if v is not None]
            assert per[name]["accuracy"] == pytest.approx(100 * sum(ok) / len(ok))
            assert per[name]["unparsed_judgements"] == verdicts[:n].count(None)
            accs.append(per[name]["accuracy"])
        assert res[set_name]["accuracy"] == pytest.approx(sum(accs) / 2)
    assert res["a"]["no_reference"] == 1


def test_single_judge_key_still_works(tmp_path, judges):
    gen = _write_rows(tmp_path / "g.jsonl", SQA_ROWS)
    old = _recipe(tmp_path / "old", {"a": str(gen)}, judge=_judge(judges[0]))
    new = _recipe(tmp_path / "new", {"a": str(gen)}, judges=[_judge(judges[0])])
    for r in (old, new):
        r.run()
    old_res, new_res = (json.loads((tmp_path / d / "ev" / "results.json").read_text())[0] for d in ("old", "new"))
    assert old_res["accuracy"] == new_res["accuracy"] and list(old_res["judges"]) == ["hf_llama"]
    with pytest.raises(ValueError, match="judges .* or judge .*, not both"):
        _recipe(tmp_path, {"a": str(gen)}, judge=_judge(judges[0]), judges=[_judge(judges[0])])
    with pytest.raises(ValueError, match=r"judges\[0\].*unknown setting 'llm.chat_fromat'"):
        _recipe(tmp_path, {"a": str(gen)}, judges=[{"llm": {"name": "x", "checkpoint": "y", "chat_fromat": "chatml"}}])


def test_ner_and_sa_rows_through_tune_run(tmp_path, tune, judges):
    ner = [
        ("PLACE: brussels; WHEN: monday", "place: Brussels; WHEN: today"),
        ("PERSON: john smith", "PERSON: john smith; ORG: the commission"),
        ("none", "none"),
    ]
    sa = [("Positive", "Positive."), ("Negative", "neutral"), ("Neutral", "Neutral")]
    rows = [
        {"id": f"n{i}", "task": "ner", "reference": r, "hypothesis": h, "flags": ["stuck"] if i == 1 else []}
        for i, (r, h) in enumerate(ner)
    ]
    rows += [{"id": f"s{i}", "task": "sa", "reference": r, "hypothesis": h, "flags": []} for i, (r, h) in enumerate(sa)]
    rows += SQA_ROWS
    gen = _write_rows(tmp_path / "g.jsonl", rows)
    judge_list = ", ".join(
        f"{{llm: {{name: hf_llama, checkpoint: {p}, chat_format: chatml, dtype: fp32}}}}" for p in judges
    )
    tune(
        [
            "run",
            "speechmapper_eval",
            "--config",
            "eval/default",
            f"output_dir={tmp_path}/ev",
            f"generations={{slue: {gen}}}",
            f"judges=[{judge_list}]",
        ],
        cwd=tmp_path,
    )
    res = {r["task"]: r for r in json.loads((tmp_path / "ev" / "results.json").read_text())}
    want = ner_scores([parse_entities(r)[0] for r, _ in ner], [parse_entities(h)[0] for _, h in ner])
    # pairs: 2 correct (PLACE brussels, PERSON john smith) of 3 reference and 4 predicted
    assert res["ner"]["f1"] == pytest.approx(want["f1"]) == pytest.approx(100 * 2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3))
    assert res["ner"]["label_f1"] == pytest.approx(want["label_f1"])
    assert res["ner"]["f1_without_stuck"] == pytest.approx(100 * 2 * (1 / 2) * (1 / 2) / 1.0)  # row 1 left out
    s = sentiment_scores([r for r, _ in sa], [h for _, h in sa])
    assert res["sa"]["f1"] == pytest.approx(s["macro_f1"]) and res["sa"]["accuracy"] == pytest.approx(200 / 3)
    assert set(res["sqa"]["judges"]) == {"hf_llama_1", "hf_llama_2"}  # two judges of one name are numbered
    table = (tmp_path / "ev" / "results.md").read_text()
    assert "| slue | ner | 3 |" in table and f"{res['ner']['f1']:.1f}" in table


def test_sa_reference_outside_the_classes_is_named(tmp_path):
    gen = _write_rows(
        tmp_path / "g.jsonl", [{"id": "s9", "task": "sa", "reference": "Mixed", "hypothesis": "Positive", "flags": []}]
    )
    with pytest.raises(
        ValueError, match=r"1 sa rows have a reference that is not Negative/Neutral/Positive \(e.g. s9\)"
    ):
        _recipe(tmp_path, {"sa": str(gen)}).run()
