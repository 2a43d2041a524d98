"""Stage-1 data: feature items + tokenized transcripts -> padded batches with pad-extended targets.

Setup-time checks (cheap, from the manifest alone): the transcript is tokenized, and an item
whose tokens plus the first pad do not fit the projector output is skipped and counted
(never truncated). Load-time checks (need the array): unreadable features, wrong shape, or
NaN/inf values drop the item from its batch; the batch reports it in ``batch["skipped"]`` so the
recipe counts it in the main process, whatever the number of loader workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from speechmapper_tune.data.augment import FeatureMasking
from speechmapper_tune.data.features import load_item_features, pad_features
from speechmapper_tune.data.manifest import FeatureItem, SkipCounter
from speechmapper_tune.losses import build_stage1_target_ids

# which transcript the targets embed: "normalized" (the paper's MMS form) or "written" (not in the
# paper: cased and punctuated, the form the LLM reads in text; FeatureItem.written)
TARGET_TEXTS = ("normalized", "written")


@dataclass
class Stage1Example:
    item: FeatureItem
    token_ids: List[int]
    out_length: int


def prepare_stage1_examples(
    items: Sequence[FeatureItem],
    encode: Callable[[str], List[int]],
    output_length: Callable[[int], int],
    max_tokens_per_batch: int,
    skipped: SkipCounter,
    target_text: str = "normalized",
) -> List[Stage1Example]:
    """Tokenize transcripts (``target_text``: see :data:`TARGET_TEXTS`) and keep the items whose
    target fits the projector output."""
    if target_text not in TARGET_TEXTS:
        raise ValueError(f"data.target_text={target_text!r}: expected one of {TARGET_TEXTS}")
    examples = []
    for it in items:
        ids = list(encode((it.written or it.text) if target_text == "written" else it.text))
        n_out = int(output_length(it.num_frames))
        if not ids:
            skipped.add("transcript has no tokens", it.id)
        elif n_out < 1:
            skipped.add("too few frames for the projector", it.id)
        elif len(ids) + 1 > n_out:
            skipped.add("target longer than projector output", it.id)
        elif n_out > max_tokens_per_batch:
            skipped.add("longer than max_tokens_per_batch", it.id)
        else:
            examples.append(Stage1Example(it, ids, n_out))
    return examples


class Stage1Dataset(Dataset):
    """Items' features and token ids; ``augment`` (train only) masks features per (seed, epoch, index).

    ``augment``: None (off) or ``{time_masks, time_width, feature_masks, feature_width}``, see
    :mod:`speechmapper_tune.data.augment`; call :meth:`set_epoch` before each epoch's iteration.
    """

    def __init__(self, examples: Sequence[Stage1Example], augment: Optional[Mapping] = None, seed: int = 0):
        self.examples = list(examples)
        self.masking = FeatureMasking.from_config(augment, seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Dict:
        ex = self.examples[i]
        feats, error = load_item_features(ex.item)
        if error:
            return {"id": ex.item.id, "error": error}
        if self.masking is not None:
            feats = self.masking(feats, self.epoch, i)
        return {"id": ex.item.id, "features": feats, "token_ids": ex.token_ids}


class Stage1Collator:
    """Pads features, builds pad-extended target ids and the lengths the loss needs."""

    def __init__(self, output_length: Callable[[int], int], pad_id: int):
        self.output_length, self.pad_id = output_length, pad_id

    def __call__(self, samples: List[Dict]) -> Dict:
        good = [s for s in samples if "error" not in s]
        skipped = [(s["id"], s["error"]) for s in samples if "error" in s]
        if not good:
            return {"ids": [], "skipped": skipped}
        feats, lengths = pad_features([s["features"] for s in good])
        out_lengths = [int(self.output_length(int(n))) for n in lengths]
        return {
            "ids": [s["id"] for s in good],
            "features": feats,
            "lengths": lengths,
            "out_lengths": torch.tensor(out_lengths, dtype=torch.long),
            "num_words": torch.tensor([len(s["token_ids"]) for s in good], dtype=torch.long),
            "target_ids": build_stage1_target_ids([s["token_ids"] for s in good], out_lengths, self.pad_id),
            "skipped": skipped,
        }


def lookup_targets(embedding: Tensor, target_ids: Tensor) -> Tensor:
    """Embedding rows for target ids; ignored positions (batch padding) get zeros."""
    return embedding[target_ids.clamp_min(0)] * (target_ids >= 0)[..., None]


def count_tokens(batch: Dict) -> Tuple[int, int]:
    """(real output vectors, padded output vectors) in a batch."""
    if not batch["ids"]:
        return 0, 0
    return int(batch["out_lengths"].sum()), int(batch["out_lengths"].max()) * len(batch["ids"])


def sample_subset(n: int, k: Optional[int], seed: int) -> List[int]:
    """A deterministic subset of ``k`` indices out of ``n`` (all when ``k`` is None)."""
    if k is None or k >= n:
        return list(range(n))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(n, size=k, replace=False).tolist())
