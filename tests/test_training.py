"""The training steps both recipes share (speechmapper_tune.training, TrainLoader.batches)."""

import contextlib
import logging

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from speechmapper_tune.checkpoint.projector_io import rng_state
from speechmapper_tune.data.loader import TrainLoader
from speechmapper_tune.data.manifest import SkipCounter
from speechmapper_tune.data.sampler import ShuffledBatchSampler
from speechmapper_tune.training import (
    all_reduce_mean,
    gradient_sync,
    micro_batches,
    restore_training_state,
    training_state,
)

LOG = logging.getLogger("test")


class Items(Dataset):
    """Item i is i; an index in ``broken`` fails to load (-i - 1), as a feature read that failed."""

    def __init__(self, n, broken=()):
        self.n, self.broken, self.epochs = n, set(broken), []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return -i - 1 if i in self.broken else i

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


def collate(items):
    return {"ids": [i for i in items if i >= 0], "skipped": [(str(-i - 1), "unreadable") for i in items if i < 0]}


def loader(n=10, batch_size=3, num_workers=0, broken=()):
    sampler = ShuffledBatchSampler(n, batch_size, shuffle=True, seed=7)
    dl = DataLoader(Items(n, broken), batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)
    return TrainLoader(dl, "items.jsonl", SkipCounter())


def take(stream, k):
    return [next(stream)["ids"] for _ in range(k)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_loader_state_is_the_position_of_the_last_batch_handed_out(num_workers):
    a = loader(num_workers=num_workers)
    stream = a.batches()
    first = take(stream, 4)  # 3 batches an epoch: into epoch 1
    state = a.state_dict()
    assert (state["epoch"], state["consumed"]) == (1, 1)  # not where the workers' read-ahead is
    rest = take(stream, 5)
    b = loader(num_workers=num_workers)
    b.load_state_dict(state)
    assert take(b.batches(), 5) == rest
    assert first[:3] != first[3:] + rest[:2]  # epochs are reshuffled
    assert a.dataset.epochs[:3] == [0, 1, 2] and b.dataset.epochs[0] == 1  # feature masks follow the epoch


def test_a_state_saved_at_an_epoch_end_resumes_with_the_next_epoch():
    a = loader()
    stream = a.batches()
    take(stream, 3)
    state = a.state_dict()
    assert (state["epoch"], state["consumed"]) == (0, 3)
    nxt = take(stream, 2)
    b = loader()
    b.load_state_dict(state)
    assert take(b.batches(), 2) == nxt and b.epoch == 1


def test_micro_batches_pass_over_batches_with_no_item_and_count_them():
    tl = loader(n=9, batch_size=1, broken={0, 1, 2, 3})
    stream = tl.batches()
    got = [(b["ids"], last) for b, last in micro_batches(stream, 3, tl.skipped, LOG)]
    assert [last for _, last in got] == [False, False, True]
    assert all(ids for ids, _ in got)  # every micro-batch trains on something
    assert tl.skipped.total() == tl.state_dict()["consumed"] - 3  # each passed-over batch's item counted


def test_all_reduce_mean_on_one_process_is_the_identity():
    assert all_reduce_mean({"loss": 2.5, "ce": 1.0}, world_size=1) == {"loss": 2.5, "ce": 1.0}


def test_gradient_sync_holds_ddp_back_except_at_the_last_micro_batch():
    class DDPLike(torch.nn.Module):
        calls = []

        @contextlib.contextmanager
        def no_sync(self):
            self.calls.append("no_sync")
            yield

    class FSDPLike(torch.nn.Module):
        flags = []

        def set_requires_gradient_sync(self, flag):
            self.flags.append(flag)

    ddp, fsdp = DDPLike(), FSDPLike()
    for last in (False, True):
        with gradient_sync(ddp, last), gradient_sync(fsdp, last), gradient_sync(torch.nn.Linear(1, 1), last):
            pass
    assert DDPLike.calls == ["no_sync"] and FSDPLike.flags == [False, True]


def test_training_state_round_trips_and_reads_the_older_layout():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    sched.step()
    a = loader()
    stream = a.batches()
    take(stream, 2)
    state = training_state(
        step=5, optimizer=opt.state_dict(), scheduler=sched, train_loader=a, rng=rng_state(), config={}
    )
    assert (
        set(state) == {"step", "optimizer", "scheduler", "sampler", "rng", "config", "best"} and state["best"] is None
    )
    expected = take(stream, 2)
    for saved in (state, {**{k: v for k, v in state.items() if k != "sampler"}, "epoch": 0, "consumed": 2}):
        b = loader()
        opt2 = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (s + 1))
        assert restore_training_state(saved, optimizer=opt2, scheduler=sched2, train_loader=b) == 5
        assert take(b.batches(), 2) == expected
        assert sched2.last_epoch == 1 and opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
