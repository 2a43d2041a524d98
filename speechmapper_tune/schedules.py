"""Learning-rate schedules, plain PyTorch (built from YAML ``_component_`` entries)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_schedule(
    optimizer: Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    init_lr: float = 1e-8,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warm-up from ``init_lr`` to the optimizer's LR, then cosine decay (paper A.2).

    The paper warms up from 1e-8 over 100K steps and decays with a cosine over training;
    the LR reaches ``min_lr_ratio * peak`` at ``num_training_steps`` and stays there.
    ``num_training_steps=0`` is allowed: a run of ``max_steps=0`` only validates its starting point.
    """
    if num_training_steps < 0 or num_warmup_steps < 0:
        raise ValueError(f"bad schedule: num_warmup_steps={num_warmup_steps}, num_training_steps={num_training_steps}")
    peaks = [g["lr"] for g in optimizer.param_groups]

    def make(peak: float):
        start = min(init_lr / peak, 1.0) if peak > 0 else 1.0

        def factor(step: int) -> float:
            if step < num_warmup_steps:
                return start + (1.0 - start) * step / num_warmup_steps
            span = max(1, num_training_steps - num_warmup_steps)
            progress = min(1.0, (step - num_warmup_steps) / span)
            return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return factor

    return LambdaLR(optimizer, [make(p) for p in peaks])


def constant_schedule(optimizer: Optimizer, num_warmup_steps: int = 0) -> LambdaLR:
    """Constant LR (paper stage 2), with an optional linear warm-up."""
    return LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / num_warmup_steps) if num_warmup_steps else 1.0)
