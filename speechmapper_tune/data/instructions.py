"""ST / SQA instruction rows from a feature manifest of the paper's corpora, for stage 2 and generation.

A row (one JSON line) is what :func:`speechmapper_tune.data.stage2.prepare_instruction_examples`
reads: ``{"id", "features": <cut id>, "task", "instruction", "answer", ...}``.

* ST (one row per cut with a translation): ``instruction`` is the paper's ST instruction in the
  target language (appendix B.3), looked up by ``target_lang`` (then by its base code: ``zh-CN`` ->
  ``zh``); ``answer`` is the translation; ``target_lang`` goes with it for scoring.
* SQA (one row per question about a cut): ``instruction`` is the question set into a template
  (B.3 phrases every task as a question, so the default is the question itself); ``answer`` is the
  first reference answer, ``answers`` all of them, ``context`` the cut's transcript (read by the
  SQA judge).

With ``with_transcript`` a row carries the cut's normalized transcript as ``transcript``, which gives that
example the stage-1 MSE term when stage 2 runs with sigma > 0. The translation, target language
and questions come from the supervision's ``custom`` fields written by
:mod:`speechmapper_tune.corpus.paper_corpora`; they survive feature extraction unchanged. For a
corpus without them (the TTS corpus), a translations file (:func:`load_translations`) gives each
cut its translation by transcript.
Plain Python (lhotse to read the manifest).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from lhotse import CutSet

from speechmapper_tune.checkpoint.atomic import atomic_write_text
from speechmapper_tune.corpus.paper_corpora import QAS, TARGET_LANG, TRANSLATION
from speechmapper_tune.data.manifest import SkipCounter
from speechmapper_tune.text import normalize_text
from speechmapper_tune.textio import first_non_utf8_line

TASKS = ("st", "sqa", "self")
QUESTION = "{question}"
SELF = "self"  # self-generated instruction data: a pooled instruction, the LLM's own answer from the transcript


def st_instruction(instructions: Mapping[str, str], target_lang: str) -> Optional[str]:
    """The instruction for ``target_lang``, or for its base code (``zh-CN`` -> ``zh``); None if neither."""
    if target_lang in instructions:
        return instructions[target_lang]
    return instructions.get(target_lang.split("-")[0].split("_")[0].lower())


def load_translations(path: str | Path) -> Dict[str, Tuple[str, str]]:
    """``{normalized source: (target_lang, translation)}`` from a JSON-lines file of
    ``{"source", "translation", "target_lang"}`` rows (other keys ignored). A missing file, a bad
    line or one source with two different translations is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"translations file not found: {path}")
    table: Dict[str, Tuple[str, str]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            key, entry = normalize_text(row["source"]), (str(row["target_lang"]), str(row["translation"]).strip())
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: expected a JSON object with source, translation, target_lang ({e!r})") from e
        if not key or not entry[1]:
            raise ValueError(f"{path}:{n}: empty source or translation")
        if table.get(key, entry) != entry:
            raise ValueError(f"{path}:{n}: {row['source']!r} has two different translations")
        table[key] = entry
    return table


def instruction_rows(
    cuts: Iterable,
    task: str,
    st_instructions: Optional[Mapping[str, str]] = None,
    sqa_instruction: str = QUESTION,
    with_transcript: bool = True,
    target_langs: Optional[Sequence[str]] = None,
    skipped: Optional[SkipCounter] = None,
    translations: Optional[Mapping[str, Tuple[str, str]]] = None,
) -> List[Dict]:
    """Instruction rows (see the module docstring) for the cuts of a feature manifest.

    ``target_langs`` (ST): keep only these target languages (None: all). ``translations``
    (:func:`load_translations`): for cuts whose manifest has no translation, looked up by the
    normalized transcript (the written form first). Cuts without features, without the task's
    fields, or with an empty answer are counted in ``skipped`` and left out; an ST target
    language without an instruction is an error naming it."""
    if task not in TASKS or task == SELF:
        raise ValueError(f"task={task!r}: expected st or sqa (self-generated rows: pooled_instruction_rows)")
    if task == "st" and not st_instructions:
        raise ValueError("task=st needs st_instructions: {target language: instruction} (paper B.3)")
    if task == "sqa" and sqa_instruction.count(QUESTION) != 1:
        raise ValueError(f"sqa_instruction must contain {QUESTION} exactly once: {sqa_instruction!r}")
    skipped = skipped if skipped is not None else SkipCounter()
    wanted = set(target_langs) if target_langs else None
    rows: List[Dict] = []
    for cut in cuts:
        if cut.features is None:
            skipped.add("no features attached", cut.id)
            continue
        sup = cut.supervisions[0] if cut.supervisions else None
        custom = (sup.custom or {}) if sup is not None else {}
        transcript = " ".join((s.text or "").strip() for s in cut.supervisions).strip()
        normalized = normalize_text(transcript)  # the form stage 1 trains on by default (data.target_text)
        extra = {"transcript": normalized} if with_transcript and normalized else {}
        if task == "st":
            lang, translation = custom.get(TARGET_LANG), custom.get(TRANSLATION)
            if (lang is None or translation is None) and translations:
                found = translations.get(normalize_text(custom.get("written") or "")) or translations.get(normalized)
                if found is None:
                    skipped.add("no translation in the manifest or the translations file", cut.id)
                    continue
                lang, translation = found
            if lang is None or translation is None:
                skipped.add("no translation in the manifest (not from an ST corpus)", cut.id)
                continue
            if wanted is not None and lang not in wanted:
                skipped.add(f"target language {lang} not in target_langs", cut.id)
                continue
            if not translation.strip():
                skipped.add("empty translation", cut.id)
                continue
            instruction = st_instruction(st_instructions, lang)
            if instruction is None:
                raise ValueError(
                    f"cut {cut.id}: no ST instruction for target language {lang!r} "
                    f"(st_instructions has {sorted(st_instructions)})"
                )
            rows.append(
                {
                    "id": cut.id,
                    "features": cut.id,
                    "task": "st",
                    "target_lang": lang,
                    "instruction": instruction,
                    "answer": translation.strip(),
                    **extra,
                }
            )
            continue
        qas = custom.get(QAS)
        if qas is None:
            skipped.add("no questions in the manifest (not from an SQA corpus)", cut.id)
            continue
        for qa in qas:
            answers = [a.strip() for a in qa.get("answers", []) if a.strip()]
            row_id = f"{cut.id}/{qa['id']}"
            if not answers:
                skipped.add("question without an answer", row_id)
                continue
            rows.append(
                {
                    "id": row_id,
                    "features": cut.id,
                    "task": "sqa",
                    "instruction": sqa_instruction.replace(QUESTION, qa["question"].strip()),
                    "question": qa["question"],
                    "answer": answers[0],
                    "answers": answers,
                    "context": transcript,
                    **extra,
                }
            )
    return rows


def build_instructions(
    manifest: str | Path,
    output: str | Path,
    task: str,
    st_instructions: Optional[Mapping[str, str]] = None,
    sqa_instruction: str = QUESTION,
    with_transcript: bool = True,
    target_langs: Optional[Sequence[str]] = None,
    translations: Optional[str | Path] = None,
) -> tuple[int, SkipCounter]:
    """Write ``output`` (JSON lines, atomically) from the feature manifest ``manifest``; return
    (rows written, skipped items). ``translations``: a file for :func:`load_translations`. No row
    at all is an error naming the manifest."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"feature manifest not found: {manifest}")
    table = load_translations(translations) if translations else None  # its errors come before the manifest's
    try:
        cuts = CutSet.from_file(str(manifest)) or []  # lhotse reads an empty manifest as None
        skipped = SkipCounter()
        rows = instruction_rows(
            cuts, task, st_instructions, sqa_instruction, with_transcript, target_langs, skipped, table
        )
    except UnicodeDecodeError as e:
        raise (first_non_utf8_line(manifest) or ValueError(f"cannot read feature manifest {manifest}: {e}")) from e
    except (KeyError, OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read feature manifest {manifest}: {e!r}") from e
    if not rows:
        raise ValueError(f"{manifest}: no {task} instruction row (skipped: {skipped.summary()})")
    atomic_write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows), skipped


# --- self-generated instruction data (behaviour alignment) -------------------------------------------------


def pooled_instruction_rows(
    cuts: Iterable,
    pool: Sequence[str],
    per_item: int = 1,
    seed: int = 0,
    skipped: Optional[SkipCounter] = None,
    max_items: Optional[int] = None,
) -> List[Dict]:
    """Rows asking ``per_item`` distinct instructions of ``pool`` about each cut's speech, without answers yet.

    ``{"id": "<cut id>#<k>", "features": <cut id>, "task": "self", "instruction", "transcript"}``: the
    transcript is the normalized one (the stage-1 MSE targets, what the behaviour-alignment teacher and
    ``speechmapper_generate span_source=transcript`` read). Which instructions a cut gets depends only on
    ``seed`` and the cut's id, so a row set grows without changing its earlier rows. Cuts without features
    or transcript are skipped; ``max_items``: the first N usable cuts."""
    pool = [str(p).strip() for p in pool]
    if not pool or any(not p for p in pool) or len(set(pool)) != len(pool):
        raise ValueError(f"pool: expected distinct non-empty instructions, got {pool!r}")
    if not 1 <= int(per_item) <= len(pool):
        raise ValueError(f"per_item={per_item}: expected 1..{len(pool)} (the pool's size)")
    skipped = skipped if skipped is not None else SkipCounter()
    rows: List[Dict] = []
    n = 0
    for cut in cuts:
        if max_items is not None and n >= int(max_items):
            break
        if cut.features is None:
            skipped.add("no features attached", cut.id)
            continue
        transcript = normalize_text(" ".join((s.text or "").strip() for s in cut.supervisions))
        if not transcript:
            skipped.add("no transcript (the LLM answers from it)", cut.id)
            continue
        n += 1
        chosen = random.Random(f"{seed}:{cut.id}").sample(range(len(pool)), int(per_item))
        rows += [
            {"id": f"{cut.id}#{k}", "features": cut.id, "task": SELF, "instruction": pool[k], "transcript": transcript}
            for k in chosen
        ]
    return rows


def shuffled_rows(rows: Sequence[Dict], seed: int = 0) -> List[Dict]:
    """The same rows (ids, instructions) with ``features`` pointing at another cut's speech, each row's at a
    different one (a seeded derangement): answered from the transcript, they give the chance-agreement
    reference of the agreement metric (an answer to the same instruction about another sentence)."""
    cuts = sorted({r["features"] for r in rows})
    if len(cuts) < 2:
        raise ValueError("a shuffled-transcript reference needs rows about at least 2 cuts")
    order = cuts[:]
    random.Random(seed).shuffle(order)
    other = {c: order[(i + 1) % len(order)] for i, c in enumerate(order)}  # a cycle: nobody keeps their own
    return [{**r, "features": other[r["features"]]} for r in rows]


def attach_answers(
    rows: Sequence[Dict], generations: Sequence[Dict], field: str = "answer", skipped: Optional[SkipCounter] = None
) -> List[Dict]:
    """``rows`` with ``field`` set to the generation's ``hypothesis`` of the same id (and ``<field>_stopped_by``);
    a row without a generation or with an empty answer is skipped (counted)."""
    skipped = skipped if skipped is not None else SkipCounter()
    by_id = {g["id"]: g for g in generations}
    out = []
    for r in rows:
        g = by_id.get(r["id"])
        if g is None:
            skipped.add(f"no generated {field}", r["id"])
        elif not str(g.get("hypothesis") or "").strip():
            skipped.add(f"empty generated {field}", r["id"])
        else:
            out.append({**r, field: str(g["hypothesis"]).strip(), f"{field}_stopped_by": g.get("stopped_by")})
    return out
