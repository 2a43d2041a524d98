"""A length-bucketed dynamic batch sampler with a cap on projector output vectors, and state.

Each batch holds at most ``max_tokens`` output vectors counted with padding
(``batch_size * longest item``), the paper's "maximum vector sequence of 1,024 as batch size".
Order is a pure function of ``(seed, epoch)``: shuffle all items, cut them into pools of
``pool_size`` batches' worth, sort each pool by length, pack batches greedily, shuffle batches.
Batches are dealt round-robin to ranks (the tail that does not divide evenly is dropped, so
every rank takes the same number of steps). ``state_dict()`` is ``{epoch, consumed}``:
resuming re-derives the epoch's order and skips the consumed batches, exactly.

lhotse's ``DynamicBucketingSampler`` caps by duration, not by output vectors, and restores
its position approximately; this sampler is small enough to be exact.
"""

from __future__ import annotations

import random
from typing import Dict, Iterator, List, Sequence

from torch.utils.data import Sampler


class _StatefulBatchSampler(Sampler[List[int]]):
    """Iteration and exact-resume state shared by the batch samplers: subclasses define
    ``epoch_batches(epoch)``, a pure function of (seed, epoch, rank)."""

    seed: int
    world_size: int

    def epoch_batches(self, epoch: int) -> List[List[int]]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.epoch_batches(self.epoch))

    def __iter__(self) -> Iterator[List[int]]:
        batches = self.epoch_batches(self.epoch)
        while self.consumed < len(batches):
            batch = batches[self.consumed]
            self.consumed += 1
            yield batch
        self.epoch, self.consumed = self.epoch + 1, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state.get("world_size", self.world_size) != self.world_size or state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"sampler state was saved with seed={state.get('seed')} world_size={state.get('world_size')}, "
                f"this run has seed={self.seed} world_size={self.world_size}: resume with the same settings"
            )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


class LengthCappedBatchSampler(_StatefulBatchSampler):
    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pool_size: int = 50,
    ):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
        if too_long:
            raise ValueError(
                f"{len(too_long)} items are longer than max_tokens={max_tokens} output vectors "
                f"(e.g. index {too_long[0]} with {lengths[too_long[0]]}); filter them first"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.lengths = list(lengths)
        self.max_tokens, self.shuffle, self.seed = max_tokens, shuffle, seed
        self.rank, self.world_size, self.pool_size = rank, world_size, pool_size
        self.epoch, self.consumed = 0, 0

    def _pack(self, order: List[int]) -> List[List[int]]:
        batches, cur, cur_max = [], [], 0
        for i in order:
            n = self.lengths[i]
            new_max = max(cur_max, n)
            if cur and new_max * (len(cur) + 1) > self.max_tokens:
                batches.append(cur)
                cur, new_max = [], n
            cur.append(i)
            cur_max = new_max
        if cur:
            batches.append(cur)
        return batches

    def epoch_batches(self, epoch: int) -> List[List[int]]:
        """All of this rank's batches for ``epoch``, in order."""
        idx = list(range(len(self.lengths)))
        if not self.shuffle:
            batches = self._pack(sorted(idx, key=lambda i: self.lengths[i]))
        else:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            rng.shuffle(idx)
            mean_len = max(1.0, sum(self.lengths) / max(1, len(self.lengths)))
            pool = max(1, int(self.pool_size * self.max_tokens / mean_len))
            batches = []
            for s in range(0, len(idx), pool):
                batches += self._pack(sorted(idx[s : s + pool], key=lambda i: self.lengths[i]))
            rng.shuffle(batches)
        usable = (len(batches) // self.world_size) * self.world_size
        return batches[self.rank : usable : self.world_size]


class ShuffledBatchSampler(_StatefulBatchSampler):
    """Fixed-size batches (stage 2: the paper's batch of 12 utterances), reshuffled each epoch.

    The last incomplete batch is dropped, and batches are dealt round-robin to ranks as above.
    """

    def __init__(
        self, num_items: int, batch_size: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        if batch_size < 1 or num_items < 1:
            raise ValueError(f"need batch_size >= 1 and items >= 1, got {batch_size} and {num_items}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.num_items, self.batch_size, self.shuffle, self.seed = num_items, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.consumed = 0, 0

    def epoch_batches(self, epoch: int) -> List[List[int]]:
        idx = list(range(self.num_items))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(idx)
        full = len(idx) // self.batch_size if self.shuffle else -(-len(idx) // self.batch_size)
        batches = [idx[i * self.batch_size : (i + 1) * self.batch_size] for i in range(full)]
        usable = (len(batches) // self.world_size) * self.world_size
        return batches[self.rank : usable : self.world_size]
