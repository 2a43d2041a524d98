"""The steps both training recipes share, written once: each recipe keeps its own loop, readable
top to bottom (torchtune's "duplication over abstraction" is about the loop's shape), and calls
these for the parts that must not drift apart.

- :func:`micro_batches`: a step's gradient-accumulation micro-batches from the endless stream
  (``TrainLoader.batches()``), passing over a batch none of whose items loaded, on every rank at once;
- :func:`gradient_sync`: gradients reduced only at a step's last micro-batch (DDP or FSDP2);
- :func:`all_reduce_mean`: a step's metrics averaged over ranks;
- :func:`training_state` / :func:`restore_training_state`: the one layout of a checkpoint's
  ``training_state`` (step, optimizer, scheduler, the batch sampler's position, every rank's RNG, the config);
- :class:`BestValidation`: which validation was best so far (its checkpoint is kept) and early stopping.

Plain PyTorch: no torchtune import.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist

from speechmapper_tune.checkpoint.projector_io import rng_state, set_rng_state


def all_ranks_have_items(batch: Dict[str, Any], world_size: int, device) -> bool:
    """Whether this micro-batch trains: one whose items all failed to load is passed over, and with several
    ranks by every rank at once (a rank that skipped alone would leave the others waiting in a collective)."""
    if world_size == 1:
        return bool(batch["ids"])
    flag = torch.tensor([int(bool(batch["ids"]))], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def micro_batches(
    batches: Iterator[Dict[str, Any]], grad_accum: int, skipped, log, world_size: int = 1, device="cpu"
) -> Iterator[Tuple[Dict[str, Any], bool]]:
    """The next step's ``grad_accum`` trainable micro-batches as ``(batch, is_last)``; every batch drawn
    has its dropped items counted in ``skipped`` (a ``SkipCounter``)."""
    n = 0
    while n < grad_accum:
        batch = next(batches)
        skipped.record_batch(batch, log)
        if not all_ranks_have_items(batch, world_size, device):
            continue
        n += 1
        yield batch, n == grad_accum


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Reduce gradients across ranks only when ``enabled`` (a step's last micro-batch): DDP's ``no_sync``,
    FSDP2's ``set_requires_gradient_sync``; a no-op on one process."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        yield
    elif hasattr(model, "no_sync") and not enabled:  # DDP
        with model.no_sync():
            yield
    else:
        yield


def all_reduce_mean(metrics: Dict[str, float], world_size: int, device="cpu") -> Dict[str, float]:
    """Each metric averaged over the ranks (every rank calls it, with the same keys)."""
    if world_size == 1:
        return dict(metrics)
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world_size for k, v in zip(keys, t)}


def gather_rng(world_size: int):
    """This process's RNG state; with several ranks, every rank's (a collective), so each resumes its own."""
    if world_size == 1:
        return rng_state()
    states = [None] * world_size
    dist.all_gather_object(states, rng_state())
    return states


def training_state(
    *,
    step: int,
    optimizer: Dict[str, Any],
    scheduler,
    train_loader,
    rng,
    config: Dict[str, Any],
    best: Optional["BestValidation"] = None,
) -> Dict[str, Any]:
    """A checkpoint's ``training_state``, the same layout in both stages. ``optimizer`` is a state dict
    (under FSDP the gathered full one); ``rng`` is :func:`gather_rng`'s answer."""
    return {
        "step": int(step),
        "optimizer": optimizer,
        "scheduler": scheduler.state_dict(),
        "sampler": train_loader.state_dict(),  # the batch sampler's state at the last batch trained on
        "rng": rng,
        "config": config,
        "best": best.state_dict() if best is not None else None,
    }


class BestValidation:
    """The best validation so far by one metric (``best_checkpoint`` settings): a validation that beats it is
    a new best (the recipe keeps that step's checkpoint), and ``patience`` validations in a row without one
    stop the run. Its state travels in the checkpoint, so a resumed run stops where an unbroken one would."""

    def __init__(self, metric: Optional[str] = None, mode: str = "max", patience: Optional[int] = None):
        if mode not in ("max", "min"):
            raise ValueError(f"best_checkpoint.mode={mode!r}: expected max or min")
        if patience is not None and (metric is None or patience < 1):
            raise ValueError(f"best_checkpoint.patience={patience}: needs best_checkpoint.metric and a value >= 1")
        self.metric, self.mode, self.patience = metric, mode, patience
        self.value: Optional[float] = None
        self.step: Optional[int] = None
        self.since = 0  # validations since the best one
        self.stopped_at: Optional[int] = None

    def check(self, has_validation: bool, val_every_n_steps: Optional[int]) -> "BestValidation":
        """Refuse settings that could never act, before any work."""
        if self.metric is not None and not has_validation:
            raise ValueError(f"best_checkpoint.metric={self.metric!r} needs validation data")
        if self.patience is not None and not val_every_n_steps:
            raise ValueError(f"best_checkpoint.patience={self.patience} needs val_every_n_steps")
        return self

    def update(self, step: int, metrics: Dict[str, float]) -> bool:
        """Record one validation; True when it is a new best (strictly better)."""
        if self.metric is None or not metrics:
            return False
        if self.metric not in metrics:
            raise KeyError(f"best_checkpoint.metric={self.metric!r} is not a validation figure: {sorted(metrics)}")
        value = float(metrics[self.metric])
        better = self.value is None or (value > self.value if self.mode == "max" else value < self.value)
        if better:
            self.value, self.step, self.since = value, int(step), 0
        else:
            self.since += 1
        return better

    def should_stop(self, step: int) -> bool:
        if self.stopped_at is None and self.patience is not None and self.since >= self.patience:
            self.stopped_at = int(step)
        return self.stopped_at is not None

    def save_or_stop(self, step: int, improved: bool, save_due: bool, save: Callable[[bool], None]) -> bool:
        """After a validation at ``step``: ``save(improved)`` when a save is due, on a new best, or when the run
        stops here (saved after the stop is decided, so a resume of it stays stopped); True: stop the run."""
        stop = self.should_stop(step)
        if save_due or improved or stop:
            save(improved)
        return stop

    def describe(self) -> str:
        return f"{self.metric} {self.value:.6g} at step {self.step}"

    def state_dict(self) -> Dict[str, Any]:
        return {"value": self.value, "step": self.step, "since": self.since, "stopped_at": self.stopped_at}

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        for k, v in (state or {}).items():  # none saved (an older checkpoint): nothing tracked yet
            setattr(self, k, v)


def restore_training_state(
    state: Dict[str, Any],
    *,
    optimizer,
    scheduler,
    train_loader,
    rank: int = 0,
    optimizer_state: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None,
) -> int:
    """Load :func:`training_state`'s layout back (also stage 2's older one, with ``epoch``/``consumed``
    instead of ``sampler``); returns the step. ``optimizer_state`` maps the saved optimizer state first
    (under FSDP: each rank keeps the shard of its parameters)."""
    saved = state["optimizer"] if optimizer_state is None else optimizer_state(state["optimizer"])
    optimizer.load_state_dict(saved)
    scheduler.load_state_dict(state["scheduler"])
    data = state.get("sampler")
    if data is None:  # a stage-2 checkpoint written before both stages shared this layout
        data = {**train_loader.batch_sampler.state_dict(), "epoch": state["epoch"], "consumed": state["consumed"]}
    train_loader.load_state_dict(data)
    rng = state["rng"]
    set_rng_state(rng[rank] if isinstance(rng, list) else rng)
    return int(state["step"])
