"""Label a transcript corpus with an LLM (SpeechLLM's synthetic labels): sentiment (sa) or named entities (ner).

    tune run speechmapper_annotate --config smollm2_135M/annotate_sa manifest=runs/corpus/tts_en/manifests/train.jsonl

Reads any manifest ``load_audio_manifest`` reads (a feature manifest, an audio manifest, the corpus
builder's JSON lines, SLUE TSVs) and asks the LLM, greedily, about each transcript as written
(``prompt.user`` holds ``{transcript}``). The reply becomes a label:

* ``sa``: the first of Negative / Neutral / Positive it names (``metrics.parse_sentiment``);
* ``ner``: its ``TAG: phrase; ...`` list (``metrics.parse_entities``, first paragraph only), keeping
  SLUE's combined tags whose phrase occurs in the transcript (as whole words, normalized); ``none``
  when the reply says so.

With ``labels=manifest`` no LLM runs: the labels come from the manifest's own annotation (a SLUE
manifest's ``ner_answer`` / ``sentiment`` supervision fields), so gold SLUE dev/test sets become the
same rows, for generation and scoring.

``${output_dir}/labels.jsonl`` holds one row per labelled item in the form stage 2's instruction
data reads (``speechmapper_tune.data.stage2.prepare_instruction_examples``): ``id``, ``features``
(the item's id: features are extracted under the same id), ``instruction`` (``instruction``), ``answer``
(the label: ``Positive``, ``PLACE: brussels; WHEN: monday``, ``none``), ``transcript`` (normalized:
the stage-1 MSE targets), plus ``task``, ``raw`` (the reply) and ``annotator``.
An item that gives no label (empty transcript, a reply naming no class / listing nothing usable)
is skipped and written to ``not_annotated.jsonl`` with the reason; ``annotate_summary.json`` counts
both. Rows are appended batch by batch: a killed run resumes where it stopped (a torn last line is
dropped), only with the same settings (``annotate_settings.json``; ``overwrite=True`` starts over).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils

from speechmapper_tune.checkpoint.atomic import atomic_write_json
from speechmapper_tune.config_schema import MISSING, TextLLMSettings, at_least, load_settings, settings
from speechmapper_tune.configs import resolve_config_argv, resolve_path_setting
from speechmapper_tune.corpus.manifest_io import load_audio_manifest
from speechmapper_tune.data.generation_data import append_rows, done_ids, start_resumable_output
from speechmapper_tune.data.manifest import written_text
from speechmapper_tune.dtypes import resolve_dtype
from speechmapper_tune.generation import greedy_generate
from speechmapper_tune.metrics import (
    NO_ENTITIES,
    SLUE_NER_TAGS,
    format_entities,
    parse_entities,
    parse_sentiment,
)
from speechmapper_tune.models.chat_format import ChatTokenizer
from speechmapper_tune.models.llms import embed_tokens, load_llm
from speechmapper_tune.text import normalize_text

log = utils.get_logger("INFO")
TASKS = ("sa", "ner")
LABELS, NOT_ANNOTATED, SETTINGS, SUMMARY = (
    "labels.jsonl",
    "not_annotated.jsonl",
    "annotate_settings.json",
    "annotate_summary.json",
)
SOURCES = ("llm", "manifest")
GOLD_FIELD = {"sa": "sentiment", "ner": "ner_answer"}  # the supervision custom field of a SLUE manifest (corpus.slue)


def label_from_reply(task: str, reply: str, transcript: str) -> Tuple[Optional[str], str]:
    """``(answer, note)``: the label a reply gives for ``transcript``, or ``(None, why not)``."""
    if not reply.strip():
        return None, "empty reply"
    if task == "sa":
        label = parse_sentiment(reply)
        return (label, "") if label else (None, "the reply names no sentiment (Negative/Neutral/Positive)")
    first = re.split(r"\n\s*\n", reply.strip(), maxsplit=1)[0]  # a small LLM keeps talking after the list
    entities, unparsed = parse_entities(first)
    if not entities:
        if first.strip().strip(" .").lower().startswith(NO_ENTITIES) or unparsed == 0:
            return NO_ENTITIES, ""
        return None, "the reply lists no TAG: phrase pair"
    words = f" {normalize_text(transcript)} "
    kept = [
        (t, p) for t, p in entities if t in SLUE_NER_TAGS and normalize_text(p) and f" {normalize_text(p)} " in words
    ]
    if not kept:
        return None, "no entity of the reply has a SLUE tag and a phrase of the transcript"
    dropped = len(entities) - len(kept)
    return format_entities(kept), f"{dropped} entities dropped" if dropped else ""


@settings
class AnnotatePrompt:
    user: str = MISSING  # holds {transcript}
    system: Optional[str] = None
    assistant_prefix: Optional[str] = None  # the forced answer prefix


@settings
class AnnotateSettings:
    """Every setting speechmapper_annotate reads (see configs/*/annotate_*.yaml)."""

    output_dir: str = MISSING
    manifest: str = MISSING  # an audio manifest (a SLUE one for labels=manifest)
    task: str = MISSING  # sa or ner
    labels: str = "llm"  # llm, or manifest: a SLUE manifest's own labels (no LLM runs)
    seed: int = 0
    llm: TextLLMSettings = dataclasses.field(default_factory=TextLLMSettings)
    prompt: AnnotatePrompt = dataclasses.field(default_factory=AnnotatePrompt)
    instruction: str = MISSING  # the instruction the speech model is trained with for this task
    max_new_tokens: int = at_least(1)
    batch_size: int = at_least(1)
    max_items: Optional[int] = None
    overwrite: bool = False  # start over instead of resuming the rows of the same settings


class AnnotateRecipe:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg  # AnnotateSettings
        self.output_dir = Path(cfg.output_dir)

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.task not in TASKS:
            raise ValueError(f"task={cfg.task!r}: expected one of {TASKS}")
        if "{transcript}" not in str(cfg.prompt.user):
            raise ValueError(f"prompt.user must contain {{transcript}}: {cfg.prompt.user!r}")
        if not str(cfg.instruction or "").strip():
            raise ValueError("instruction (what stage 2 asks the speech model, written in each row) is empty")
        self.source = cfg.labels
        if self.source not in SOURCES:
            raise ValueError(f"labels={self.source!r}: expected one of {SOURCES}")
        training.set_seed(seed=cfg.seed)
        cuts = load_audio_manifest(cfg.manifest)
        field = GOLD_FIELD[cfg.task]
        self.items = [
            (
                c.id,
                written_text(c.supervisions),
                next(((s.custom or {}).get(field) for s in c.supervisions if (s.custom or {}).get(field)), None),
            )
            for c in cuts
        ]
        if cfg.max_items is not None:
            self.items = self.items[: cfg.max_items]
        if self.source == "manifest":
            self._start(
                {"manifest": str(cfg.manifest), "task": cfg.task, "instruction": cfg.instruction, "labels": "manifest"},
                cfg.overwrite,
            )
            return
        ckpt, chat_format = TextLLMSettings.resolve(cfg.llm, resolve_path_setting)
        settings = {
            "manifest": str(cfg.manifest),
            "task": cfg.task,
            "instruction": cfg.instruction,
            "llm": {
                "name": cfg.llm.name,
                "checkpoint": ckpt,
                "chat_format": chat_format,
                "dtype": cfg.llm.dtype,
            },
            "prompt": OmegaConf.to_container(cfg.prompt, resolve=True),
            "max_new_tokens": cfg.max_new_tokens,
        }
        self._start(json.loads(json.dumps(settings)), cfg.overwrite)
        self.model, _, _ = load_llm(cfg.llm.name, ckpt, dtype=resolve_dtype(cfg.llm.dtype, "cpu", setting="llm.dtype"))
        self.chat = ChatTokenizer.from_dir(ckpt, chat_format=chat_format)

    def _start(self, settings: Dict, overwrite: bool) -> None:
        out = self.output_dir
        start_resumable_output(
            out / LABELS, out / SETTINGS, settings, overwrite, (out / NOT_ANNOTATED, out / SUMMARY), "label"
        )

    def _prompt(self, transcript: str) -> torch.Tensor:
        p = self.cfg.prompt
        msgs = [{"role": "system", "content": p.system}] if p.system else []
        msgs.append({"role": "user", "content": str(p.user).replace("{transcript}", transcript)})
        ids = self.chat.render(msgs) + self.chat.encode_text(p.assistant_prefix or "")
        return embed_tokens(self.model, torch.tensor(ids))

    @torch.no_grad()
    def run(self) -> None:
        cfg = self.cfg
        labels_path, missing_path = self.output_dir / LABELS, self.output_dir / NOT_ANNOTATED
        done = done_ids(labels_path) | done_ids(missing_path)
        todo = [it for it in self.items if it[0] not in done]
        log.info(
            f"{len(self.items)} items ({len(self.items) - len(todo)} already done), task {cfg.task}, labels from {self.source}"
        )
        empty = [it for it in todo if not normalize_text(it[1])]
        append_rows(missing_path, [{"id": it[0], "reason": "empty transcript"} for it in empty])
        todo = [it for it in todo if normalize_text(it[1])]
        if self.source == "manifest":
            append_rows(labels_path, [self._row(i, t, gold, "manifest", None) for i, t, gold in todo if gold])
            append_rows(
                missing_path,
                [
                    {"id": i, "reason": f"no {GOLD_FIELD[cfg.task]} label in the manifest"}
                    for i, _, gold in todo
                    if not gold
                ],
            )
            todo = []
        bs = cfg.batch_size
        for s in range(0, len(todo), bs):
            chunk = todo[s : s + bs]
            results = greedy_generate(
                self.model,
                [self._prompt(t) for _, t, _ in chunk],
                max_new_tokens=cfg.max_new_tokens,
                stop_ids=self.chat.stop_ids,
            )
            rows, bad = [], []
            for (item_id, text, _), res in zip(chunk, results):
                reply = self.chat.decode(res.ids, skip_special_tokens=True)
                answer, note = label_from_reply(cfg.task, reply, text)
                if answer is None:
                    bad.append({"id": item_id, "reason": note, "raw": reply})
                    continue
                rows.append(
                    {**self._row(item_id, text, answer, cfg.llm.name, reply), **({"note": note} if note else {})}
                )
            append_rows(labels_path, rows)
            append_rows(missing_path, bad)
            log.info(
                f"{min(s + bs, len(todo))}/{len(todo)} items: {len(rows)} labelled, {len(bad)} skipped in this batch"
            )
        self._summary(labels_path, missing_path)

    def _row(self, item_id: str, text: str, answer: str, annotator: str, reply: Optional[str]) -> Dict:
        return {
            "id": item_id,
            "features": item_id,
            "task": self.cfg.task,
            "instruction": self.cfg.instruction,
            "answer": answer,
            "transcript": normalize_text(text),
            "raw": reply,
            "annotator": annotator,
        }

    def _summary(self, labels_path: Path, missing_path: Path) -> None:
        labelled = (
            [json.loads(l) for l in labels_path.read_text(encoding="utf-8").splitlines()]
            if labels_path.is_file()
            else []
        )
        skipped = (
            [json.loads(l) for l in missing_path.read_text(encoding="utf-8").splitlines()]
            if missing_path.is_file()
            else []
        )
        answers = Counter(
            r["answer"] if self.cfg.task == "sa" else ("none" if r["answer"] == NO_ENTITIES else "entities")
            for r in labelled
        )
        tags = Counter(
            p.split(":", 1)[0] for r in labelled if r["answer"] != NO_ENTITIES for p in r["answer"].split("; ")
        )
        summary = {
            "task": self.cfg.task,
            "items": len(self.items),
            "labelled": len(labelled),
            "skipped": len(skipped),
            "skipped_reasons": dict(Counter(r["reason"] for r in skipped)),
            "answers": dict(answers),
            **({"tags": dict(tags)} if self.cfg.task == "ner" else {}),
        }
        atomic_write_json(self.output_dir / SUMMARY, summary)
        log.info(
            f"Labelled {len(labelled)}, skipped {len(skipped)} ({summary['skipped_reasons']}); "
            f"answers {dict(answers)}; wrote {labels_path}"
        )

    def cleanup(self) -> None:
        pass


SCHEMA = AnnotateSettings  # this recipe's schema (tests load every packaged config through it)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:  # N processes would each label every item into the same files
        raise ValueError(
            f"speechmapper_annotate runs in one process (WORLD_SIZE={world_size}): run it without --nproc_per_node"
        )
    cfg = load_settings(cfg, AnnotateSettings, "speechmapper_annotate")  # a misspelt or unknown setting stops here
    recipe = AnnotateRecipe(cfg)
    recipe.setup()
    recipe.run()
    recipe.cleanup()


if __name__ == "__main__":
    from speechmapper_tune.errors import run_recipe

    # an error prints its message first, in one line (SPEECHMAPPER_DEBUG=1: and the traceback)
    sys.exit(run_recipe("speechmapper_annotate", resolve_config_argv, recipe_main))
