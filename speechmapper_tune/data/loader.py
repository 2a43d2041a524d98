"""The training loader: a DataLoader whose epochs must hold a usable batch.

The training recipes draw batches endlessly, epoch after epoch, and pass over a batch whose
items all failed to load (NaN features, an unreadable array). With no loadable item at all
that loop would never take a step; ``TrainLoader`` ends it with :class:`NoUsableData`,
naming the manifest, its feature shards and what was skipped for which reason.

``TrainLoader.batches()`` is that endless stream, and the loader is the one owner of the data
position: its ``state_dict()`` is the batch sampler's state at the last batch handed out (a
DataLoader's workers draw indices ahead of that), so a run resumed from it continues with the
next batch, exactly.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator

from speechmapper_tune.data.manifest import SkipCounter


class NoUsableData(ValueError):
    """A training set from which no batch can be trained on."""


class TrainLoader:
    """Iterates ``loader`` like the DataLoader itself; raises :class:`NoUsableData` after an epoch
    that yields no batch, or, counted from the epoch's start, only batches with no item left.

    ``skipped`` is the counter the recipe records each batch's dropped items in: the error
    reports it. An epoch resumed part-way may end without a usable batch; the next one decides.
    """

    def __init__(self, loader, source: str, skipped: SkipCounter):
        self.loader, self.source, self.skipped = loader, str(source), skipped
        self._position = None  # (epoch, consumed) after the last batch handed out by batches()

    @property
    def dataset(self):
        return self.loader.dataset

    @property
    def batch_sampler(self):
        return self.loader.batch_sampler

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def epoch(self) -> int:
        return self._position[0] if self._position else self.batch_sampler.epoch

    def batches(self) -> Iterator[Dict[str, Any]]:
        """Batches without end, epoch after epoch, from the sampler's position on."""
        sampler = self.batch_sampler
        while True:
            epoch, consumed = sampler.epoch, sampler.consumed
            self.dataset.set_epoch(epoch)  # feature masks depend on (seed, epoch, index)
            for batch in self:
                consumed += 1
                self._position = (epoch, consumed)
                yield batch
            sampler.set_epoch(epoch + 1)

    def state_dict(self) -> Dict[str, int]:
        """The batch sampler's state at the last batch handed out."""
        state = self.batch_sampler.state_dict()
        if self._position is not None:
            state["epoch"], state["consumed"] = self._position
        return state

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)
        self._position = None

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        whole_epoch = getattr(self.loader.batch_sampler, "consumed", 0) == 0
        batches = usable = 0
        for batch in self.loader:
            batches += 1
            usable += bool(batch["ids"])
            yield batch
        if whole_epoch and batches == 0:
            raise NoUsableData(
                f"{self.source}: an epoch of the training data holds no batch "
                f"(skipped: {self.skipped.summary()}{self._shards()})"
            )
        if whole_epoch and usable == 0:
            raise NoUsableData(
                f"{self.source}: no usable item in a whole epoch of {batches} batches: every item "
                f"failed to load (skipped: {self.skipped.summary()}{self._shards()})"
            )

    def _shards(self) -> str:
        shards = sorted({ex.item.storage_path for ex in getattr(self.dataset, "examples", [])})
        more = f" and {len(shards) - 3} more" if len(shards) > 3 else ""
        return f"; feature shards: {', '.join(shards[:3])}{more}" if shards else ""
