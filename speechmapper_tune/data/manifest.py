"""Reading feature manifests (lhotse CutSets with features) into flat, validated items.

Per-item problems (no features, a missing or truncated shard, empty transcript) are counted
and the item is skipped, never fatal; a manifest that cannot be read at all, or has no usable
item, is an error naming the file.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from lhotse import CutSet

from speechmapper_tune.checkpoint.atomic import atomic_path
from speechmapper_tune.data import features as _features  # importing it registers the storage backend
from speechmapper_tune.errors import error_summary
from speechmapper_tune.text import normalize_text
from speechmapper_tune.textio import first_non_utf8_line

log = logging.getLogger(__name__)


@dataclass
class FeatureItem:
    id: str
    text: str  # normalized transcript
    num_frames: int
    num_features: int
    storage_type: str
    storage_path: str
    storage_key: str
    duration: float = 0.0
    language: Optional[str] = None
    custom: Dict = field(default_factory=dict)
    # the transcript as written (cased, punctuated): a supervision's custom "written" where the corpus
    # builder kept what the TTS read, else its text as stored; only written-form targets use it
    written: str = ""


@dataclass
class SkipCounter:
    """Counts skipped items by reason and keeps a few example ids per reason for the log."""

    counts: Counter = field(default_factory=Counter)
    examples: Dict[str, List[str]] = field(default_factory=dict)
    items: List[Tuple[str, str]] = field(default_factory=list)  # every (id, reason): generation lists them all

    def add(self, reason: str, item_id: str) -> None:
        self.counts[reason] += 1
        self.items.append((item_id, reason))
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(item_id)

    def record_batch(self, batch: Dict, log: logging.Logger, verbose_per_reason: int = 20) -> None:
        """Count the items a collator dropped (``batch["skipped"]``), logging the first few."""
        for item_id, reason in batch.get("skipped", []):
            if self.counts[reason] < verbose_per_reason:
                log.warning(f"skipping {item_id}: {reason}")
            self.add(reason, item_id)

    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "none"
        return "; ".join(f"{r}: {n} (e.g. {', '.join(self.examples.get(r, []))})" for r, n in self.counts.most_common())

    def as_dict(self) -> Dict[str, int]:
        return dict(self.counts)


def load_feature_items(
    manifest_path: str | Path, skipped: Optional[SkipCounter] = None, require_transcript: bool = True
) -> List[FeatureItem]:
    """Flatten a feature manifest; skip (and count) items that cannot be trained on.
    ``require_transcript=False`` (generation): items without a transcript are kept, with text ""."""
    path = Path(manifest_path)
    if not path.is_file():
        raise FileNotFoundError(f"feature manifest not found: {path}")
    skipped = skipped if skipped is not None else SkipCounter()
    items: List[FeatureItem] = []
    shard_problems: Dict[str, Optional[str]] = {}  # shard -> why its items are skipped (None: readable)
    try:
        cuts = CutSet.from_file(str(path)) or []  # an empty manifest reads as None
        for cut in cuts:
            feats = cut.features
            if feats is None:
                skipped.add("no features attached", cut.id)
                continue
            shard = feats.storage_path
            if shard not in shard_problems:
                shard_problems[shard] = shard_problem(feats.storage_type, shard)
            if shard_problems[shard]:
                skipped.add(shard_problems[shard], cut.id)
                continue
            text = " ".join(s.text or "" for s in cut.supervisions)
            norm = normalize_text(text)
            if not norm and require_transcript:
                skipped.add("empty transcript", cut.id)
                continue
            if feats.num_frames < 1:
                skipped.add("zero feature frames", cut.id)
                continue
            sup = cut.supervisions[0] if cut.supervisions else None
            items.append(
                FeatureItem(
                    id=cut.id,
                    text=norm,
                    num_frames=int(feats.num_frames),
                    num_features=int(feats.num_features),
                    storage_type=feats.storage_type,
                    storage_path=shard,
                    storage_key=feats.storage_key,
                    duration=float(cut.duration),
                    language=sup.language if sup is not None else None,
                    custom=dict(cut.custom or {}),
                    written=written_text(cut.supervisions),
                )
            )
    except UnicodeDecodeError as e:
        raise (first_non_utf8_line(path) or ValueError(f"cannot read feature manifest {path}: {e}")) from e
    except (ValueError, KeyError, OSError) as e:
        raise ValueError(f"cannot read feature manifest {path}: {e}") from e
    if not items:
        raise ValueError(f"feature manifest {path} has no usable item (skipped: {skipped.summary()})")
    dims = Counter(it.num_features for it in items)
    if len(dims) > 1:
        raise ValueError(f"feature manifest {path} mixes feature dims {dict(dims)}")
    return items


def written_text(supervisions) -> str:
    """The supervisions' text as written: custom ``written`` where present, else ``text``, space-joined."""
    parts = [((s.custom or {}).get("written") or s.text or "").strip() for s in supervisions]
    return " ".join(p for p in parts if p)


def shard_problem(storage_type: str, shard: str) -> Optional[str]:
    """Why no item of a feature shard can load (missing, or truncated on disk), or None.

    Checked once per shard at setup: a shard cut short by an interrupted copy or a full disk
    would otherwise only fail item by item, inside the training loop.
    """
    if not Path(shard).exists():
        return "feature file missing"
    if storage_type != _features.STORAGE_TYPE:
        return None
    try:
        _features._open_shard(shard)  # reads the header, which safetensors checks against the file size
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error type and OSError)
        return f"feature shard {shard} unreadable ({error_summary(e)})"
    return None


def save_cutset_atomic(cuts: CutSet, path: str | Path) -> Path:
    """Write a CutSet manifest (format from the suffix, e.g. ``.jsonl.gz``) atomically."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix
    with atomic_path(path) as tmp:
        staged = tmp.with_name(tmp.name + suffix)
        try:
            cuts.to_file(str(staged))
            staged.replace(tmp)
        finally:
            staged.unlink(missing_ok=True)
    return path


def feature_dim(items: List[FeatureItem]) -> int:
    return items[0].num_features


def split_counts(items: List[FeatureItem]) -> Tuple[int, float]:
    return len(items), sum(it.duration for it in items) / 3600.0
