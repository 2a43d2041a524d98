"""Stage2Loss's behaviour-alignment term (kl_ratio, kl_temperature) against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import FP32_SHALLOW, assert_close_to_scale

from speechmapper_tune.losses import Stage2Loss, behaviour_kl, relative

# teacher p = (1/4, 3/4), student q = (1/2, 1/2) at T = 1
TEACHER = torch.tensor([[0.0, math.log(3.0)]])
STUDENT = torch.tensor([[0.0, 0.0]])
KL_T1 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # 0.1308...


def test_behaviour_kl_by_hand():
    assert behaviour_kl(TEACHER, STUDENT).item() == pytest.approx(KL_T1, rel=1e-6)
    # T = 2 on logits doubled gives the same distributions, and the T^2 factor 4
    assert behaviour_kl(2 * TEACHER, 2 * STUDENT, 2.0).item() == pytest.approx(4 * KL_T1, rel=1e-6)
    # T = 2 on the logits themselves: p = softmax((0, ln 3 / 2)) = (1, sqrt 3) / (1 + sqrt 3)
    s3 = math.sqrt(3.0)
    p = (1 / (1 + s3), s3 / (1 + s3))
    assert behaviour_kl(TEACHER, STUDENT, 2.0).item() == pytest.approx(
        4 * sum(x * math.log(x / 0.5) for x in p), rel=1e-6
    )
    # rows are averaged; equal distributions give exactly 0; the direction is teacher -> student
    two = behaviour_kl(torch.cat([TEACHER, STUDENT]), torch.cat([STUDENT, STUDENT]))
    assert two.item() == pytest.approx(KL_T1 / 2, rel=1e-6)
    assert behaviour_kl(TEACHER, TEACHER.clone()).item() == 0.0
    reverse = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert behaviour_kl(STUDENT, TEACHER).item() == pytest.approx(reverse, rel=1e-6)
    assert behaviour_kl(torch.zeros(0, 5), torch.zeros(0, 5)).item() == 0.0
    with pytest.raises(ValueError, match="aligned"):
        behaviour_kl(torch.zeros(2, 5), torch.zeros(3, 5))


def test_only_the_student_gets_a_gradient():
    teacher = TEACHER.clone().requires_grad_(True)
    student = STUDENT.clone().requires_grad_(True)
    behaviour_kl(teacher, student).backward()
    assert teacher.grad is None
    # d KL / d student logits = q - p at T = 1
    assert_close_to_scale(student.grad, torch.tensor([[0.5 - 0.25, 0.5 - 0.75]]), FP32_SHALLOW)


def _batch():
    torch.manual_seed(0)
    pred = torch.randn(2, 4, 3)
    target = torch.randn(2, 4, 3)
    lengths, words, has = torch.tensor([4, 3]), torch.tensor([2, 1]), torch.tensor([True, False])
    logits = torch.randn(5, 6, requires_grad=True)  # item 0: 3 response positions, item 1: 2
    labels = torch.tensor([1, 2, 3, 4, 5])
    teacher_rows = torch.tensor([True, True, True, False, False])
    teacher = torch.randn(3, 6)
    return logits, labels, pred, target, lengths, words, has, teacher, teacher_rows


@pytest.mark.parametrize("sigma, ratio", [(0.0, 1.0), (0.5, 1.0), (0.9, 0.3), (0.0, 0.5)])
def test_the_task_term_mixes_ce_and_kl_inside_eq3(sigma, ratio):
    logits, labels, pred, target, lengths, words, has, teacher, rows = _batch()
    plain = Stage2Loss(sigma=sigma)(logits, labels, pred, target, lengths, words, has)
    out = Stage2Loss(sigma=sigma, kl_ratio=ratio, kl_temperature=2.0)(
        logits, labels, pred, target, lengths, words, has, None, teacher, rows
    )
    kl = behaviour_kl(teacher, logits[:3], 2.0)
    assert_close_to_scale(out["kl"], kl, FP32_SHALLOW)
    expected = (1 - sigma) * ((1 - ratio) * plain["ce"] + ratio * kl) + sigma * plain["mse"]
    assert_close_to_scale(out["objective"], expected, FP32_SHALLOW)
    assert_close_to_scale(out["loss"], plain["loss"], FP32_SHALLOW)  # Eq. 3's value stays comparable across runs
    out["objective"].backward()
    grad = logits.grad
    if ratio == 1.0:  # KL alone on the task side: the item without a transcript gets no gradient
        assert grad[3:].abs().sum() == 0 and grad[:3].abs().sum() > 0


def test_balanced_weighting_takes_each_term_relative():
    logits, labels, pred, target, lengths, words, has, teacher, rows = _batch()
    out = Stage2Loss(sigma=0.5, weighting="balanced", kl_ratio=0.5)(
        logits, labels, pred, target, lengths, words, has, None, teacher, rows
    )
    assert out["objective"].item() == pytest.approx(1.0, rel=1e-6)  # 0.5 * (0.5 * 1 + 0.5 * 1) + 0.5 * 1
    ce = torch.nn.functional.cross_entropy(logits, labels)
    kl = behaviour_kl(teacher, logits[:3])
    expected = 0.5 * (0.5 * relative(ce) + 0.5 * relative(kl))
    g1 = torch.autograd.grad(out["objective"], logits)[0]
    g2 = torch.autograd.grad(expected, logits)[0]  # the MSE term has no gradient into the logits
    assert_close_to_scale(g1, g2, FP32_SHALLOW)


def test_settings_and_a_missing_teacher_are_refused():
    logits, labels, pred, target, lengths, words, has, teacher, rows = _batch()
    for bad in ({"kl_ratio": -0.1}, {"kl_ratio": 1.5}, {"kl_temperature": 0.0}):
        with pytest.raises(ValueError, match="kl_"):
            Stage2Loss(**bad)
    assert not Stage2Loss().needs_teacher and Stage2Loss(kl_ratio=0.2).needs_teacher
    with pytest.raises(ValueError, match="teacher=True"):
        Stage2Loss(kl_ratio=1.0)(logits, labels, pred, target, lengths, words, has)
    assert "kl" not in Stage2Loss()(logits, labels, pred, target, lengths, words, has)
