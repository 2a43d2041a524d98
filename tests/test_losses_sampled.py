"""The sampled softmax of Stage1Loss (classifier_negatives, classifier_neighbours), against hand values."""

import math

import pytest
import torch
from tolerances import FP32_SHALLOW, assert_close_to_scale

from speechmapper_tune.losses import (
    IGNORE_INDEX,
    EmbeddingTable,
    Stage1Loss,
    TableNeighbours,
    candidate_ce,
    draw_candidates,
)

# Vocabulary of 4 in 2-D; mean squared row norm (1 + 1 + 1 + 4) / 4 = 7/4; pad id 3.
E4 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 2.0]])


def logit(p, j, temperature):
    e = E4[j].tolist()
    return -((p[0] - e[0]) ** 2 + (p[1] - e[1]) ** 2) / (temperature * 7 / 4)


def test_draw_candidates_fixed_rows_then_uniform_draws_with_their_weight():
    g = torch.Generator().manual_seed(0)
    ids, logw = draw_candidates(torch.tensor([7, 3, 7, IGNORE_INDEX]), 20, 5, extra=torch.tensor([[9, 3]]), generator=g)
    assert ids[:3].tolist() == [3, 7, 9] and logw[:3].tolist() == [0.0, 0.0, 0.0]
    drawn = ids[3:].tolist()
    assert len(drawn) == 5 == len(set(drawn)) and not set(drawn) & {3, 7, 9} and all(0 <= i < 20 for i in drawn)
    assert_close_to_scale(logw[3:], torch.full((5,), math.log(17 / 5)), FP32_SHALLOW)  # each stands for 17/5 rows
    ids, logw = draw_candidates(torch.tensor([2]), 4, 99)  # more than the rest: the whole table, unweighted
    assert sorted(ids.tolist()) == [0, 1, 2, 3] and ids[0] == 2 and logw.abs().max() == 0
    with pytest.raises(ValueError, match="outside the embedding table"):
        draw_candidates(torch.tensor([4]), 4, 1)


def test_candidate_ce_by_hand_and_its_normalizer_is_unbiased():
    table, t, p = EmbeddingTable.from_weight(E4), 0.5, [0.3, -0.2]
    l = [logit(p, j, t) for j in range(4)]
    # fixed rows 1 and 2 (target 2), row 0 drawn standing for the 2 other rows (0 and 3)
    got = candidate_ce(
        torch.tensor([p]), torch.tensor([2]), table, t, torch.tensor([1, 2, 0]), torch.tensor([0.0, 0.0, math.log(2)])
    )
    assert got.item() == pytest.approx(math.log(math.exp(l[1]) + math.exp(l[2]) + 2 * math.exp(l[0])) - l[2], rel=1e-5)
    # averaged over the two equally likely draws (row 0 or row 3), the normalizer is the whole table's
    est = [math.exp(l[1]) + math.exp(l[2]) + 2 * math.exp(l[d]) for d in (0, 3)]
    assert sum(est) / 2 == pytest.approx(sum(math.exp(x) for x in l), rel=1e-9)


def batch():
    # sample 0: 1 word then pads; sample 1: 1 word, first pad, batch padding (as in test_losses)
    ids = torch.tensor([[2, 3, 3, 3], [1, 3, IGNORE_INDEX, IGNORE_INDEX]])
    pred = torch.full((2, 4, 2), 50.0)
    pred[0, 0], pred[0, 1] = torch.tensor([-0.5, 0.5]), torch.tensor([0.0, 2.0])
    pred[1, 0], pred[1, 1] = torch.tensor([0.2, 0.3]), torch.tensor([1.0, 1.0])
    return pred, ids, torch.tensor([4, 2]), torch.tensor([1, 1])


def test_stage1_sampled_classifier_trains_on_candidates_and_validates_on_the_table():
    pred, ids, lengths, words = batch()
    target = E4[ids.clamp_min(0)]
    full = Stage1Loss(classifier_weight=1.0, classifier_temperature=0.5)
    full.set_embedding(E4)
    ref = full(pred, target, lengths, words, ids)["classifier_ce"]
    kept = [((0, 0), 2), ((0, 1), 3), ((1, 0), 1), ((1, 1), 3)]
    # targets {1, 2, 3} are fixed; one draw is row 0 standing for itself (R = S = 1): exactly the full CE
    sampled = Stage1Loss(classifier_weight=1.0, classifier_temperature=0.5, classifier_negatives=1)
    sampled.set_embedding(E4)
    assert sampled(pred, target, lengths, words, ids)["classifier_ce"].item() == pytest.approx(ref.item(), rel=1e-5)
    # no negatives: the targets' rows only, by hand
    only = Stage1Loss(classifier_weight=1.0, classifier_temperature=0.5, classifier_negatives=0)
    only.set_embedding(E4)
    hand = (
        sum(
            math.log(sum(math.exp(logit(pred[i, j].tolist(), c, 0.5)) for c in (1, 2, 3)))
            - logit(pred[i, j].tolist(), y, 0.5)
            for (i, j), y in kept
        )
        / 4
    )
    assert only(pred, target, lengths, words, ids)["classifier_ce"].item() == pytest.approx(hand, rel=1e-5)
    only.eval()  # validation: the whole table again
    assert only(pred, target, lengths, words, ids)["classifier_ce"].item() == pytest.approx(ref.item(), rel=1e-5)


def test_sampled_draws_follow_the_global_rng_so_a_resume_redraws_them():
    torch.manual_seed(0)
    table = torch.randn(50, 8)
    loss = Stage1Loss(classifier_weight=1.0, classifier_negatives=5)
    loss.set_embedding(table)
    pred, ids = torch.randn(1, 6, 8), torch.tensor([[4, 9, 11, 3, 3, 3]])
    args = (pred, table[ids], torch.tensor([6]), torch.tensor([3]), ids)
    torch.manual_seed(1)
    a = loss(*args)["classifier_ce"]
    torch.manual_seed(1)
    assert loss(*args)["classifier_ce"].item() == a.item()
    assert loss(*args)["classifier_ce"].item() != a.item()  # a new draw


def test_table_neighbours_by_hand():
    nb = TableNeighbours(EmbeddingTable.from_weight(E4), k=2)
    # squared distances from row 0 (1,0): row 1 -> 2, row 2 -> 4, row 3 -> 5; from row 2 (-1,0): 2, 4, 5 to rows 1, 0, 3
    assert nb.lookup(torch.tensor([2, 0, 0])).tolist() == [[1, 2], [1, 0]]
    assert nb.done.tolist() == [True, False, True, False]
    loss = Stage1Loss(classifier_weight=1.0, classifier_negatives=0, classifier_neighbours=1)
    loss.set_embedding(E4)
    ids, logw = loss._candidates(torch.tensor([0]))
    assert ids.tolist() == [0, 1] and logw.tolist() == [0.0, 0.0]


def test_sampled_ctc_over_the_whole_table_in_another_order_is_the_full_ctc():
    ids = torch.tensor([[2, 0, 3, 3], [1, 3, 3, IGNORE_INDEX], [1, 1, 3, IGNORE_INDEX]])
    pred = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0))
    args = (pred, E4[ids.clamp_min(0)], torch.tensor([4, 3, 3]), torch.tensor([2, 1, 2]), ids)
    full = Stage1Loss(ctc_weight=1.0, classifier_temperature=0.8)
    full.set_embedding(E4, blank_id=3)
    # targets {0, 1, 2} + blank 3 are every row: candidates [0, 1, 2, 3], nothing left to draw
    sampled = Stage1Loss(ctc_weight=1.0, classifier_temperature=0.8, classifier_negatives=2)
    sampled.set_embedding(E4, blank_id=3)
    assert_close_to_scale(sampled(*args)["ctc"], full(*args)["ctc"], FP32_SHALLOW)
    # one row short of the table: rows 0, 1, 3 fixed (row 2's target dropped), row 2 drawn after them
    ids2 = torch.tensor([[1, 0, 3, 3], [1, 3, 3, IGNORE_INDEX], [1, 1, 3, IGNORE_INDEX]])
    args2 = (pred, E4[ids2.clamp_min(0)], args[2], args[3], ids2)
    assert_close_to_scale(sampled(*args2)["ctc"], full(*args2)["ctc"], FP32_SHALLOW)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"classifier_negatives": -1}, "classifier_negatives=-1"),
        ({"classifier_neighbours": 4}, "needs classifier_negatives"),
        ({"classifier_negatives": 8, "classifier_neighbours": -1}, "classifier_neighbours=-1"),
    ],
)
def test_sampled_settings_errors_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Stage1Loss(classifier_weight=1.0, **kwargs)
