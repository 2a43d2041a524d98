"""Inputs for generation: what fills the speech span of each prompt, and resumable outputs.

The span holds one of (``span_source`` in the generate config):
- ``projector``: the SpeechMapper vectors of the utterance (the system under test);
- ``transcript``: the token embeddings of the reference transcript (the text topline: the
  best a projector can do with this LLM and prompt);
- ``asr``: the token embeddings of an ASR system's transcript of the audio (the paper's
  "ASR + LLM" cascade row), here Whisper through faster-whisper.
Only the span differs: the prompt, the LLM and the decoding are the same for all three.

A generation folder holds ``generations.jsonl`` (one row per generated item), ``not_generated.jsonl``
(every manifest item that was not generated, with the reason) and ``generation_settings.json``
(projector weights' hash, LLM, prompt, decoding): a rerun resumes only with the same settings, so
rows made by another checkpoint are never passed off as this one's. Under ``tune run
--nproc_per_node N`` each rank writes its items to its own part files (``generations.rank{r}.jsonl``,
``not_generated.rank{r}.jsonl``) and rank 0 merges them into the two files (``merge_parts``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from speechmapper_tune.checkpoint.atomic import atomic_write_json, atomic_write_text

SPAN_SOURCES = ("projector", "transcript", "asr")
GENERATIONS = "generations.jsonl"
NOT_GENERATED = "not_generated.jsonl"
SETTINGS = "generation_settings.json"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def settings_diff(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """``key: old -> new`` for every setting that differs (dotted keys)."""
    a, b = _flat(old), _flat(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def start_run(
    output_dir: Path, settings: Dict[str, Any], overwrite: bool = False, restart_if_changed: bool = False
) -> List[str]:
    """Resume the generations in ``output_dir`` only when they were made with ``settings``; with
    ``overwrite`` start over; with ``restart_if_changed`` start over only when they differ (returns what
    differed). Otherwise a mismatch is an error naming what differs."""
    files = [output_dir / NOT_GENERATED, *_part_files(output_dir)]
    return start_resumable_output(
        output_dir / GENERATIONS, output_dir / SETTINGS, settings, overwrite, files, "generate", restart_if_changed
    )


def start_resumable_output(
    rows: Path,
    recorded: Path,
    settings: Dict[str, Any],
    overwrite: bool,
    also_delete: Iterable[Path] = (),
    verb: str = "make",
    restart_if_changed: bool = False,
) -> List[str]:
    """A resumable rows file (generations, labels) goes on only under the settings it was started with,
    recorded beside it; ``overwrite`` deletes it, the record and ``also_delete`` first, and so does
    ``restart_if_changed`` where the settings differ (returned: each ``key: old -> new``)."""
    settings = json.loads(json.dumps(settings))  # as it reads back from JSON
    diff: List[str] = []
    if recorded.is_file():
        diff = settings_diff(json.loads(recorded.read_text(encoding="utf-8")), settings)
    elif rows.is_file() and rows.stat().st_size:
        diff = [f"no settings recorded ({recorded.name})"]
    if overwrite or (diff and restart_if_changed):
        for f in (rows, recorded, *also_delete):
            f.unlink(missing_ok=True)
    elif diff and recorded.is_file():
        raise ValueError(
            f"{rows} was made with other settings ({'; '.join(diff)}): pass overwrite=True "
            f"to {verb} it again, or choose another output_dir"
        )
    elif diff:
        raise ValueError(
            f"{rows} records no settings ({recorded.name}), so it may come from another run: pass "
            f"overwrite=True to {verb} it again, or choose another output_dir"
        )
    rows.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(recorded, settings)
    return diff if restart_if_changed and not overwrite else []


def write_not_generated(path: Path, items: Iterable[Tuple[str, str]]) -> None:
    """Every (id, reason) of an item generation did not produce; eval reports them."""
    atomic_write_text(path, "".join(json.dumps({"id": i, "reason": r}, ensure_ascii=False) + "\n" for i, r in items))


def read_not_generated(generations: Path) -> Optional[List[Dict]]:
    """The not-generated list beside a generations file (None when that run wrote none)."""
    path = Path(generations).with_name(NOT_GENERATED)
    return read_rows(path) if path.is_file() else None


def _whole_rows(path: Path) -> Tuple[List[Dict], bool]:
    """The rows of a JSON-lines file up to the first torn line (a killed job), and whether all were whole."""
    lines = path.read_text(encoding="utf-8").splitlines()
    good = []
    for line in lines:
        try:
            good.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return good, len(good) == len(lines)


def done_ids(path: Path) -> Set[str]:
    """Ids already written to a generations file; a torn last line (killed job) is dropped."""
    if not path.is_file():
        return set()
    good, whole = _whole_rows(path)
    if not whole:
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in good))
    return {r["id"] for r in good}


def part_file(output_dir: Path, name: str, rank: int) -> Path:
    """Rank ``rank``'s part of ``name`` (``GENERATIONS`` or ``NOT_GENERATED``) in a multi-process run."""
    return Path(output_dir) / name.replace(".jsonl", f".rank{rank}.jsonl")


def _part_files(output_dir: Path, name: Optional[str] = None) -> List[Path]:
    names = [name] if name else [GENERATIONS, NOT_GENERATED]
    return sorted(p for n in names for p in Path(output_dir).glob(n.replace(".jsonl", ".rank*.jsonl")))


def merge_parts(output_dir: Path, order: Sequence[str] = ()) -> int:
    """Move every rank's part rows into ``generations.jsonl`` and ``not_generated.jsonl``, then delete
    the parts; returns the generation rows added.

    A part's torn last line is dropped, and so is a row whose id is already generated (a rerun after
    a merge that was killed before the parts were deleted). New rows follow ``order`` (the manifest's
    ids), so N processes write the file one process would.
    """
    output_dir = Path(output_dir)
    gens = output_dir / GENERATIONS
    seen = done_ids(gens)
    rows = []
    for part in _part_files(output_dir, GENERATIONS):
        for row in _whole_rows(part)[0]:
            if row["id"] not in seen:
                seen.add(row["id"])
                rows.append(row)
    rank = {i: n for n, i in enumerate(order)}
    rows.sort(key=lambda r: rank.get(r["id"], len(rank)))
    missing = [r for part in _part_files(output_dir, NOT_GENERATED) for r in _whole_rows(part)[0]]
    for path, new in ((gens, rows), (output_dir / NOT_GENERATED, missing)):
        if new:
            append_rows(path, new)
    for part in _part_files(output_dir):
        part.unlink()
    return len(rows)


def append_rows(path: Path, rows: Iterable[Dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()


def read_rows(path: Path) -> List[Dict]:
    return [json.loads(l) for l in Path(path).read_text(encoding="utf-8").splitlines() if l.strip()]


class FasterWhisperTranscriber:
    """The cascade's ASR: faster-whisper (CTranslate2) on the original audio, greedy."""

    def __init__(self, model_dir: str, compute_type: str = "int8", language: Optional[str] = "en"):
        from faster_whisper import WhisperModel

        self.model = WhisperModel(model_dir, device="cpu", compute_type=compute_type)
        self.language = language

    def __call__(self, audio) -> str:
        segments, _ = self.model.transcribe(
            audio, language=self.language, beam_size=1, condition_on_previous_text=False
        )
        return " ".join(s.text.strip() for s in segments).strip()
