"""Read any supported audio manifest as a lhotse CutSet (one supervision per cut).

Accepted forms of ``path`` (all give cuts whose supervision holds the transcript):

* a lhotse manifest: a CutSet (``.jsonl``/``.jsonl.gz``/``.json``), or a RecordingSet plus
  a SupervisionSet (pass the second as ``supervisions=``; if left out, the sibling named by
  lhotse's convention, ``*recordings*`` -> ``*supervisions*``, is used);
* a JSON-lines file, one object per utterance with ``id``, ``audio`` (a path; relative paths
  are resolved against the jsonl's folder), ``text`` (optional: a user's own audio has none)
  and optional ``lang``; other keys
  (``engine``, ``voice``, ``split``...) go to the supervision's ``custom``. The corpus
  builder's ``manifests/{split}.jsonl`` mirror is such a file;
* a LibriSpeech-style folder (``SPK/CHAPTER/SPK-CHAPTER-NNNN.flac`` + ``*.trans.txt``), either
  the corpus root holding parts like ``dev-clean`` or one part folder, read with lhotse's
  ``prepare_librispeech``; its language ``English`` becomes ``en``.
* one of the paper's ST/SQA/ASR corpora in its released layout (CoVoST 2, EuroParl-ST,
  Spoken-SQuAD, VoxPopuli, FLEURS), see :mod:`speechmapper_tune.corpus.paper_corpora`.
* SLUE-VoxPopuli (NER) / SLUE-VoxCeleb (sentiment): a ``slue-vox*_{split}.tsv`` or its released
  folder, labels in the supervision's ``custom``, see :mod:`speechmapper_tune.corpus.slue`.

Texts are returned as stored; callers normalize with ``speechmapper_tune.text``.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

from lhotse import CutSet, MonoCut, RecordingSet, SupervisionSegment, SupervisionSet, load_manifest
from lhotse.audio import Recording
from lhotse.utils import fastcopy

from speechmapper_tune.corpus import paper_corpora
from speechmapper_tune.errors import error_summary
from speechmapper_tune.textio import first_non_utf8_line, numbered

PathLike = Union[str, os.PathLike]
_PLAIN_KEYS = ("id", "audio")  # and "text", optional
_LIBRISPEECH_PARTS = (
    "dev-clean",
    "dev-other",
    "test-clean",
    "test-other",
    "train-clean-100",
    "train-clean-360",
    "train-other-500",
    "dev-clean-2",
    "train-clean-5",
)


def load_audio_manifest(
    path: PathLike, supervisions: Optional[PathLike] = None, corpus_format: Optional[str] = None
) -> CutSet:
    """Load ``path`` (see the module docstring for the forms) as a CutSet.

    ``corpus_format`` (or a ``FORMAT:`` prefix on ``path``) names one of the paper's corpus layouts
    (:data:`~speechmapper_tune.corpus.paper_corpora.CORPUS_FORMATS`); without it, those layouts are
    recognised from the path (see :mod:`speechmapper_tune.corpus.paper_corpora`)."""
    prefixed, rest = paper_corpora.split_format(str(path))
    if not (corpus_format or prefixed):
        from speechmapper_tune.corpus import slue  # here, not on top: slue imports this module

        if slue.is_slue(rest):  # SLUE NER / sentiment TSVs, or a folder of them
            return slue.load_slue(rest)
    corpus_format = corpus_format or prefixed or paper_corpora.detect_corpus_format(rest)
    if corpus_format:
        return paper_corpora.read_corpus(rest, corpus_format)
    path = Path(path)
    if path.is_dir():
        return _load_librispeech(path)
    if not path.is_file():
        raise FileNotFoundError(f"Audio manifest {path} does not exist")
    first = _first_row(path)
    if isinstance(first, dict) and all(k in first for k in _PLAIN_KEYS):
        return _load_plain_jsonl(path)
    try:
        manifest = load_manifest(path)
    except UnicodeDecodeError as e:
        raise (first_non_utf8_line(path) or ValueError(f"{path}: not UTF-8 text ({e})")) from None
    except Exception as e:  # lhotse raises several types for unknown content
        raise ValueError(
            f"{path} is neither a lhotse manifest nor a JSON-lines file with keys {_PLAIN_KEYS}: {e}"
        ) from e
    if isinstance(manifest, CutSet):
        return manifest
    return _from_recordings_and_supervisions(path, manifest, supervisions)


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _first_row(path: Path) -> Any:
    """The first JSON value of a JSON-lines file, or None when it is not one."""
    try:
        with _open_text(path) as f:
            for line in f:
                if line.strip():
                    return json.loads(line)
    except UnicodeDecodeError as e:  # every accepted manifest is UTF-8 text: name the line
        raise (first_non_utf8_line(path) or ValueError(f"{path}: not UTF-8 text ({e})")) from None
    except (ValueError, OSError):
        return None
    return None


def _from_recordings_and_supervisions(path: Path, manifest: Any, supervisions: Optional[PathLike]) -> CutSet:
    if supervisions is None:
        sibling = path.with_name(path.name.replace("recordings", "supervisions"))
        if isinstance(manifest, RecordingSet) and sibling != path and sibling.is_file():
            supervisions = sibling
        else:
            raise ValueError(
                f"{path} holds a {type(manifest).__name__}: pass the matching "
                "RecordingSet/SupervisionSet file as supervisions="
            )
    other = load_manifest(supervisions)
    pair = {type(m): m for m in (manifest, other)}
    if set(pair) != {RecordingSet, SupervisionSet}:
        raise ValueError(
            f"{path} and {supervisions} must be one RecordingSet and one SupervisionSet, got "
            f"{type(manifest).__name__} and {type(other).__name__}"
        )
    return _cuts_from(pair[RecordingSet], pair[SupervisionSet], f"{path} + {supervisions}")


def _cuts_from(recordings: RecordingSet, supervisions: Iterable[SupervisionSegment], where: str) -> CutSet:
    """One cut per supervision, spanning it, with the supervision's id as the cut id.

    (``CutSet.from_manifests`` would name cuts ``{recording}-{index}`` and keep whole
    recordings; here a cut id is the utterance id a transcript file uses.)
    """
    cuts = []
    for sup in supervisions:
        if sup.recording_id not in recordings:
            raise ValueError(f"{where}: supervision {sup.id!r} names unknown recording {sup.recording_id!r}")
        cuts.append(
            MonoCut(
                id=sup.id,
                start=sup.start,
                duration=sup.duration,
                channel=sup.channel,
                recording=recordings[sup.recording_id],
                supervisions=[sup],
            )
        )
    return CutSet.from_cuts(cuts)


def _row_error(path: Path, lineno: int, message: str) -> ValueError:
    return ValueError(f"{path}, line {lineno}: {message}")


AUDIO_ERROR = "audio_error"  # supervision custom field naming why an item's audio cannot be read


def _placeholder_recording(rec_id: str, audio: Path) -> Recording:
    from lhotse.audio import AudioSource

    source = AudioSource(type="file", channels=[0], source=str(audio))
    return Recording(id=rec_id, sources=[source], sampling_rate=16000, num_samples=0, duration=0.0)


def _load_plain_jsonl(path: Path) -> CutSet:
    recordings: List[Recording] = []
    segments: List[SupervisionSegment] = []
    seen: Dict[str, int] = {}
    with _open_text(path) as f:
        for lineno, line in numbered(path, f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise _row_error(path, lineno, f"invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise _row_error(path, lineno, f"expected a JSON object, got {type(row).__name__}")
            for key in _PLAIN_KEYS:
                if not isinstance(row.get(key), str) or not row[key]:
                    raise _row_error(path, lineno, f"field {key!r} must be a non-empty string")
            if not isinstance(row.setdefault("text", ""), str):
                raise _row_error(path, lineno, "field 'text' must be a string")
            if row["id"] in seen:
                raise _row_error(path, lineno, f"id {row['id']!r} already used on line {seen[row['id']]}")
            seen[row["id"]] = lineno
            lang = row.get("lang")
            if lang is not None and not isinstance(lang, str):
                raise _row_error(path, lineno, "field 'lang' must be a string")
            audio = Path(row["audio"])
            audio = audio if audio.is_absolute() else (path.parent / audio).resolve()
            custom = {k: v for k, v in row.items() if k not in ("id", "audio", "text", "lang", "duration")}
            # a missing or unreadable file is one bad item, not a bad manifest: keep a placeholder
            # carrying the reason, so a long job skips and reports it instead of dying
            try:
                if not audio.is_file():
                    raise FileNotFoundError(f"audio file {audio} does not exist")
                recording = Recording.from_file(audio, recording_id=row["id"])
            except Exception as e:  # lhotse backends raise various types on unreadable audio
                recording = _placeholder_recording(row["id"], audio)
                custom[AUDIO_ERROR] = f"unreadable audio {audio}: {error_summary(e)}"
            recordings.append(recording)
            segments.append(
                SupervisionSegment(
                    id=row["id"],
                    recording_id=row["id"],
                    start=0.0,
                    duration=recording.duration,
                    channel=0,
                    text=row["text"],
                    language=lang,
                    custom=custom or None,
                )
            )
    if not recordings:
        raise ValueError(f"{path} holds no utterance")
    return _cuts_from(RecordingSet.from_recordings(recordings), segments, str(path))


def _load_librispeech(folder: Path) -> CutSet:
    from lhotse.recipes.librispeech import prepare_librispeech

    parts = sorted(p.name for p in folder.iterdir() if p.name in _LIBRISPEECH_PARTS and p.is_dir())
    if parts:
        root = folder
    elif next(folder.rglob("*.trans.txt"), None) is not None:
        root, parts = folder.parent, [folder.name]  # the folder is one part
    else:
        raise ValueError(
            f"{folder} is not a LibriSpeech-style folder: no part folder "
            f"({', '.join(_LIBRISPEECH_PARTS[:4])}, ...) and no *.trans.txt file"
        )
    manifests = prepare_librispeech(root, dataset_parts=parts)
    cuts = []
    for part in parts:
        recordings = manifests[part]["recordings"]
        sups = [fastcopy(s, language="en") if s.language == "English" else s for s in manifests[part]["supervisions"]]
        cuts.extend(_cuts_from(recordings, sups, f"{root / part}"))
    if not cuts:
        raise ValueError(f"{folder}: the LibriSpeech transcripts name no existing .flac file")
    return CutSet.from_cuts(cuts)
