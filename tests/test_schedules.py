import pytest
import torch

from speechmapper_tune.schedules import constant_schedule, warmup_cosine_schedule


def _lrs(sched, opt, n):
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_from_init_lr_then_cosine():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    lrs = _lrs(warmup_cosine_schedule(opt, num_warmup_steps=10, num_training_steps=110, init_lr=1e-8), opt, 111)
    assert lrs[0] == pytest.approx(1e-8)
    assert lrs[10] == pytest.approx(1e-4)
    assert lrs[60] == pytest.approx(0.5e-4)
    assert lrs[110] == pytest.approx(0.0, abs=1e-12)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11]))


def test_cosine_over_no_steps_is_accepted_and_negative_lengths_are_not():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    assert _lrs(warmup_cosine_schedule(opt, num_warmup_steps=10, num_training_steps=0), opt, 1) == [
        pytest.approx(1e-8)
    ]  # max_steps=0: a validation-only run never steps it
    with pytest.raises(ValueError, match="bad schedule: num_warmup_steps=10, num_training_steps=-1"):
        warmup_cosine_schedule(opt, num_warmup_steps=10, num_training_steps=-1)


def test_constant():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-5)
    assert set(_lrs(constant_schedule(opt), opt, 5)) == {5e-5}
