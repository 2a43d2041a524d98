"""Synthesize a split plan with parallel workers, resumably, and write the manifests.

Layout under ``output_dir``::

    audio/{split}/{voice slug}/{utterance id}.wav   16 kHz mono PCM_16
    manifests/cuts_{split}.jsonl.gz                 lhotse CutSet (absolute audio paths)
    manifests/{split}.jsonl                          readable mirror (paths relative to it)
    corpus_info.json                                 sizes, hours, voices, skipped voices

Resume: an utterance whose wav exists and is valid (:func:`wav_duration_if_valid`) is not
synthesized again; every wav is written through ``atomic_path``, so a killed run leaves
no half-written wav, only stray ``.*.tmp`` files that the next run deletes (do not run two
builds on one ``output_dir`` at once). Work is cut into chunks of one voice (festival
synthesizes a whole chunk in one process) and spread over ``num_workers`` processes
(0 = in this process).
"""

from __future__ import annotations

import gzip
import json
import logging
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from lhotse import CutSet, MonoCut, Recording, SupervisionSegment
from lhotse.audio import AudioSource
from tqdm import tqdm

from speechmapper_tune.checkpoint.atomic import atomic_path, atomic_write_json, atomic_write_text
from speechmapper_tune.corpus.audio import TARGET_SR, wav_duration_if_valid, write_wav_16k
from speechmapper_tune.corpus.engines import Engine, SynthItem
from speechmapper_tune.corpus.plan import Utterance, check_engines, make_plan
from speechmapper_tune.corpus.sentences import load_wordnet_sentences
from speechmapper_tune.corpus.settings import CorpusSettings

log = logging.getLogger(__name__)


@dataclass
class SynthReport:
    """What one synthesis pass did."""

    synthesized: int = 0
    skipped_existing: int = 0
    failed: List[Tuple[str, str]] = field(default_factory=list)  # (utterance id, error)
    seconds: float = 0.0


def _synth_chunk(task: Tuple[Engine, str, List[Utterance]]) -> List[Tuple[str, Optional[str]]]:
    """Worker: synthesize one chunk of one voice; return (id, error or None) per utterance."""
    engine, output_dir, utterances = task
    results: List[Tuple[str, Optional[str]]] = []
    with tempfile.TemporaryDirectory(prefix="smt_tts_") as scratch:
        items = [
            SynthItem(u.tts_text, u.voice.name, u.params, os.path.join(scratch, f"{i}.wav"))
            for i, u in enumerate(utterances)
        ]
        errors = engine.synthesize(items)
        for utt, item, error in zip(utterances, items, errors):
            if error is None:
                try:
                    write_wav_16k(item.raw_path, Path(output_dir) / utt.audio_relpath)
                except (OSError, RuntimeError, ValueError) as e:
                    error = f"conversion failed: {e}"
            results.append((utt.id, error))
    return results


def _remove_stale_tmp(output_dir: Path) -> None:
    """Delete temporary files a killed run left behind (atomic_path names them .*.tmp)."""
    for tmp in (output_dir / "audio").rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def _chunks(todo: Sequence[Utterance], chunk_size: int) -> List[List[Utterance]]:
    by_voice: Dict[str, List[Utterance]] = {}
    for utt in todo:
        by_voice.setdefault(utt.voice.spec, []).append(utt)
    chunks = [utts[i : i + chunk_size] for _, utts in sorted(by_voice.items()) for i in range(0, len(utts), chunk_size)]
    return sorted(chunks, key=len, reverse=True)  # long chunks first: better load balance


def synthesize(
    plan: Dict[str, List[Utterance]],
    engines: Dict[str, Engine],
    output_dir: str,
    num_workers: int = 1,
    chunk_size: int = 32,
    progress: bool = True,
) -> SynthReport:
    """Synthesize every planned utterance that has no valid wav yet."""
    start = time.time()
    out = Path(output_dir).resolve()
    (out / "audio").mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out)
    all_utts = [u for utts in plan.values() for u in utts]
    todo = [u for u in all_utts if wav_duration_if_valid(out / u.audio_relpath) is None]
    report = SynthReport(skipped_existing=len(all_utts) - len(todo))
    log.info(
        "Synthesizing %d utterances (%d already done) with %d worker(s)",
        len(todo),
        report.skipped_existing,
        num_workers,
    )
    tasks = [(engines[c[0].voice.engine], str(out), c) for c in _chunks(todo, chunk_size)]
    bar = tqdm(total=len(todo), desc="TTS", unit="utt", disable=not progress)
    try:
        if num_workers == 0 or len(tasks) <= 1:
            results = map(_synth_chunk, tasks)
            _collect(results, report, bar)
        else:
            # fork: workers only run subprocesses and numpy; no torch state is touched.
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            with ctx.Pool(min(num_workers, len(tasks))) as pool:
                _collect(pool.imap_unordered(_synth_chunk, tasks), report, bar)
    finally:
        bar.close()
    report.seconds = time.time() - start
    if report.failed:
        log.warning("%d utterance(s) failed, e.g. %s: %s", len(report.failed), *report.failed[0])
    return report


def _collect(results, report: SynthReport, bar: tqdm) -> None:
    for chunk in results:
        for utt_id, error in chunk:
            if error is None:
                report.synthesized += 1
            else:
                report.failed.append((utt_id, error))
        bar.update(len(chunk))


def _cut(utt: Utterance, path: Path, num_samples: int) -> MonoCut:
    duration = num_samples / TARGET_SR
    recording = Recording(
        id=utt.id,
        sources=[AudioSource(type="file", channels=[0], source=str(path))],
        sampling_rate=TARGET_SR,
        num_samples=num_samples,
        duration=duration,
    )
    supervision = SupervisionSegment(
        id=utt.id,
        recording_id=utt.id,
        start=0.0,
        duration=duration,
        channel=0,
        text=utt.text,
        language="en",
        speaker=utt.voice.spec,
        # "written": the text as the engine read it (cased, punctuated), for written-form targets
        custom={
            "engine": utt.voice.engine,
            "voice": utt.voice.spec,
            "split": utt.split,
            "tts_params": dict(utt.params),
            "written": utt.tts_text,
        },
    )
    return MonoCut(id=utt.id, start=0.0, duration=duration, channel=0, recording=recording, supervisions=[supervision])


def write_manifests(plan: Dict[str, List[Utterance]], output_dir: str) -> Dict[str, CutSet]:
    """Write the lhotse CutSet and the JSON-lines mirror of each split (valid wavs only)."""
    out = Path(output_dir).resolve()
    manifest_dir = out / "manifests"
    manifest_dir.mkdir(parents=True, exist_ok=True)
    cutsets: Dict[str, CutSet] = {}
    for split, utts in plan.items():
        cuts, rows, missing = [], [], 0
        for utt in utts:
            path = out / utt.audio_relpath
            duration = wav_duration_if_valid(path)
            if duration is None:
                missing += 1
                continue
            cuts.append(_cut(utt, path, round(duration * TARGET_SR)))
            rows.append(
                {
                    "id": utt.id,
                    "audio": os.path.relpath(path, manifest_dir),
                    "duration": duration,
                    "text": utt.text,
                    "lang": "en",
                    "engine": utt.voice.engine,
                    "voice": utt.voice.spec,
                    "split": split,
                }
            )
        if missing:
            log.warning("Split %s: %d planned utterance(s) have no valid wav and are left out", split, missing)
        with atomic_path(manifest_dir / f"cuts_{split}.jsonl.gz") as tmp:
            with gzip.open(tmp, "wt", encoding="utf-8") as f:
                for cut in cuts:
                    f.write(json.dumps(cut.to_dict(), ensure_ascii=False) + "\n")
        atomic_write_text(
            manifest_dir / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        )
        cutsets[split] = CutSet.from_cuts(cuts)
    return cutsets


@dataclass
class CorpusResult:
    plan: Dict[str, List[Utterance]]
    report: SynthReport
    cutsets: Dict[str, CutSet]
    info: dict


def prepare_plan(settings: CorpusSettings):
    """Check engines and WordNet, read sentences, make the plan: the cheap, failing-early part.

    Returns ``(plan, engine_check, sentence_stats)``.
    """
    check = check_engines(settings)
    sentences, stats = load_wordnet_sentences(
        settings.wordnet_dir, settings.min_words, settings.max_words, settings.spell_out_numbers
    )
    plan = make_plan(sentences, settings, check.engines, check.voices)
    return plan, check, stats


def build_corpus(settings: CorpusSettings, prepared=None) -> CorpusResult:
    """Build (or resume) the whole corpus described by ``settings``."""
    plan, check, stats = prepared or prepare_plan(settings)
    report = synthesize(
        plan, check.engines, settings.output_dir, settings.num_workers, settings.chunk_size, settings.progress
    )
    if report.failed and not report.synthesized and not report.skipped_existing:
        raise RuntimeError(f"Every utterance failed to synthesize, e.g. {report.failed[0]}")
    cutsets = write_manifests(plan, settings.output_dir)
    info = {
        "seed": settings.seed,
        "sentence_filter": stats,
        "skipped": check.skipped,
        "synthesized": report.synthesized,
        "skipped_existing": report.skipped_existing,
        "failed": [f"{i}: {e}" for i, e in report.failed],
        "synthesis_seconds": round(report.seconds, 1),
        "splits": {
            split: {
                "utterances": len(cuts),
                "hours": round(sum(c.duration for c in cuts) / 3600, 4),
                "voices": sorted({v.spec for v in check.voices.get(split, [])}),
            }
            for split, cuts in cutsets.items()
        },
    }
    atomic_write_json(Path(settings.output_dir) / "corpus_info.json", info)
    return CorpusResult(plan=plan, report=report, cutsets=cutsets, info=info)
