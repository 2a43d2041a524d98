"""Self-generated instruction rows: pooled instructions, a shuffled-transcript reference, answers attached."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from speechmapper_tune.data.instructions import attach_answers, instruction_rows, pooled_instruction_rows, shuffled_rows
from speechmapper_tune.data.manifest import SkipCounter

POOL = ["Give this text a short title.", "List the nouns in the text.", "Is the text a question?"]


def _cut(i, text="The Cat sat.", features=True):
    return SimpleNamespace(
        id=f"c{i}", features=object() if features else None, supervisions=[SimpleNamespace(text=text)]
    )


def test_pooled_rows_draw_distinct_instructions_per_cut_by_seed_and_id():
    cuts = [_cut(i) for i in range(20)]
    rows = pooled_instruction_rows(cuts, POOL, per_item=2, seed=3)
    assert len(rows) == 40 and rows[0]["transcript"] == "the cat sat" and rows[0]["task"] == "self"
    for i in range(20):
        mine = [r for r in rows if r["features"] == f"c{i}"]
        assert len({r["instruction"] for r in mine}) == 2 and len({r["id"] for r in mine}) == 2
    assert {r["instruction"] for r in rows} == set(POOL)  # the pool is used, not one instruction
    # a cut's draw depends on (seed, id) only: a longer corpus keeps the earlier rows
    assert pooled_instruction_rows(cuts[:5], POOL, per_item=2, seed=3) == rows[:10]
    assert pooled_instruction_rows(cuts, POOL, per_item=2, seed=4) != rows
    assert len(pooled_instruction_rows(cuts, POOL, max_items=7)) == 7


def test_pooled_rows_skip_unusable_cuts_and_refuse_bad_pools():
    skipped = SkipCounter()
    rows = pooled_instruction_rows([_cut(0), _cut(1, text=" "), _cut(2, features=False)], POOL, skipped=skipped)
    assert [r["features"] for r in rows] == ["c0"] and skipped.total() == 2
    for pool, per in (([], 1), (["a", "a"], 1), (["a", " "], 1), (POOL, 4), (POOL, 0)):
        with pytest.raises(ValueError):
            pooled_instruction_rows([_cut(0)], pool, per_item=per)
    with pytest.raises(ValueError, match="pooled_instruction_rows"):
        instruction_rows([_cut(0)], "self")


def test_shuffled_rows_point_every_row_at_another_cut():
    rows = pooled_instruction_rows([_cut(i) for i in range(9)], POOL, per_item=2)
    sh = shuffled_rows(rows, seed=0)
    assert [(r["id"], r["instruction"]) for r in sh] == [(r["id"], r["instruction"]) for r in rows]
    assert all(a["features"] != b["features"] for a, b in zip(rows, sh))
    assert sorted({r["features"] for r in sh}) == sorted({r["features"] for r in rows})  # a permutation of the cuts
    with pytest.raises(ValueError, match="at least 2"):
        shuffled_rows(rows[:1])


def test_answers_are_attached_by_id_and_empty_ones_skipped():
    rows = [{"id": "a"}, {"id": "b"}, {"id": "c"}]
    gens = [{"id": "b", "hypothesis": " yes ", "stopped_by": "eos"}, {"id": "a", "hypothesis": "", "stopped_by": "eos"}]
    skipped = SkipCounter()
    out = attach_answers(rows, gens, "answer", skipped)
    assert out == [{"id": "b", "answer": "yes", "answer_stopped_by": "eos"}]
    assert skipped.total() == 2
