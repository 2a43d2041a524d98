"""SLUE-VoxPopuli (NER) and SLUE-VoxCeleb (sentiment) as lhotse CutSets, labels in the supervisions.

The released folders (``slue-voxpopuli_blind.tar.gz``, ``slue-voxceleb_blind.tar.gz``) hold:

* ``slue-voxpopuli/slue-voxpopuli_{fine-tune,dev}.tsv`` and ``slue-voxpopuli_test_blind.tsv``, columns
  ``id``, ``normalized_text``, ``speaker_id``, ``split``, ``normalized_ner`` (OntoNotes tags) and, in
  later releases, ``normalized_combined_ner`` (SLUE's 7 combined tags), plus raw-text columns; the NER
  columns are Python-style lists ``[['GPE', 12, 6], ...]`` of (tag, character start, length) in
  ``normalized_text``, or ``None``/``[]``. Audio: ``slue-voxpopuli/{split}/{id}.ogg``.
* ``slue-voxceleb/slue-voxceleb_{fine-tune,dev}.tsv`` and ``slue-voxceleb_test_blind.tsv``, columns
  ``id``, ``normalized_text``, ``speaker_id``, ``split``, ``start_second``, ``end_second``,
  ``sentiment``. Audio: the unsegmented ``slue-voxceleb/{split}_raw/{id}.flac`` (the utterance is
  ``start_second``..``end_second`` of it), or ``{split}/{id}.flac`` once slue-toolkit's
  ``create_manifest`` has cut it out.

(lhotse 1.33 has no SLUE recipe, hence this reader.) One cut per row, id = the row's ``id``, the
supervision's text = ``normalized_text`` (``""`` in the blind test set), language ``en``, and in its
``custom``: ``task`` (``ner``/``sa``), ``corpus``, ``split``, ``speaker_id`` and the label --
``ner``: ``[[tag, phrase], ...]`` in SLUE's combined tags (FAC, EVENT, WORK_OF_ART, PRODUCT,
LANGUAGE dropped, as SLUE scores), ``ner_answer``: the same as ``"TAG: phrase; ..."``
(:func:`speechmapper_tune.metrics.format_entities`); ``sentiment``: Negative/Neutral/Positive.
Rows labelled otherwise (``<mixed>``, ``Disagreement``) are left out and counted in the log, as
slue-toolkit leaves them out. A missing audio file is one bad item: its cut carries
``custom["audio_error"]``, as the other manifest readers do.
"""

from __future__ import annotations

import ast
import csv
import logging
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Union

from lhotse import CutSet, MonoCut, SupervisionSegment

from speechmapper_tune.corpus.manifest_io import AUDIO_ERROR, _placeholder_recording
from speechmapper_tune.errors import error_summary
from speechmapper_tune.metrics import SLUE_NER_TAGS, SLUE_RAW_TO_COMBINED, SLUE_SENTIMENTS, format_entities

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
VOXPOPULI, VOXCELEB = "slue-voxpopuli", "slue-voxceleb"
_TSV = re.compile(r"^(slue-voxpopuli|slue-voxceleb)_(fine-tune|dev|test)(_blind)?\.tsv$")


def slue_tsvs(path: PathLike) -> List[Path]:
    """The SLUE TSV files ``path`` names: itself when it is one, else those in the folder (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path] if _TSV.match(path.name) else []
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and _TSV.match(p.name))
    return []


def is_slue(path: PathLike) -> bool:
    """Whether ``path`` is a SLUE TSV file or a folder holding some (see the module docstring)."""
    return bool(slue_tsvs(path))


def load_slue(path: PathLike) -> CutSet:
    """All SLUE rows ``path`` names (one TSV, or every TSV of a released folder) as one CutSet."""
    tsvs = slue_tsvs(path)
    if not tsvs:
        raise ValueError(
            f"{path} is neither a SLUE TSV (slue-voxpopuli_dev.tsv, slue-voxceleb_fine-tune.tsv, ...) "
            "nor a folder holding one"
        )
    cuts: List[MonoCut] = []
    for tsv in tsvs:
        corpus = _TSV.match(tsv.name).group(1)
        cuts.extend(load_slue_voxpopuli(tsv) if corpus == VOXPOPULI else load_slue_voxceleb(tsv))
    return CutSet.from_cuts(cuts)


def _read_tsv(tsv: Path, required: tuple) -> List[Dict[str, str]]:
    with open(tsv, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{tsv}: no column {', '.join(missing)} (columns: {reader.fieldnames})")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{tsv} holds no row")
    return rows


def _split(tsv: Path) -> str:
    return _TSV.match(tsv.name).group(2)


def _recording(rec_id: str, audio: Path):
    """``(recording, error)``: the file's recording, or a placeholder and why it cannot be read."""
    from lhotse.audio import Recording

    try:
        if not audio.is_file():
            raise FileNotFoundError(f"audio file {audio} does not exist")
        return Recording.from_file(audio, recording_id=rec_id), None
    except Exception as e:  # lhotse backends raise various types on unreadable audio
        return _placeholder_recording(rec_id, audio), f"unreadable audio {audio}: {error_summary(e)}"


def parse_ner_spans(value: Optional[str], text: str, where: str) -> List[List]:
    """A SLUE NER cell -> ``[[tag, start, length], ...]``; ``None``/``[]``/empty -> ``[]``."""
    if value is None or value.strip() in ("", "None", "[]", "nan"):
        return []
    try:
        spans = ast.literal_eval(value.strip())  # a literal only: no code is run
        spans = [[str(t), int(s), int(n)] for t, s, n in spans]
    except (ValueError, SyntaxError, TypeError) as e:
        raise ValueError(f"{where}: NER labels {value!r} are not a list of [tag, start, length] ({e})") from None
    for tag, start, length in spans:
        if start < 0 or length < 1 or start + length > len(text):
            raise ValueError(
                f"{where}: NER span [{tag!r}, {start}, {length}] lies outside the text ({len(text)} characters)"
            )
    return spans


def _combined(spans: List[List], text: str, already_combined: bool, where: str) -> List[List[str]]:
    out = []
    for tag, start, length in spans:
        if already_combined:
            if tag not in SLUE_NER_TAGS:
                raise ValueError(f"{where}: combined NER tag {tag!r} is not one of {SLUE_NER_TAGS}")
            combined = tag
        else:
            if tag not in SLUE_RAW_TO_COMBINED:
                raise ValueError(
                    f"{where}: NER tag {tag!r} is not an OntoNotes tag SLUE maps ({sorted(SLUE_RAW_TO_COMBINED)})"
                )
            combined = SLUE_RAW_TO_COMBINED[tag]
        if combined is not None:
            out.append([combined, text[start : start + length]])
    return out


def load_slue_voxpopuli(tsv: PathLike) -> CutSet:
    """One SLUE-VoxPopuli TSV (NER) as a CutSet; audio from ``{tsv folder}/{split}/{id}.ogg``."""
    tsv = Path(tsv)
    rows = _read_tsv(tsv, ("id",))
    split, cuts = _split(tsv), []
    for lineno, row in enumerate(rows, start=2):  # line 1 is the header
        where = f"{tsv}, line {lineno}"
        text = row.get("normalized_text") or ""
        custom = {
            "task": "ner",
            "corpus": VOXPOPULI,
            "split": row.get("split") or split,
            "speaker_id": row.get("speaker_id"),
        }
        if row.get("normalized_combined_ner") not in (None, ""):
            custom["ner"] = _combined(parse_ner_spans(row["normalized_combined_ner"], text, where), text, True, where)
        elif "normalized_ner" in row:
            custom["ner"] = _combined(parse_ner_spans(row["normalized_ner"], text, where), text, False, where)
        if "ner" in custom:
            custom["ner_answer"] = format_entities(custom["ner"])
        rec, error = _recording(row["id"], tsv.parent / split / f"{row['id']}.ogg")
        if error:
            custom[AUDIO_ERROR] = error
        sup = SupervisionSegment(
            id=row["id"],
            recording_id=rec.id,
            start=0.0,
            duration=rec.duration,
            channel=0,
            text=text,
            language="en",
            speaker=row.get("speaker_id"),
            custom=custom,
        )
        cuts.append(
            MonoCut(id=row["id"], start=0.0, duration=rec.duration, channel=0, recording=rec, supervisions=[sup])
        )
    return CutSet.from_cuts(cuts)


def load_slue_voxceleb(tsv: PathLike) -> CutSet:
    """One SLUE-VoxCeleb TSV (sentiment) as a CutSet; audio from ``{split}/{id}.flac`` when cut out,
    else ``start_second``..``end_second`` of ``{split}_raw/{id}.flac``."""
    tsv = Path(tsv)
    rows = _read_tsv(tsv, ("id", "start_second", "end_second"))
    split, cuts, dropped = _split(tsv), [], {}
    for lineno, row in enumerate(rows, start=2):
        where = f"{tsv}, line {lineno}"
        custom = {
            "task": "sa",
            "corpus": VOXCELEB,
            "split": row.get("split") or split,
            "speaker_id": row.get("speaker_id"),
        }
        label = (row.get("sentiment") or "").strip()
        if label:
            if label not in SLUE_SENTIMENTS:
                dropped[label] = dropped.get(label, 0) + 1
                continue
            custom["sentiment"] = label
        try:
            start, end = float(row["start_second"]), float(row["end_second"])
        except ValueError:
            raise ValueError(
                f"{where}: start_second/end_second {row['start_second']!r}/{row['end_second']!r} are not numbers"
            ) from None
        if end <= start or start < 0:
            raise ValueError(f"{where}: end_second {end} must exceed start_second {start} >= 0")
        segmented = tsv.parent / split / f"{row['id']}.flac"
        if segmented.is_file():
            rec, error = _recording(row["id"], segmented)
            offset, duration = 0.0, rec.duration
        else:
            rec, error = _recording(row["id"], tsv.parent / f"{split}_raw" / f"{row['id']}.flac")
            offset, duration = start, end - start
            if not error and start >= rec.duration:
                error = (
                    f"segment {start}-{end} s starts after the end of {rec.sources[0].source} ({rec.duration:.2f} s)"
                )
            duration = min(duration, max(rec.duration - offset, 0.0)) if not error else 0.0
            offset = offset if not error else 0.0
        if error:
            custom[AUDIO_ERROR] = error
        sup = SupervisionSegment(
            id=row["id"],
            recording_id=rec.id,
            start=0.0,
            duration=duration,
            channel=0,
            text=row.get("normalized_text") or "",
            language="en",
            speaker=row.get("speaker_id"),
            custom=custom,
        )
        cuts.append(
            MonoCut(id=row["id"], start=offset, duration=duration, channel=0, recording=rec, supervisions=[sup])
        )
    if dropped:
        log.warning(
            f"{tsv}: left out {sum(dropped.values())} rows labelled outside {SLUE_SENTIMENTS} "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(dropped.items()))}), as slue-toolkit does"
        )
    if not cuts:
        raise ValueError(f"{tsv}: no row with a usable sentiment")
    return CutSet.from_cuts(cuts)
