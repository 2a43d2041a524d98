"""The paper's evaluation and instruction-tuning corpora, read from their released layouts as lhotse CutSets.

One cut per utterance (per paragraph for Spoken-SQuAD); its supervision holds the source
transcript as ``text`` and the source language, and in ``custom`` what the instruction builder
(:mod:`speechmapper_tune.data.instructions`) turns into ST/SQA rows:

* ST corpora: ``translation`` (target text) and ``target_lang``;
* Spoken-SQuAD: ``qas``, a list of ``{"id", "question", "answers"}`` about the paragraph;
* every corpus: ``corpus`` and ``split``; ``written`` where the corpus keeps the transcript as
  written next to a normalized one (VoxPopuli, FLEURS).

Layouts (what :func:`detect_corpus_format` recognises; ``FORMAT:PATH`` names the format explicitly):

* ``covost2``: ``covost_v2.<src>_<tgt>.<split>.tsv`` as written by CoVoST's ``get_covost_splits.py``
  (columns ``path, sentence, translation, client_id``), the Common Voice ``clips/`` folder beside it;
* ``europarl_st``: a split folder ``<root>/<src>/<tgt>/<split>/`` with ``segments.lst``
  (``<speech> <start> <end>``), ``segments.<src>``, ``segments.<tgt>``, ``speeches.lst``; the speeches
  in ``<root>/<src>/audios/<speech>.m4a``. soundfile cannot decode AAC (.m4a): a ``<speech>.wav`` or
  ``.flac`` beside it (``ffmpeg -i X.m4a -ac 1 -ar 16000 X.flac``) is read instead, and a speech with
  only its .m4a is skipped with that reason;
* ``spoken_squad``: ``spoken_train-v1.1.json`` / ``spoken_test-v1.1.json`` (SQuAD v1.1 format, the
  context being the released CMU Sphinx transcript) with ``Spoken-SQuAD_audio/train_wav`` /
  ``dev_wav`` beside it, one ``<topic>_<paragraph>_<sentence>.wav`` per sentence. The sentences of a
  paragraph are joined once into ``<audio folder>_paragraphs/<topic>_<paragraph>.wav`` (kept, reused
  on the next read), since a question is about the whole paragraph;
* ``voxpopuli``: the ASR transcribed layout of VoxPopuli's ``get_asr_data.py``,
  ``transcribed_data/<lang>/asr_<split>.tsv`` with ``<year>/<id>.ogg`` beside it;
* ``fleurs``: the released ``<lang>/<split>.tsv`` (no header: id, file name, raw transcription,
  transcription, characters, samples, gender) with the ``audio/<split>.tar.gz`` archive unpacked
  into ``<lang>/audio/<split>/``.

lhotse's own recipes do not read these layouts (``prepare_fleurs`` and ``prepare_voxpopuli``
expect lhotse's download layouts, ``prepare_commonvoice`` has no translations), so the readers
here are thin: they parse the metadata, read each audio header with lhotse's
``Recording.from_file`` and build cuts. A malformed metadata row is an error naming its file and
line; a missing or unreadable audio file is skipped, counted by reason and logged.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import soundfile as sf
from lhotse import CutSet, MonoCut, SupervisionSegment
from lhotse.audio import Recording

from speechmapper_tune.checkpoint.atomic import atomic_path
from speechmapper_tune.errors import error_summary
from speechmapper_tune.textio import read_lines

log = logging.getLogger(__name__)
PathLike = Union[str, Path]

CORPUS_FORMATS = ("covost2", "europarl_st", "spoken_squad", "voxpopuli", "fleurs")
TRANSLATION, TARGET_LANG, QAS = "translation", "target_lang", "qas"  # supervision custom fields
SPLITS = ("train", "dev", "test")
# formats soundfile reads, tried in this order before an undecodable original (EuroParl-ST's .m4a)
DECODABLE_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
DURATION_TOLERANCE_S = 0.025  # as the feature extractor: lhotse's slack between a manifest and the audio read

_COVOST_NAME = re.compile(r"^covost_v2\.(?P<src>[A-Za-z-]+)_(?P<tgt>[A-Za-z-]+)\.(?P<split>train|dev|test)\.tsv$")
_VOXPOPULI_NAME = re.compile(r"^asr_(?P<split>train|dev|test)\.tsv$")
_FLEURS_NAME = re.compile(r"^(?P<split>train|dev|test)\.tsv$")
# the clean files only: the noisy-test variants (_WER44, _WER54) are not transcripts of the clean dev_wav audio
_SPOKEN_SQUAD_NAME = re.compile(r"^spoken_(?P<split>train|test)-v1\.1\.json$")
_SENTENCE_WAV = re.compile(r"^(\d+)_(\d+)_(\d+)\.wav$")


@dataclass
class Skipped:
    """Rows left out because their audio cannot be read: counted by reason, a few ids kept for the log."""

    where: str
    counts: Counter = field(default_factory=Counter)
    examples: Dict[str, List[str]] = field(default_factory=dict)

    def add(self, reason: str, item: str) -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(item)

    def total(self) -> int:
        return sum(self.counts.values())

    def log(self, kept: int) -> None:
        if self.counts:
            log.warning(
                f"{self.where}: skipped {self.total()} of {kept + self.total()} items: "
                + "; ".join(
                    f"{reason}: {n} (e.g. {', '.join(self.examples[reason])})"
                    for reason, n in self.counts.most_common()
                )
            )


def detect_corpus_format(path: PathLike) -> Optional[str]:
    """The corpus format of ``path`` from its name and surroundings, or None when it is none of them."""
    path = Path(path)
    if path.is_dir():
        return "europarl_st" if (path / "segments.lst").is_file() else None
    name = path.name
    if _COVOST_NAME.match(name):
        return "covost2"
    if _VOXPOPULI_NAME.match(name):
        return "voxpopuli"
    if _FLEURS_NAME.match(name) and (path.parent / "audio").is_dir():
        return "fleurs"
    if _SPOKEN_SQUAD_NAME.match(name):
        return "spoken_squad"
    return None


def split_format(manifest: str) -> Tuple[Optional[str], str]:
    """``"europarl_st:/data/en/de/dev"`` -> ``("europarl_st", "/data/en/de/dev")``; no known prefix -> ``(None, manifest)``."""
    fmt, sep, rest = str(manifest).partition(":")
    if sep and fmt in CORPUS_FORMATS and not Path(manifest).exists():
        return fmt, rest
    return None, str(manifest)


def read_corpus(path: PathLike, corpus_format: str) -> CutSet:
    """Read ``path`` in ``corpus_format`` (one of :data:`CORPUS_FORMATS`)."""
    readers: Dict[str, Callable[[Path], CutSet]] = {
        "covost2": read_covost2,
        "europarl_st": read_europarl_st,
        "spoken_squad": read_spoken_squad,
        "voxpopuli": read_voxpopuli,
        "fleurs": read_fleurs,
    }
    if corpus_format not in readers:
        raise ValueError(f"corpus format {corpus_format!r}: expected one of {CORPUS_FORMATS}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{corpus_format} corpus path {path} does not exist")
    return readers[corpus_format](path)


# ----------------------------------------------------------------------------- shared parts


def _tsv_rows(path: Path, header: Optional[Sequence[str]], escapechar: Optional[str] = None):
    """``(line number, {column: value})`` per data row of a tab-separated file, quotes taken literally.

    ``header``: the columns a header line must hold (extra columns are kept), or None when the file
    has no header and the caller maps fields itself (rows are then lists). Each line is parsed on
    its own, so an error names the exact line."""
    columns: Optional[List[str]] = None
    for lineno, line in read_lines(path):
        if not line.strip():
            continue
        fields = next(csv.reader([line], delimiter="\t", quoting=csv.QUOTE_NONE, escapechar=escapechar))
        if header is None:
            yield lineno, fields
            continue
        if columns is None:
            missing = [c for c in header if c not in fields]
            if missing:
                raise ValueError(
                    f"{path}, line {lineno}: the header lacks column(s) {missing} (expected {list(header)}, "
                    f"got {fields})"
                )
            columns = fields
            continue
        if len(fields) != len(columns):
            raise ValueError(
                f"{path}, line {lineno}: {len(fields)} tab-separated fields, the header has {len(columns)}"
            )
        yield lineno, dict(zip(columns, fields))
    if header is not None and columns is None:
        raise ValueError(f"{path}: empty file (expected a header with {list(header)})")


def _open_recording(audio: Path, rec_id: str) -> Tuple[Optional[Recording], str]:
    """The file's Recording, or None and why it cannot be read (the reason first, details in brackets)."""
    if not audio.is_file():
        return None, "audio file missing"
    try:
        return Recording.from_file(audio, recording_id=rec_id), ""
    except Exception as e:  # noqa: BLE001  (lhotse's backends raise various types on unreadable audio)
        return None, f"unreadable audio [{error_summary(e, 120)}]"


def _read_recording(audio: Path, rec_id: str, skipped: Skipped, item: str) -> Optional[Recording]:
    rec, why = _open_recording(audio, rec_id)
    if rec is None:
        reason, _, detail = why.partition(" [")  # counted by reason; the details go with the example ids
        skipped.add(reason, f"{item} ({audio}{': ' + detail[:-1] if detail else ''})")
    return rec


def _cut(
    cut_id: str,
    recording: Recording,
    text: str,
    language: Optional[str],
    custom: Dict,
    start: float = 0.0,
    duration: Optional[float] = None,
    speaker: Optional[str] = None,
    gender: Optional[str] = None,
) -> MonoCut:
    duration = recording.duration if duration is None else duration
    sup = SupervisionSegment(
        id=cut_id,
        recording_id=recording.id,
        start=0.0,
        duration=duration,
        channel=0,
        text=text,
        language=language,
        speaker=speaker or None,
        gender=gender or None,
        custom=custom,
    )  # supervision times are relative to the cut (lhotse)
    return MonoCut(id=cut_id, start=start, duration=duration, channel=0, recording=recording, supervisions=[sup])


def _finish(cuts: List[MonoCut], skipped: Skipped, where: Path) -> CutSet:
    skipped.log(len(cuts))
    if not cuts:
        reasons = f" (skipped: {dict(skipped.counts)})" if skipped.counts else ""
        raise ValueError(f"{where}: no utterance with readable audio{reasons}")
    log.info(f"{where}: {len(cuts)} utterances")
    return CutSet.from_cuts(cuts)


def _unique(seen: Dict[str, int], item_id: str, path: Path, lineno: int) -> None:
    if item_id in seen:
        raise ValueError(f"{path}, line {lineno}: id {item_id!r} already used on line {seen[item_id]}")
    seen[item_id] = lineno


# ----------------------------------------------------------------------------- CoVoST 2


def read_covost2(tsv: PathLike, clips_dir: Optional[PathLike] = None) -> CutSet:
    """A CoVoST 2 split file ``covost_v2.<src>_<tgt>.<split>.tsv`` and the Common Voice clips it names
    (``clips_dir``, default the ``clips/`` folder beside the file)."""
    tsv = Path(tsv)
    m = _COVOST_NAME.match(tsv.name)
    if not m:
        raise ValueError(
            f"{tsv}: a CoVoST 2 split file is named covost_v2.<src>_<tgt>.<split>.tsv "
            "(written by CoVoST's get_covost_splits.py)"
        )
    src, tgt, split = m["src"], m["tgt"], m["split"]
    clips = Path(clips_dir) if clips_dir is not None else tsv.parent / "clips"
    if not clips.is_dir():
        raise FileNotFoundError(
            f"{tsv}: Common Voice clips folder {clips} not found (CoVoST's tsv files sit in the "
            "Common Voice language folder, next to clips/)"
        )
    skipped, cuts, seen = Skipped(str(tsv)), [], {}
    for lineno, row in _tsv_rows(tsv, ("path", "sentence", "translation"), escapechar="\\"):
        if not row["path"]:
            raise ValueError(f"{tsv}, line {lineno}: empty 'path'")
        cut_id = Path(row["path"]).stem
        _unique(seen, cut_id, tsv, lineno)
        rec = _read_recording(clips / row["path"], cut_id, skipped, cut_id)
        if rec is None:
            continue
        custom = {TRANSLATION: row["translation"], TARGET_LANG: tgt, "corpus": "covost2", "split": split}
        cuts.append(_cut(cut_id, rec, row["sentence"], src, custom, speaker=row.get("client_id")))
    return _finish(cuts, skipped, tsv)


# ----------------------------------------------------------------------------- EuroParl-ST


def read_europarl_st(split_dir: PathLike) -> CutSet:
    """A EuroParl-ST split folder ``<root>/<src>/<tgt>/<split>/``: one cut per line of ``segments.lst``."""
    split_dir = Path(split_dir)
    tgt, src = split_dir.parent.name, split_dir.parent.parent.name
    audios = split_dir.parent.parent / "audios"
    lst = split_dir / "segments.lst"
    if not lst.is_file():
        raise FileNotFoundError(
            f"{split_dir}: not a EuroParl-ST split folder (<root>/<src>/<tgt>/<split>/ with segments.lst)"
        )
    texts = {}
    for lang in (src, tgt):
        f = split_dir / f"segments.{lang}"
        if not f.is_file():
            raise FileNotFoundError(
                f"{split_dir}: segments.{lang} not found (the folder layout <root>/<src>/<tgt>/"
                f"<split>/ gives src={src!r}, tgt={tgt!r})"
            )
        texts[lang] = [line for _, line in read_lines(f)]
    segments = []
    for lineno, line in read_lines(lst):
        parts = line.split()
        try:
            speech, start, end = parts[0], float(parts[1]), float(parts[2])
            if len(parts) != 3 or not 0 <= start < end:
                raise ValueError
        except (IndexError, ValueError):
            raise ValueError(
                f"{lst}, line {lineno}: expected '<speech> <start> <end>' with 0 <= start < end, got {line!r}"
            ) from None
        segments.append((lineno, speech, start, end))
    for lang, lines in texts.items():
        if len(lines) != len(segments):
            raise ValueError(
                f"{split_dir / f'segments.{lang}'} has {len(lines)} lines, {lst} has {len(segments)}: "
                "they must be line-aligned"
            )
    speeches_lst = split_dir / "speeches.lst"
    listed = {line.strip() for _, line in read_lines(speeches_lst) if line.strip()} if speeches_lst.is_file() else None
    if not audios.is_dir():
        raise FileNotFoundError(
            f"{split_dir}: audio folder {audios} not found (EuroParl-ST keeps <root>/<src>/audios/)"
        )
    split = split_dir.name
    skipped, cuts, recordings, per_speech = Skipped(str(split_dir)), [], {}, Counter()
    for k, (lineno, speech, start, end) in enumerate(segments):
        if listed is not None and speech not in listed:
            raise ValueError(f"{lst}, line {lineno}: speech {speech!r} is not in {speeches_lst}")
        per_speech[speech] += 1
        cut_id = f"{speech}_{per_speech[speech]:04d}"
        if speech not in recordings:
            recordings[speech] = _speech_recording(audios, speech)
        rec, why = recordings[speech]
        if rec is None:
            reason, _, detail = why.partition(" [")
            skipped.add(reason, f"{cut_id} ({audios}/{speech}{': ' + detail[:-1] if detail else ''})")
            continue
        if end > rec.duration + DURATION_TOLERANCE_S:
            skipped.add("segment ends after its speech audio", f"{cut_id} ({end:.2f} s > {rec.duration:.2f} s)")
            continue
        end = min(end, rec.duration)
        custom = {
            TRANSLATION: texts[tgt][k],
            TARGET_LANG: tgt,
            "corpus": "europarl_st",
            "split": split,
            "speech": speech,
        }
        cuts.append(_cut(cut_id, rec, texts[src][k], src, custom, start=start, duration=round(end - start, 6)))
    return _finish(cuts, skipped, split_dir)


def _speech_recording(audios: Path, speech: str) -> Tuple[Optional[Recording], str]:
    """A speech's Recording from the first decodable file ``audios/<speech>.<suffix>``, or None and why."""
    for suffix in DECODABLE_SUFFIXES:
        candidate = audios / f"{speech}{suffix}"
        if candidate.is_file():
            return _open_recording(candidate, speech)
    if (audios / f"{speech}.m4a").is_file():
        return None, (
            "only .m4a audio, which soundfile cannot decode (convert it beside the original, e.g. "
            "ffmpeg -i X.m4a -ac 1 -ar 16000 X.flac)"
        )
    return None, "audio file missing"


# ----------------------------------------------------------------------------- Spoken-SQuAD


def read_spoken_squad(
    json_path: PathLike, audio_dir: Optional[PathLike] = None, paragraph_dir: Optional[PathLike] = None
) -> CutSet:
    """A Spoken-SQuAD JSON file and its sentence wavs: one cut per paragraph, its questions in ``qas``.

    ``audio_dir``: the sentence wavs (default ``Spoken-SQuAD_audio/train_wav`` for the train file,
    ``dev_wav`` for the test file, beside the JSON); ``paragraph_dir``: where the joined paragraph
    wavs go (default ``<audio_dir>_paragraphs``)."""
    json_path = Path(json_path)
    m = _SPOKEN_SQUAD_NAME.match(json_path.name)
    split = m["split"] if m else None
    if audio_dir is None:
        if split is None:
            raise ValueError(
                f"{json_path}: not spoken_train-v1.1.json or spoken_test-v1.1.json, whose audio folders are "
                "known: call read_spoken_squad(path, audio_dir=<its sentence wavs>)"
            )
        sub = {"train": "train_wav", "test": "dev_wav"}[split]  # the test set was made from SQuAD's dev set
        candidates = [json_path.parent / "Spoken-SQuAD_audio" / sub, json_path.parent / sub]
        audio_dir = next((c for c in candidates if c.is_dir()), None)
        if audio_dir is None:
            raise FileNotFoundError(
                f"{json_path}: sentence audio folder not found (looked for "
                f"{', '.join(map(str, candidates))}; unzip Spoken-SQuAD_audio.zip and its {sub}.zip there)"
            )
    audio_dir = Path(audio_dir)
    paragraph_dir = (
        Path(paragraph_dir) if paragraph_dir is not None else audio_dir.with_name(audio_dir.name + "_paragraphs")
    )
    paragraphs = _squad_paragraphs(json_path)
    sentences: Dict[Tuple[int, int], Dict[int, Path]] = defaultdict(dict)
    for f in audio_dir.iterdir():
        s = _SENTENCE_WAV.match(f.name)
        if s:
            sentences[(int(s[1]), int(s[2]))][int(s[3])] = f
    skipped, cuts = Skipped(str(json_path)), []
    for (t, p), context, title, qas in paragraphs:
        cut_id = f"{t}_{p}"
        parts = sentences.get((t, p), {})
        if not parts:
            skipped.add("no sentence wav", f"{cut_id} ({audio_dir}/{cut_id}_0.wav)")
            continue
        if sorted(parts) != list(range(len(parts))):
            missing = sorted(set(range(max(parts) + 1)) - set(parts))
            skipped.add("sentence wavs missing inside the paragraph", f"{cut_id} (sentence(s) {missing})")
            continue
        try:
            joined = _join_paragraph([parts[i] for i in range(len(parts))], paragraph_dir / f"{cut_id}.wav")
        except (RuntimeError, ValueError) as e:  # soundfile raises RuntimeError/LibsndfileError on bad files
            skipped.add("unreadable sentence wav", f"{cut_id} ({error_summary(e, 120)})")
            continue
        rec = _read_recording(joined, cut_id, skipped, cut_id)
        if rec is None:
            continue
        custom = {
            QAS: qas,
            "title": title,
            "corpus": "spoken_squad",
            "split": split or json_path.stem,
            "sentences": len(parts),
        }
        cuts.append(_cut(cut_id, rec, context, "en", custom))
    return _finish(cuts, skipped, json_path)


def _squad_paragraphs(path: Path):
    """``((topic, paragraph), context, title, qas)`` per paragraph of a SQuAD v1.1-format file."""
    try:
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {e.lineno} column {e.colno}: invalid JSON ({e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise ValueError(f'{path}: expected a SQuAD v1.1 object {{"data": [{{"title", "paragraphs": [...]}}]}}')
    out = []
    for t, topic in enumerate(doc["data"]):
        where = f"{path}: data[{t}]"
        if not isinstance(topic, dict) or not isinstance(topic.get("paragraphs"), list):
            raise ValueError(f"{where}: expected an object with a 'paragraphs' list")
        for p, para in enumerate(topic["paragraphs"]):
            w = f"{where}.paragraphs[{p}]"
            if (
                not isinstance(para, dict)
                or not isinstance(para.get("context"), str)
                or not isinstance(para.get("qas"), list)
            ):
                raise ValueError(f"{w}: expected an object with a 'context' string and a 'qas' list")
            qas = []
            for q, qa in enumerate(para["qas"]):
                wq = f"{w}.qas[{q}]"
                if (
                    not isinstance(qa, dict)
                    or not isinstance(qa.get("question"), str)
                    or not isinstance(qa.get("id"), str)
                ):
                    raise ValueError(f"{wq}: expected an object with 'id' and 'question' strings")
                answers = qa.get("answers", [])
                if not isinstance(answers, list) or not all(
                    isinstance(a, dict) and isinstance(a.get("text"), str) for a in answers
                ):
                    raise ValueError(f"{wq} ({qa['id']}): 'answers' must be a list of objects with a 'text' string")
                qas.append({"id": qa["id"], "question": qa["question"], "answers": [a["text"] for a in answers]})
            out.append(((t, p), para["context"], str(topic.get("title", "")), qas))
    return out


def _join_paragraph(parts: List[Path], out: Path) -> Path:
    """The sentence wavs written end to end as one mono wav (reused when it already holds them all)."""
    infos = [sf.info(str(f)) for f in parts]
    rates = {i.samplerate for i in infos}
    if len(rates) != 1:
        raise ValueError(f"sentence wavs at different sampling rates {sorted(rates)}: {parts[0].name}...")
    total = sum(i.frames for i in infos)
    if out.is_file():
        try:
            if sf.info(str(out)).frames == total:
                return out
        except RuntimeError:
            pass  # a torn earlier write: rewritten below
    audio = [sf.read(str(f), dtype="float32", always_2d=True)[0].mean(axis=1) for f in parts]
    with atomic_path(out) as tmp:
        sf.write(str(tmp), np.concatenate(audio), rates.pop(), format="WAV", subtype="PCM_16")
    return out


# ----------------------------------------------------------------------------- VoxPopuli


def read_voxpopuli(tsv: PathLike) -> CutSet:
    """VoxPopuli's transcribed ASR data: ``transcribed_data/<lang>/asr_<split>.tsv`` and ``<year>/<id>.ogg``."""
    tsv = Path(tsv)
    m = _VOXPOPULI_NAME.match(tsv.name)
    if not m:
        raise ValueError(f"{tsv}: VoxPopuli's transcribed data is named asr_<split>.tsv (get_asr_data.py)")
    lang, split = tsv.parent.name, m["split"]
    skipped, cuts, seen = Skipped(str(tsv)), [], {}
    for lineno, row in _tsv_rows(tsv, ("id", "raw_text", "normalized_text")):
        cut_id = row["id"]
        if len(cut_id) < 4 or not cut_id[:4].isdigit():
            raise ValueError(f"{tsv}, line {lineno}: id {cut_id!r} does not start with the session year")
        _unique(seen, cut_id, tsv, lineno)
        rec = _read_recording(tsv.parent / cut_id[:4] / f"{cut_id}.ogg", cut_id, skipped, cut_id)
        if rec is None:
            continue
        custom = {"written": row["raw_text"], "corpus": "voxpopuli", "split": split}
        cuts.append(
            _cut(
                cut_id,
                rec,
                row["normalized_text"],
                lang,
                custom,
                speaker=row.get("speaker_id"),
                gender=row.get("gender"),
            )
        )
    return _finish(cuts, skipped, tsv)


# ----------------------------------------------------------------------------- FLEURS

_FLEURS_FIELDS = 7  # id, file name, raw transcription, transcription, characters, samples, gender


def read_fleurs(tsv: PathLike) -> CutSet:
    """A FLEURS split ``<lang>/<split>.tsv`` and its unpacked ``<lang>/audio/<split>/`` wavs."""
    tsv = Path(tsv)
    m = _FLEURS_NAME.match(tsv.name)
    if not m:
        raise ValueError(f"{tsv}: a FLEURS split file is named train.tsv, dev.tsv or test.tsv")
    split, folder = m["split"], tsv.parent.name  # e.g. en_us, cmn_hans_cn
    audio_dir = tsv.parent / "audio" / split
    if not audio_dir.is_dir():
        raise FileNotFoundError(
            f"{tsv}: audio folder {audio_dir} not found (unpack audio/{split}.tar.gz in {tsv.parent / 'audio'})"
        )
    skipped, cuts, seen = Skipped(str(tsv)), [], {}
    for lineno, fields in _tsv_rows(tsv, None):
        if len(fields) != _FLEURS_FIELDS:
            raise ValueError(
                f"{tsv}, line {lineno}: {len(fields)} tab-separated fields, FLEURS rows have "
                f"{_FLEURS_FIELDS} (id, file name, raw transcription, transcription, characters, "
                "samples, gender)"
            )
        sentence_id, fname, raw, text, _, _, gender = fields
        cut_id = Path(fname).stem
        _unique(seen, cut_id, tsv, lineno)
        rec = _read_recording(audio_dir / fname, cut_id, skipped, cut_id)
        if rec is None:
            continue
        custom = {"written": raw, "corpus": "fleurs", "split": split, "fleurs_lang": folder, "sentence_id": sentence_id}
        cuts.append(_cut(cut_id, rec, text, folder.split("_")[0], custom, gender=gender))
    return _finish(cuts, skipped, tsv)
