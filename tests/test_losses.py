import itertools
import math

import pytest
import torch
from tolerances import FP32_SHALLOW, assert_close_to_scale

from speechmapper_tune.losses import (
    IGNORE_INDEX,
    Stage1Loss,
    build_stage1_target_ids,
    nearest_token_accuracy,
    norm_ratio,
    position_masks,
    speechmapper_mse,
    stage2_loss,
)

# One sample, 4 positions, 1 word: positions 0 (word) and 1 (first pad) are "word" positions,
# 2 and 3 the remaining pads. Squared errors per position: 1, 0, 1, 4.
PRED = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]])
TARGET = torch.tensor([[[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0]]])
LEN, WORDS = torch.tensor([4]), torch.tensor([1])
COS_ALL = (0.0 + 1.0 + 1 / math.sqrt(2) + 0.0) / 4  # zero vectors have cosine 0
COS_WORDS = (0.0 + 1.0) / 2


def test_mse_by_hand():
    parts = speechmapper_mse(PRED, TARGET, LEN, WORDS, alpha=5, scale=1.0)
    assert parts.mse_word.item() == pytest.approx((1 + 0) / 4)  # 2 positions x 2 dims
    assert parts.mse_pad.item() == pytest.approx((1 + 4) / 4)
    assert parts.mse.item() == pytest.approx(5 * 0.25 + 5 * 1.25)


def test_alpha_weights_and_scale():
    parts = speechmapper_mse(PRED, TARGET, LEN, WORDS, alpha=9, scale=1e3)
    assert parts.mse.item() == pytest.approx(1e6 * (9 * 0.25 + 1 * 1.25), rel=1e-6)


def test_stage1_loss_by_hand():
    out = Stage1Loss(alpha=5, gamma=100, scale=1.0)(PRED, TARGET, LEN, WORDS)
    assert out["cosine"].item() == pytest.approx(COS_ALL, rel=1e-6)
    assert out["loss"].item() == pytest.approx(7.5 - 100 * COS_ALL, rel=1e-6)
    words = Stage1Loss(alpha=5, gamma=100, scale=1.0, cosine_positions="words")(PRED, TARGET, LEN, WORDS)
    assert words["cosine"].item() == pytest.approx(COS_WORDS)


def test_batch_padding_is_excluded():
    pred = torch.cat([PRED, torch.full((1, 4, 2), 1e4)])
    target = torch.cat([TARGET, torch.zeros(1, 4, 2)])
    pred[1, :2] = TARGET[0, :2]  # second sample: 2 valid positions, exact on them
    target[1, :2] = TARGET[0, :2]
    out = Stage1Loss(alpha=5, gamma=0, scale=1.0)(pred, target, torch.tensor([4, 2]), torch.tensor([1, 1]))
    # word elements: sample 0 (2 pos) + sample 1 (2 pos, error 0) -> (1 + 0) / (4 * 2)
    assert out["mse_word"].item() == pytest.approx(1 / 8)
    assert out["mse_pad"].item() == pytest.approx(5 / 4)  # sample 1 has no remaining pads


def test_no_remaining_pads_gives_zero_pad_term():
    out = speechmapper_mse(PRED[:, :2], TARGET[:, :2], torch.tensor([2]), WORDS, scale=1.0)
    assert out.mse_pad.item() == 0.0


def test_loss_is_fp32_for_bf16_inputs():
    out = Stage1Loss(scale=1.0)(PRED.bfloat16(), TARGET.bfloat16(), LEN, WORDS)
    assert all(v.dtype == torch.float32 for v in out.values())


@pytest.mark.parametrize("alpha", [0, 0.5, 9.5, 10])
def test_alpha_outside_range_is_an_error(alpha):
    with pytest.raises(ValueError, match="alpha"):
        Stage1Loss(alpha=alpha)


def test_position_masks():
    word, pad = position_masks(torch.tensor([5, 3]), torch.tensor([2, 1]), 5)
    assert word.int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert pad.int().tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0]]


def test_target_ids_pad_then_ignore():
    ids = build_stage1_target_ids([[7, 8], [9]], [4, 2], pad_id=3)
    assert ids.tolist() == [[7, 8, 3, 3], [9, 3, IGNORE_INDEX, IGNORE_INDEX]]
    with pytest.raises(ValueError, match="does not fit"):
        build_stage1_target_ids([[1, 2, 3]], [3], pad_id=0)


def test_stage2_loss():
    assert stage2_loss(torch.tensor(2.0), torch.tensor(10.0), 0.9).item() == pytest.approx(0.1 * 2 + 0.9 * 10)
    assert stage2_loss(torch.tensor(2.0), torch.tensor(10.0), 0.0).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="sigma"):
        stage2_loss(torch.tensor(1.0), torch.tensor(1.0), 1.5)


def test_diagnostics():
    emb = torch.eye(4)
    pred = torch.tensor([[[0.9, 0.1, 0, 0], [0, 0, 0.2, 0.8], [0, 1.0, 0, 0]]])
    ids = torch.tensor([[0, 2, 1]])
    mask = torch.tensor([[True, True, False]])
    assert nearest_token_accuracy(pred, ids, mask, emb).item() == pytest.approx(0.5)
    target = emb[ids]
    assert norm_ratio(pred, target, mask).item() == pytest.approx(
        (pred[0, 0].norm() + pred[0, 1].norm()).item() / 2, rel=1e-6
    )


def test_stage2_balanced_weighting_gradients_are_relative():
    ce = torch.tensor(2.0, requires_grad=True)
    mse = torch.tensor(5e4, requires_grad=True)
    loss = stage2_loss(ce, mse, 0.9, weighting="balanced")
    assert loss.item() == pytest.approx(1.0)  # each relative term is 1
    loss.backward()
    assert ce.grad.item() == pytest.approx(0.1 / 2.0)  # gradient of 0.1 * log(ce)
    assert mse.grad.item() == pytest.approx(0.9 / 5e4)
    # paper weighting: CE's gradient is 0.1 whatever MSE's size
    ce2 = torch.tensor(2.0, requires_grad=True)
    stage2_loss(ce2, torch.tensor(5e4), 0.9).backward()
    assert ce2.grad.item() == pytest.approx(0.1)
    # no MSE in the batch (SQA-only items): the MSE term is a plain zero, never 0/0
    assert torch.isfinite(stage2_loss(torch.tensor(3.0), torch.tensor(0.0), 0.9, weighting="balanced"))
    with pytest.raises(ValueError, match="weighting"):
        stage2_loss(torch.tensor(1.0), torch.tensor(1.0), 0.9, weighting="equal")


# --- beyond the paper: balanced weighting and the embedding-table classifier (Stage1Loss) -------------

# One position (the first pad, no words) with two dimensions: the smallest balanced example.
P2, T2 = torch.tensor([[[1.0, 1.0]]]), torch.tensor([[[1.0, 0.0]]])
ONE, NONE = torch.tensor([1]), torch.tensor([0])


def test_stage1_balanced_gradient_is_the_log_gradient():
    pred = P2.clone().requires_grad_(True)
    out = Stage1Loss(alpha=5, gamma=100, weighting="balanced")(pred, T2, ONE, NONE)
    cos = 1 / math.sqrt(2)
    # loss stays Eq. 2: MSE = alpha * scale^2 * mean((p - t)^2) = 5 * 1e6 * 1/2
    assert out["loss"].item() == pytest.approx(5 * 1e6 / 2 - 100 * cos, rel=1e-6)
    assert out["objective"].item() == pytest.approx(2.0)  # two relative terms, each 1
    out["objective"].backward()
    # d log MSE / dp = 2 (p - t) / |p - t|^2 = (0, 2), whatever alpha and scale
    # d log(1 - cos) / dp = -(t / (|p||t|) - cos p / |p|^2) / (1 - cos) = -(1, -1) / (2 sqrt2 (1 - cos))
    k = 1 / (2 * math.sqrt(2) * (1 - cos))
    assert_close_to_scale(pred.grad[0, 0], torch.tensor([0.0 - k, 2.0 + k]), FP32_SHALLOW)


def test_stage1_paper_weighting_objective_is_the_loss():
    pred = P2.clone().requires_grad_(True)
    out = Stage1Loss()(pred, T2, ONE, NONE)
    assert out["objective"] is out["loss"] and "classifier_ce" not in out
    with pytest.raises(ValueError, match="weighting"):
        Stage1Loss(weighting="equal")
    with pytest.raises(ValueError, match="classifier_temperature"):
        Stage1Loss(classifier_temperature=0)


# Vocabulary of 4 in 2-D; mean squared row norm (1 + 1 + 1 + 4) / 4 = 7/4; pad id 3.
E4 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 2.0]])


def hand_ce(p, y, temperature):
    """-log softmax_y of -|p - e_j|^2 / (temperature * 7/4), in plain Python."""
    logits = [-((p[0] - e[0]) ** 2 + (p[1] - e[1]) ** 2) / (temperature * 7 / 4) for e in E4.tolist()]
    return math.log(sum(math.exp(l) for l in logits)) - logits[y]


def classifier_batch():
    # sample 0: 4 valid positions, 1 word -> positions 0 (word), 1 (first pad); 2, 3 remaining pads
    # sample 1: 2 valid positions, 1 word -> positions 0, 1; 2, 3 are batch padding
    ids = torch.tensor([[2, 3, 3, 3], [1, 3, IGNORE_INDEX, IGNORE_INDEX]])
    pred = torch.full((2, 4, 2), 50.0)  # excluded positions: far from every row, would dominate the CE
    pred[0, 0], pred[0, 1] = torch.tensor([-0.5, 0.5]), torch.tensor([0.0, 2.0])
    pred[1, 0], pred[1, 1] = torch.tensor([0.2, 0.3]), torch.tensor([1.0, 1.0])
    return pred, ids, torch.tensor([4, 2]), torch.tensor([1, 1])


def test_classifier_ce_by_hand_and_its_mask():
    pred, ids, lengths, words = classifier_batch()
    loss = Stage1Loss(classifier_weight=1.0, classifier_temperature=0.5)
    loss.set_embedding(E4)
    out = loss(pred, E4[ids.clamp_min(0)], lengths, words, ids)
    kept = [((0, 0), 2), ((0, 1), 3), ((1, 0), 1), ((1, 1), 3)]
    expected = sum(hand_ce(pred[i, j].tolist(), y, 0.5) for (i, j), y in kept) / 4
    assert out["classifier_ce"].item() == pytest.approx(expected, rel=1e-5)
    assert out["objective"].item() == pytest.approx(out["loss"].item() + expected, rel=1e-5)
    # batched == one sample at a time (each has 2 kept positions, so the mean of the two)
    singles = [
        loss(pred[i : i + 1], E4[ids[i : i + 1].clamp_min(0)], lengths[i : i + 1], words[i : i + 1], ids[i : i + 1])
        for i in range(2)
    ]
    assert expected == pytest.approx(sum(s["classifier_ce"].item() for s in singles) / 2, rel=1e-5)


def test_classifier_exact_rows_score_low_at_the_default_temperature():
    loss = Stage1Loss(classifier_weight=1.0)
    loss.set_embedding(E4)
    ids = torch.tensor([[0, 1, 2, 3]])
    out = loss(E4[ids], E4[ids], torch.tensor([4]), torch.tensor([3]), ids)
    assert out["classifier_ce"].item() < 1e-3


def test_classifier_without_embedding_or_ids_is_an_error():
    pred, ids, lengths, words = classifier_batch()
    with pytest.raises(ValueError, match="set_embedding"):
        Stage1Loss(classifier_weight=1.0)(pred, E4[ids.clamp_min(0)], lengths, words, ids)
    with pytest.raises(ValueError, match="target_ids"):
        Stage1Loss(classifier_weight=1.0)(pred, E4[ids.clamp_min(0)], lengths, words)


def test_balanced_classifier_term_is_relative():
    pred, ids, lengths, words = classifier_batch()
    pred = pred.requires_grad_(True)
    loss = Stage1Loss(weighting="balanced", classifier_weight=0.5)
    loss.set_embedding(E4)
    out = loss(pred, E4[ids.clamp_min(0)], lengths, words, ids)
    assert out["objective"].item() == pytest.approx(2.5)  # MSE, cosine, 0.5 x classifier: each 1
    out["objective"].backward()
    ref = pred.detach().clone().requires_grad_(True)
    r = Stage1Loss(classifier_weight=1.0)
    r.set_embedding(E4)
    o = r(ref, E4[ids.clamp_min(0)], lengths, words, ids)
    (o["mse"].log() + (1 - o["cosine"]).log() + 0.5 * o["classifier_ce"].log()).backward()
    assert_close_to_scale(pred.grad, ref.grad, FP32_SHALLOW)  # the same gradient, summed in another order


def hand_ctc_nll(frames, target, blank, temperature):
    """-log P(target) by summing every frame-by-frame path that collapses to it, in plain Python."""
    probs = []
    for p in frames:
        logits = [-((p[0] - e[0]) ** 2 + (p[1] - e[1]) ** 2) / (temperature * 7 / 4) for e in E4.tolist()]
        z = sum(math.exp(l) for l in logits)
        probs.append([math.exp(l) / z for l in logits])
    total = 0.0
    for path in itertools.product(range(len(E4)), repeat=len(frames)):
        collapsed = [c for k, c in enumerate(path) if c != blank and (k == 0 or c != path[k - 1])]
        if collapsed == list(target):
            total += math.prod(probs[t][c] for t, c in enumerate(path))
    return -math.log(total)


def ctc_batch():
    # pad id 3 is the blank; rows: 2 words in 4 vectors, 1 word in 3, a repeated word in 3 (needs a blank between)
    ids = torch.tensor([[2, 0, 3, 3], [1, 3, 3, IGNORE_INDEX], [1, 1, 3, IGNORE_INDEX]])
    pred = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(0))
    return pred, ids, torch.tensor([4, 3, 3]), torch.tensor([2, 1, 2])


def test_ctc_by_hand_and_against_torch():
    pred, ids, lengths, words = ctc_batch()
    loss = Stage1Loss(ctc_weight=0.5, classifier_temperature=0.8)
    loss.set_embedding(E4, blank_id=3)
    out = loss(pred, E4[ids.clamp_min(0)], lengths, words, ids)
    # torch's reduction="mean": each row's NLL over its number of tokens, then the mean over rows
    per_row = [
        hand_ctc_nll(pred[i, : lengths[i]].tolist(), ids[i, : words[i]].tolist(), 3, 0.8) / int(words[i])
        for i in range(3)
    ]
    assert_close_to_scale(out["ctc"], torch.tensor(sum(per_row) / 3), FP32_SHALLOW)
    assert_close_to_scale(out["objective"], out["loss"] + 0.5 * out["ctc"], FP32_SHALLOW)


def test_ctc_gradient_flows_to_valid_vectors_only():
    pred, ids, lengths, words = ctc_batch()
    pred.requires_grad_(True)
    loss = Stage1Loss(gamma=0, scale=1.0, ctc_weight=1.0)
    loss.set_embedding(E4, blank_id=3)
    loss(pred, E4[ids.clamp_min(0)], lengths, words, ids)["ctc"].backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[0].abs().sum(-1).gt(0).all() and pred.grad[1:, :3].abs().sum(-1).gt(0).all()
    assert pred.grad[1:, 3].eq(0).all()  # batch padding


def test_ctc_infeasible_row_counts_zero():
    pred, ids, lengths, words = ctc_batch()
    loss = Stage1Loss(ctc_weight=1.0)
    loss.set_embedding(E4, blank_id=3)
    short = torch.tensor([4, 3, 2])  # the repeated word cannot fit 2 vectors (1, blank, 1)
    out = loss(pred, E4[ids.clamp_min(0)], short, words, ids)
    hand = [
        hand_ctc_nll(pred[i, : short[i]].tolist(), ids[i, : words[i]].tolist(), 3, 0.05) / int(words[i])
        for i in range(2)
    ]
    assert_close_to_scale(out["ctc"], torch.tensor(sum(hand) / 3), FP32_SHALLOW)


def test_ctc_weight_zero_is_the_loss_as_before_and_errors_are_named():
    pred, ids, lengths, words = ctc_batch()
    target = E4[ids.clamp_min(0)]
    before, zero = Stage1Loss(classifier_weight=1.0), Stage1Loss(classifier_weight=1.0, ctc_weight=0.0)
    before.set_embedding(E4)
    zero.set_embedding(E4, blank_id=3)
    a, b = before(pred, target, lengths, words, ids), zero(pred, target, lengths, words, ids)
    assert "ctc" not in b and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    no_blank = Stage1Loss(ctc_weight=1.0)
    no_blank.set_embedding(E4)
    with pytest.raises(ValueError, match="blank_id"):
        no_blank(pred, target, lengths, words, ids)
    with pytest.raises(ValueError, match="ctc_weight"):
        Stage1Loss(ctc_weight=-1)
    blank_in_text = Stage1Loss(ctc_weight=1.0)
    blank_in_text.set_embedding(E4, blank_id=1)
    with pytest.raises(ValueError, match="CTC blank"):
        blank_in_text(pred, target, lengths, words, ids)


def test_balanced_ctc_term_is_relative():
    pred, ids, lengths, words = ctc_batch()
    loss = Stage1Loss(weighting="balanced", ctc_weight=0.5)
    loss.set_embedding(E4, blank_id=3)
    out = loss(pred, E4[ids.clamp_min(0)], lengths, words, ids)
    assert out["objective"].item() == pytest.approx(2.5)  # MSE, cosine, 0.5 x CTC: each 1


# --- Stage2Loss's classifier regularizer (SpeechLLM), over the items that have a transcript ------------


def _stage2_batch():
    torch.manual_seed(0)
    table = torch.randn(7, 4)
    pred = torch.randn(3, 5, 4, requires_grad=True)
    target_ids = torch.tensor([[1, 2, 6, 6, 6], [3, 3, 1, 6, 6], [5, 6, 6, 6, 6]])  # pad id 6
    lengths, num_words = torch.tensor([5, 5, 4]), torch.tensor([2, 3, 1])
    has_mse = torch.tensor([True, True, False])  # the third is instruction data without a transcript
    logits, labels = torch.randn(4, 7), torch.tensor([0, 1, 2, 3])
    return table, pred, target_ids, lengths, num_words, has_mse, logits, labels


@pytest.mark.parametrize("kind", ["ctc", "ce"])
def test_stage2_regularizer_is_the_embedding_classifier_on_transcribed_items(kind):
    from speechmapper_tune.losses import EmbeddingTable, Stage2Loss, embedding_classifier_ce, embedding_ctc

    table, pred, ids, lengths, words, has_mse, logits, labels = _stage2_batch()
    target = table[ids]
    plain = Stage2Loss(sigma=0.5)(logits, labels, pred, target, lengths, words, has_mse)
    assert "regularizer" not in plain
    loss = Stage2Loss(sigma=0.5, regularizer_weight=0.3, regularizer=kind, regularizer_temperature=0.5)
    loss.set_embedding(table, blank_id=6)
    out = loss(logits, labels, pred, target, lengths, words, has_mse, ids)
    t = EmbeddingTable.from_weight(table)
    if kind == "ctc":
        expected = embedding_ctc(pred[:2], ids[:2], lengths[:2], words[:2], t, 0.5, 6)
    else:
        word, _ = position_masks(lengths[:2], words[:2], 5)
        expected = embedding_classifier_ce(pred[:2], ids[:2], word, t, 0.5)
    assert_close_to_scale(out["regularizer"], expected, FP32_SHALLOW)
    assert_close_to_scale(out["objective"], plain["objective"] + 0.3 * expected, FP32_SHALLOW)
    assert_close_to_scale(out["loss"], plain["loss"], FP32_SHALLOW)  # Eq. 3's value stays comparable
    out["objective"].backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[:2].abs().sum() > 0
    assert (
        pred.grad[2].abs().sum() == 0
    )  # no transcript: neither MSE nor regularizer (the LLM's CE would, in a real run)
    balanced = Stage2Loss(
        sigma=0.5, weighting="balanced", regularizer_weight=0.3, regularizer=kind, regularizer_temperature=0.5
    )
    balanced.set_embedding(table, blank_id=6)
    b = balanced(logits, labels, pred, target, lengths, words, has_mse, ids)
    base = Stage2Loss(sigma=0.5, weighting="balanced")(logits, labels, pred, target, lengths, words, has_mse)
    assert_close_to_scale(b["objective"], base["objective"] + 0.3, FP32_SHALLOW)  # relative(term) == 1


def test_stage2_regularizer_needs_the_table_and_refuses_bad_settings():
    from speechmapper_tune.losses import Stage2Loss

    table, pred, ids, lengths, words, has_mse, logits, labels = _stage2_batch()
    with pytest.raises(ValueError, match="set_embedding"):
        Stage2Loss(regularizer_weight=1.0)(logits, labels, pred, table[ids], lengths, words, has_mse, ids)
    for bad in ({"regularizer_weight": -1.0}, {"regularizer": "mse"}, {"regularizer_temperature": 0.0}):
        with pytest.raises(ValueError, match="regularizer"):
            Stage2Loss(**bad)
    loss = Stage2Loss(regularizer_weight=1.0)
    loss.set_embedding(table, blank_id=6)
    none = torch.tensor([False, False, False])
    assert loss(logits, labels, pred, table[ids], lengths, words, none, ids)["regularizer"].item() == 0.0
