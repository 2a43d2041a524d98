"""The agreement metric for unseen instructions: chrF and exact match against the LLM's transcript-fed
answer, with the shuffled-transcript chance level, in speechmapper_eval."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from speechmapper_tune.metrics import agreement_scores


def test_agreement_scores_by_hand():
    same = agreement_scores(["The Cat sat.", "yes"], ["the cat sat", "yes"])
    assert same["exact"] == 100.0  # equal after normalization (case, punctuation)
    assert same["num_items"] == 2 and "nc:6" in same["chrf_signature"]
    s = agreement_scores(["a title", "yes", "no"], ["a title", "no", "no"])
    assert s["exact"] == pytest.approx(200 / 3)
    assert agreement_scores(["abc"], ["abc"])["chrf"] == pytest.approx(100.0)
    assert agreement_scores(["abcdef"], ["uvwxyz"])["chrf"] == 0.0
    partial = agreement_scores(["the cat sat on the mat"], ["the cat sat"])["chrf"]
    assert 0.0 < partial < 100.0
    with pytest.raises(ValueError):
        agreement_scores([], [])


def _row(i, ref, hyp, shuffled=None, flags=()):
    r = {
        "id": f"u{i}",
        "task": "self",
        "reference": ref,
        "hypothesis": hyp,
        "flags": list(flags),
        "instruction": "Paraphrase the text.",
    }
    if shuffled is not None:
        r["shuffled_answer"] = shuffled
    return r


def test_eval_scores_self_rows_with_their_chance_level(tmp_path):
    from speechmapper_eval import EvalRecipe

    rows = [
        _row(0, "A small dog.", "a small dog", "A red river."),
        _row(1, "No.", "Yes.", "No."),
        _row(2, "Four words long here.", "four words long here", "Three words here.", flags=["stuck"]),
    ]
    gen = tmp_path / "g" / "generations.jsonl"
    gen.parent.mkdir()
    gen.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = EvalRecipe(OmegaConf.create({"output_dir": str(tmp_path / "ev"), "generations": {"speech": str(gen)}}))
    recipe.setup()
    recipe.run()
    res = json.loads((tmp_path / "ev" / "results.json").read_text())[0]
    refs = [r["reference"] for r in rows]
    expected = agreement_scores(refs, [r["hypothesis"] for r in rows])
    chance = agreement_scores(refs, [r["shuffled_answer"] for r in rows])
    assert res["agreement_chrf"] == pytest.approx(expected["chrf"]) and res["agreement_exact"] == pytest.approx(200 / 3)
    assert res["chance_chrf"] == pytest.approx(chance["chrf"]) and res["chance_exact"] == pytest.approx(100 / 3)
    assert res["stuck"] == 1 and res["agreement_chrf_without_stuck"] == pytest.approx(
        agreement_scores(refs[:2], ["a small dog", "Yes."])["chrf"]
    )
    assert "| speech | 3 |" in (tmp_path / "ev" / "results.md").read_text()
    per = res["by_instruction"]["Paraphrase the text."]  # every row here asks the same instruction
    assert (
        per["n"] == 3
        and per["chrf"] == pytest.approx(expected["chrf"])
        and per["chance_exact"] == pytest.approx(100 / 3)
    )
