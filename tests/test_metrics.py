import math
import sys
import types
from collections import Counter
from functools import partial

import pytest

from speechmapper_tune.metrics import (
    asr_scores,
    bleu_tokenizer,
    comet_checkpoint,
    comet_scores,
    detect_language,
    format_entities,
    judge_prompt,
    language_shares,
    load_comet,
    ner_scores,
    parse_entities,
    parse_judgement,
    parse_sentiment,
    sentiment_scores,
    st_scores,
    with_and_without,
)

# ------------------------------------------------------------------------------------- ASR


def test_wer_one_sub_one_del_one_ins():
    # the cat sat on the mat  ->  the DOG sat _ the mat TODAY : S=1 D=1 I=1 over N=6
    s = asr_scores(["the cat sat on the mat"], ["the dog sat the mat today"])
    assert (s["substitutions"], s["deletions"], s["insertions"], s["ref_words"]) == (1, 1, 1, 6)
    assert s["wer"] == pytest.approx(100 * 3 / 6)
    assert s["num_items"] == 1


def test_cer_by_hand():
    # abcd -> abXdE : 1 substitution + 1 insertion over 4 characters
    assert asr_scores(["abcd"], ["abxde"])["cer"] == pytest.approx(100 * 2 / 4)
    # the space counts as a character: "ab cd" (5 chars) vs "ab ce": 1 substitution
    s = asr_scores(["ab cd"], ["ab ce"])
    assert s["cer"] == pytest.approx(100 * 1 / 5)
    assert s["ref_chars"] == 5
    assert s["wer"] == pytest.approx(50.0)


def test_corpus_level_not_mean_of_utterances():
    # 1 error over 4 + 2 = 6 words -> 16.67%, not the mean of per-utterance WERs (25%)
    s = asr_scores(["a b c d", "a b"], ["a b c d", "a x"])
    assert s["wer"] == pytest.approx(100 / 6)


def test_normalization_applied():
    refs = ["Hello, World! Don't stop."]
    hyps = ["hello world don\u2019t stop"]
    assert asr_scores(refs, hyps)["wer"] == 0.0
    assert asr_scores(refs, hyps)["cer"] == 0.0
    assert asr_scores(refs, hyps, normalize=False)["wer"] > 0


def test_numbers_and_contractions_not_expanded():
    assert asr_scores(["3 cats"], ["three cats"])["wer"] == pytest.approx(50.0)
    s = asr_scores(["don't go"], ["do not go"])  # don't -> do (S) + not (I)
    assert (s["substitutions"], s["insertions"], s["wer"]) == (1, 1, pytest.approx(100.0))


def test_empty_hypothesis_and_reference():
    s = asr_scores(["a b c"], [""])
    assert (s["deletions"], s["wer"], s["cer"]) == (3, 100.0, 100.0)
    # empty reference next to a normal one: its words are insertions, N unchanged
    s = asr_scores(["a b", ""], ["a b", "x y"])
    assert (s["insertions"], s["ref_words"], s["wer"]) == (2, 2, 100.0)
    # punctuation-only reference normalizes to empty
    assert asr_scores(["...", "a"], ["", "a"])["wer"] == 0.0
    # every reference empty: 0 without errors, inf with
    assert asr_scores([""], [""])["wer"] == 0.0
    assert math.isinf(asr_scores(["", "!"], ["x", ""])["wer"])
    assert asr_scores([], [])["num_items"] == 0
    with pytest.raises(ValueError):
        asr_scores(["a"], [])


# -------------------------------------------------------------------------------------- ST


def test_bleu_identical_is_100_and_signature():
    s = st_scores(["Le chat est assis sur le tapis."], ["Le chat est assis sur le tapis."], "fr")
    assert s["bleu"] == pytest.approx(100.0)
    assert s["chrf"] == pytest.approx(100.0)
    assert "tok:13a" in s["bleu_signature"] and "nrefs:1" in s["bleu_signature"]
    assert "nc:6" in s["chrf_signature"]


def test_bleu_brevity_penalty_by_hand():
    # all n-gram precisions are 1; BP = exp(1 - 6/4)
    s = st_scores(["a b c d e f"], ["a b c d"], "de")
    assert s["bleu"] == pytest.approx(100 * math.exp(1 - 6 / 4), abs=1e-6)


def test_chrf_sanity():
    ref = ["Der Hund spielt im Garten."]
    full = st_scores(ref, ref, "de")["chrf"]
    partial = st_scores(ref, ["Der Hund schläft im Haus."], "de")["chrf"]
    lower = st_scores(ref, ["der hund spielt im garten."], "de")["chrf"]
    none = st_scores(["abc"], ["xyz"], "de")
    assert full == pytest.approx(100.0)
    assert 0 < partial < lower < full  # case-sensitive, partial overlap scores in between
    assert none["chrf"] == 0.0 and none["bleu"] == 0.0


def test_chinese_tokenizer():
    assert bleu_tokenizer("zh") == bleu_tokenizer("zh-CN") == "zh"
    assert bleu_tokenizer("de") == "13a"
    s = st_scores(["我喜欢猫。"], ["我喜欢猫。"], "zh")
    assert "tok:zh" in s["bleu_signature"] and s["bleu"] == pytest.approx(100.0)
    # with zh tokenization, one wrong character out of 5 does not zero BLEU; 13a would see one token
    assert st_scores(["我非常喜欢猫。"], ["我非常喜欢狗。"], "zh")["bleu"] > 0
    with pytest.raises(ValueError):
        st_scores([], [], "de")


def _comet_folder(root):
    """A folder in the layout of a downloaded COMET model (hparams.yaml + checkpoints/model.ckpt)."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "model.ckpt").write_bytes(b"")
    (root / "hparams.yaml").write_text("pretrained_model: xlm-roberta-large\n")
    return root


def test_comet_missing_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "comet", None)  # import comet -> ImportError
    with pytest.raises(ImportError, match="unbabel-comet"):
        comet_scores(["src"], ["ref"], ["hyp"], _comet_folder(tmp_path / "wmt22-comet-da"))


def test_comet_missing_model(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "comet", types.ModuleType("comet"))
    with pytest.raises(ValueError, match="model_path"):
        comet_scores(["src"], ["ref"], ["hyp"], None)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        comet_scores(["src"], ["ref"], ["hyp"], tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="checkpoints/model.ckpt is missing"):
        comet_scores(["src"], ["ref"], ["hyp"], tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "model.ckpt").write_bytes(b"")
    with pytest.raises(
        FileNotFoundError, match="hparams.yaml is missing"
    ):  # COMET's loader reads it beside checkpoints/
        comet_checkpoint(tmp_path, "comet.model_dir")


def test_comet_with_fake_comet_package(monkeypatch, tmp_path):
    ckpt = _comet_folder(tmp_path) / "checkpoints" / "model.ckpt"
    seen = {}

    class FakeCometModel:  # stands in for the unbabel-comet package, not installable beside this torch/numpy
        def predict(self, data, batch_size, gpus, progress_bar):
            seen["data"] = data
            return types.SimpleNamespace(scores=[0.5, 0.75])

    fake = types.ModuleType("comet")
    fake.load_from_checkpoint = lambda path: seen.setdefault("path", path) and FakeCometModel()
    monkeypatch.setitem(sys.modules, "comet", fake)
    out = comet_scores(["s1", "s2"], ["r1", "r2"], ["h1", "h2"], tmp_path)
    assert seen["path"] == str(ckpt)
    assert seen["data"][1] == {"src": "s2", "mt": "h2", "ref": "r2"}
    assert out["scores"] == [50.0, 75.0] and out["comet"] == pytest.approx(62.5)
    assert comet_scores(["s1", "s2"], ["r1", "r2"], ["h1", "h2"], ckpt)["num_items"] == 2  # the .ckpt itself


def test_comet_that_cannot_score_fails_at_load(monkeypatch, tmp_path):
    class BrokenCometModel:  # as unbabel-comet 2.2.7 under transformers 5: the model loads, predict raises
        def predict(self, data, batch_size, gpus, progress_bar):
            raise ValueError("not enough values to unpack (expected 3, got 2)")

    fake = types.ModuleType("comet")
    fake.load_from_checkpoint = lambda path: BrokenCometModel()
    monkeypatch.setitem(sys.modules, "comet", fake)
    with pytest.raises(
        RuntimeError, match=r"comet.model_dir=.*cannot score with it \(ValueError: not enough.*transformers"
    ):
        load_comet(_comet_folder(tmp_path), "comet.model_dir")


# ------------------------------------------------------------------------ language shares

SENTENCES = {
    "en": "The committee will vote on the proposal tomorrow morning after the debate.",
    "fr": "Le comité votera sur la proposition demain matin après le débat.",
    "de": "Der Ausschuss wird morgen früh nach der Aussprache über den Vorschlag abstimmen.",
    "es": "El comité votará la propuesta mañana por la mañana después del debate.",
    "it": "Il comitato voterà sulla proposta domani mattina dopo il dibattito.",
}


@pytest.mark.parametrize("lang", sorted(SENTENCES))
def test_detect_language(lang):
    assert detect_language(SENTENCES[lang]) == lang


def test_language_shares():
    hyps = [SENTENCES["fr"], SENTENCES["fr"], SENTENCES["en"], SENTENCES["de"], ""]
    s = language_shares(hyps, "fr-FR")
    assert s["target"] == pytest.approx(40.0) and s["english"] == pytest.approx(20.0)
    assert s["detected"] == Counter({"fr": 2, "en": 1, "de": 1, "unknown": 1})
    assert s["num_items"] == 5
    assert language_shares(hyps, "fr") == s  # seeded: deterministic
    assert language_shares([], "de")["target"] == 0.0


# -------------------------------------------------------------------------- stuck decodes


def test_with_and_without():
    items = [
        {"reference": "a b c d", "hypothesis": "a b c d", "flags": []},
        {"reference": "e f", "hypothesis": "e x", "flags": None},
        {"reference": "g h", "hypothesis": "g g g g g g g g g g", "flags": ["stuck", "max_tokens"]},
        {"reference": "i j", "hypothesis": "i j"},
    ]
    out = with_and_without(items, asr_scores)
    assert (out["num_items"], out["num_flagged"], out["flag"]) == (4, 1, "stuck")
    assert out["all"]["wer"] == pytest.approx(100 * (1 + 9) / 10)  # 1 sub + (1 sub + 8 ins) over 10
    assert out["without"]["wer"] == pytest.approx(100 * 1 / 8)
    assert out["without"]["num_items"] == 3

    other = with_and_without(items, asr_scores, flag="max_tokens")
    assert other["num_flagged"] == 1
    st = with_and_without(items, partial(st_scores, target_lang="de"))
    assert st["without"]["num_items"] == 3
    only_stuck = with_and_without(items[2:3], asr_scores)
    assert only_stuck["without"] is None and only_stuck["num_flagged"] == 1
    assert with_and_without([], asr_scores)["all"] is None


# -------------------------------------------------------------------------------- judge


def test_judge_prompt():
    msgs = judge_prompt("Paris is the capital of France.", "What is the capital of France?", "Paris", "It is Paris.")
    assert [m["role"] for m in msgs] == ["system", "user"]
    user = msgs[1]["content"]
    for part in (
        "Paris is the capital of France.",
        "What is the capital of France?",
        "Reference answer: Paris",
        "Candidate answer: It is Paris.",
    ):
        assert part in user
    assert "yes" in msgs[0]["content"].lower() and "no" in msgs[0]["content"].lower()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes.", True),
        ("yes", True),
        ("YES, because the candidate says Paris.", True),
        ("**Yes**", True),
        ("Response: {Yes}", True),
        ("  no", False),
        ("No.", False),
        ("NO - the answer is Lyon.", False),
        ("The answer is: yes.", True),
        ("Correct", True),
        ("Incorrect.", False),
        ("I have no idea what you mean", None),
        ("banana", None),
        ("", None),
        (None, None),
        ("???", None),
    ],
)
def test_parse_judgement(text, expected):
    assert parse_judgement(text) is expected


# ------------------------------------------------------------------------------ SLUE NER / SA


def test_entities_format_and_parse():
    ents = [("PLACE", "the eu"), ("WHEN", "today")]
    assert format_entities(ents) == "PLACE: the eu; WHEN: today" and format_entities([]) == "none"
    assert parse_entities("PLACE: the eu; WHEN: today") == (ents, 0)
    assert parse_entities("none") == ([], 0) and parse_entities("None.") == ([], 0) and parse_entities("") == ([], 0)
    # bullets, markdown, new lines, quotes and a trailing period are tolerated; "Entities:" (no phrase) and a
    # part without a colon are counted as unparsed
    reply = 'Entities:\n- **PERSON**: "Mr Smith".\n2) work of art: the mona lisa\nsomething else'
    assert parse_entities(reply) == ([("PERSON", "Mr Smith"), ("WORK_OF_ART", "the mona lisa")], 2)


def test_ner_micro_f1_and_label_f1_by_hand():
    refs = [
        [("PLACE", "eu"), ("WHEN", "today"), ("PLACE", "eu")],  # the repeated pair counts twice
        [("PERSON", "john smith")],
        [],
    ]
    hyps = [
        [("PLACE", "EU"), ("WHEN", "yesterday")],  # phrases compared normalized: EU == eu
        [("PERSON", "john smith"), ("ORG", "the commission")],
        [("QUANT", "two")],
    ]
    s = ner_scores(refs, hyps)
    # pairs: tp = 1 (PLACE eu #1) + 1 (PERSON) = 2; reference pairs 4; predicted 5
    p, r = 2 / 5, 2 / 4
    assert s["precision"] == pytest.approx(100 * p) and s["recall"] == pytest.approx(100 * r)
    assert s["f1"] == pytest.approx(100 * 2 * p * r / (p + r))  # 44.44
    # tags only: utt 1 {PLACE#1, PLACE#2, WHEN#1} vs {PLACE#1, WHEN#1} -> 2; utt 2 PERSON -> 1; tp 3 of 4 / 5
    lp, lr = 3 / 5, 3 / 4
    assert s["label_f1"] == pytest.approx(100 * 2 * lp * lr / (lp + lr))  # 66.67
    assert s["per_tag"]["PLACE"] == pytest.approx({"precision": 100.0, "recall": 50.0, "f1": 100 * 2 * 0.5 / 1.5})
    assert s["per_tag"]["QUANT"]["precision"] == 0.0 and s["num_reference_entities"] == 4
    assert ner_scores([[]], [[]])["f1"] == 0.0  # nothing to find, nothing found: slue-toolkit's safe_divide gives 0


def test_parse_sentiment():
    assert parse_sentiment("Positive.") == "Positive" and parse_sentiment("Sentiment: NEGATIVE") == "Negative"
    assert parse_sentiment("I think it is neutral, not positive") == "Neutral"
    assert parse_sentiment("unpositive?") is None and parse_sentiment(None) is None


def test_sentiment_macro_weighted_and_accuracy_by_hand():
    refs = ["Positive", "Positive", "Negative", "Neutral", "Neutral", "Neutral"]
    hyps = ["positive", "Neutral", "Negative", "Neutral", "it is positive", "no idea"]
    s = sentiment_scores(refs, hyps)
    # Positive: tp 1, predicted 2, support 2 -> P .5 R .5 F .5; Negative: 1/1/1 -> F 1;
    # Neutral: tp 1, predicted 2, support 3 -> P .5 R 1/3 F .4; "no idea" predicts no class
    f_neu = 2 * 0.5 * (1 / 3) / (0.5 + 1 / 3)
    assert s["per_class"]["Neutral"]["f1"] == pytest.approx(100 * f_neu)
    assert s["macro_f1"] == pytest.approx(100 * (0.5 + 1.0 + f_neu) / 3)
    assert s["weighted_f1"] == pytest.approx(100 * (2 * 0.5 + 1 * 1.0 + 3 * f_neu) / 6)
    assert s["accuracy"] == pytest.approx(100 * 3 / 6) and s["unparsed"] == 1
    assert s["macro_precision"] == pytest.approx(100 * (0.5 + 1 + 0.5) / 3)
    with pytest.raises(ValueError, match="'Mixed' is not one of"):
        sentiment_scores(["Mixed"], ["Positive"])
