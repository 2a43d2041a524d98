import math

import pytest
import torch

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
