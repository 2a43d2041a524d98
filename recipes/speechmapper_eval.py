"""Score generations: ASR WER/CER; ST BLEU/chrF, COMET and target-language adherence; SQA accuracy by
LLM judges; SLUE NER F1 / label F1 and sentiment macro F1.

    tune run speechmapper_eval --config eval/default \
        'generations={stage1_test: runs/gen/s1/generations.jsonl, stage2_test: runs/gen/s2/generations.jsonl}'

Writes ``${output_dir}/results.json`` and ``${output_dir}/results.md`` (one row per named
generations file and task) and prints the table. Every metric is reported on all items and
without the items flagged as stuck decodes (paper B.2), with the count flagged. Only items with a
reference are scored; the others are counted (``no_reference``), and so are the manifest items the
generation run did not produce (``not_generated``, with reasons, from ``not_generated.jsonl``):
a score on a subset says so.

* ST: per target language, BLEU/chrF (sacrebleu, signature kept), the share of outputs detected as
  the target language and as English (langdetect, paper table 9), and with ``comet.model_dir`` set
  COMET x 100 from a local model folder. Its source is the reference transcription (paper): the
  written transcript of the row's id in ``comet.sources`` (a feature or audio manifest), else the
  row's ``transcript`` or ``source``; rows with none are counted, not scored. A COMET asked for but
  not usable stops the run before any scoring.
* SQA: each judge of ``judges`` (local LLMs, loaded one at a time) answers a yes/no equivalence
  prompt per item; each judge's accuracy and their mean (``accuracy``) are reported (the paper
  averages four judges). The single ``judge`` key of older configs is a one-judge list.
* NER (SLUE-VoxPopuli): reference and answer in the format ``TAG: phrase; TAG: phrase`` (``none``
  for no entity), see ``speechmapper_tune.metrics.parse_entities``; micro F1 over (tag, phrase)
  pairs (``f1``) and over tags only (``label_f1``), as slue-toolkit.
* SA (SLUE-VoxCeleb): reference Negative/Neutral/Positive; macro F1, weighted F1, accuracy.
* Unseen instructions (``self`` rows, ``instructions/self_heldout``): the agreement metric, chrF and exact
  match of each answer against the same LLM's answer from the transcript (the row's reference), and on the
  same items the chance level: the LLM's answer to another utterance's transcript (``shuffled_answer``)
  scored the same way. A cascade's generations on the same rows are scored like any system; the share of
  the gap closed is ``(system - chance) / (cascade - chance)``. A table of its own in results.md.
"""

from __future__ import annotations

import gc
import json
import os
import sys
from collections import Counter
from dataclasses import field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from torchtune import config, utils

from speechmapper_tune.checkpoint.atomic import atomic_write_json, atomic_write_text
from speechmapper_tune.config_schema import MISSING, at_least, load_settings, settings
from speechmapper_tune.configs import resolve_config_argv
from speechmapper_tune.data.generation_data import SETTINGS, read_not_generated, read_rows
from speechmapper_tune.metrics import (
    agreement_scores,
    asr_scores,
    judge_prompt,
    language_shares,
    load_comet,
    ner_scores,
    parse_entities,
    parse_judgement,
    parse_sentiment,
    sentiment_scores,
    st_scores,
    with_and_without,
)

log = utils.get_logger("INFO")


@settings
class JudgeLLM:
    name: Optional[str] = None  # needed: a load_llm name
    checkpoint: Any = None  # needed: a folder, or a _component_ returning one
    chat_format: Optional[str] = None  # needed
    dtype: Optional[str] = None  # default auto: bf16 only where computed natively


@settings
class JudgeSettings:
    """One SQA judge (an entry of ``judges``, or ``judge``)."""

    llm: JudgeLLM = field(default_factory=JudgeLLM)
    name: Optional[str] = None  # its name in the results; default llm.name (numbered when repeated)
    batch_size: int = at_least(1, 8)


@settings
class CometSettings:
    model_dir: Any = None  # a local COMET folder (hparams.yaml + checkpoints/model.ckpt)
    batch_size: int = at_least(1, 16)
    gpus: int = at_least(0, 0)
    sources: Optional[str] = None  # the manifest whose transcripts (as written) are COMET's source side


@settings
class EvalSettings:
    """Every setting speechmapper_eval reads (see configs/eval/default.yaml)."""

    output_dir: str = MISSING
    generations: Dict[str, str] = field(default_factory=dict)  # name -> generations.jsonl: one row each
    judges: List[Any] = field(default_factory=list)  # JudgeSettings each, checked by judge_specs
    judge: Optional[Any] = None  # one judge, as in older configs (set judges or judge)
    comet: Optional[CometSettings] = None


def judge_specs(cfg: DictConfig) -> List[Dict[str, Any]]:
    """The judges to run: ``judges`` (a list), or the older single ``judge``; each checked for unknown
    keys and a ``llm`` with name, checkpoint and chat_format. Unique display names (``name``, else
    ``llm.name``, numbered when repeated)."""
    many, one = cfg.judges, cfg.judge
    if many and one:
        raise ValueError("set judges (a list) or judge (one judge), not both")
    specs = (
        OmegaConf.to_container(many, resolve=True)
        if many
        else ([OmegaConf.to_container(one, resolve=True)] if one else [])
    )
    if not isinstance(specs, list):
        raise ValueError(
            f"judges must be a list of judges ({{llm: {{name, checkpoint, chat_format}}, batch_size}}), got {specs!r}"
        )
    out, names = [], Counter()
    for i, spec in enumerate(specs):
        where = "judge" if one else f"judges[{i}]"
        if not isinstance(spec, dict) or not isinstance(spec.get("llm"), dict):
            raise ValueError(f"{where} must be a mapping with an llm section, got {spec!r}")
        spec = OmegaConf.to_container(load_settings(spec, JudgeSettings, f"speechmapper_eval {where}"), resolve=True)
        missing = [k for k in ("name", "checkpoint", "chat_format") if not spec["llm"].get(k)]
        if missing:
            raise ValueError(f"{where}.llm needs {', '.join(missing)}")
        base = str(spec.get("name") or spec["llm"]["name"])
        names[base] += 1
        out.append({**spec, "name": base, "where": where})
    for base, n in names.items():  # number repeated names: judge_1, judge_2
        if n > 1:
            k = 0
            for spec in out:
                if spec["name"] == base:
                    k += 1
                    spec["name"] = f"{base}_{k}"
    return out


class EvalRecipe:
    def __init__(self, cfg: DictConfig):
        self.cfg = load_settings(cfg, EvalSettings, "speechmapper_eval")  # a misspelt or unknown setting stops here
        self.output_dir = Path(self.cfg.output_dir)

    def setup(self) -> None:
        gens = OmegaConf.to_container(self.cfg.generations, resolve=True)
        if not gens:
            raise ValueError("set generations={name: path/to/generations.jsonl, ...}")
        self.sets, self.missing, self.settings = {}, {}, {}
        for name, path in gens.items():
            if not Path(path).is_file():
                raise FileNotFoundError(f"generations[{name}]: {path} not found")
            self.sets[name] = read_rows(Path(path))
            self.missing[name] = read_not_generated(Path(path))
            settings = Path(path).with_name(SETTINGS)
            self.settings[name] = json.loads(settings.read_text(encoding="utf-8")) if settings.is_file() else None
        self.judges = judge_specs(self.cfg)
        self.comet = None
        comet = self.cfg.comet
        if comet is not None:  # asked for: a missing package or model folder stops here, before any scoring
            self.comet = load_comet(comet.model_dir, "comet.model_dir", comet.batch_size, comet.gpus)
        self.sources = {}
        if comet is not None and comet.sources:  # the utterances' transcripts as written: COMET's source side
            from speechmapper_tune.corpus.manifest_io import load_audio_manifest
            from speechmapper_tune.data.manifest import written_text

            self.sources = {c.id: written_text(c.supervisions) for c in load_audio_manifest(comet.sources)}

    def run(self) -> None:
        groups = []
        for name, rows in self.sets.items():
            missing = self.missing[name]
            if missing:
                reasons = Counter(m["reason"] for m in missing)
                log.warning(
                    f"{name}: {len(missing)} manifest items were not generated, so not scored: "
                    + "; ".join(f"{r}: {n}" for r, n in reasons.most_common())
                )
            for task in sorted({r.get("task", "asr") for r in rows}):
                items = [r for r in rows if r.get("task", "asr") == task]
                groups.append((name, task, items, [r for r in items if r.get("reference")]))
        verdicts = self._judge([scored for _, task, _, scored in groups if task == "sqa"])
        results: List[Dict] = []
        for name, task, items, scored in groups:
            score = self._sqa(scored, verdicts) if task == "sqa" else self._score(task, scored)
            missing = self.missing[name]
            results.append(
                {
                    "name": name,
                    "task": task,
                    **score,
                    "no_reference": len(items) - len(scored),
                    "not_generated": None if missing is None else len(missing),
                    "not_generated_reasons": dict(Counter(m["reason"] for m in missing or [])),
                    "settings": self.settings[name],
                }
            )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.output_dir / "results.json", results)
        table = markdown_table(results) + agreement_table(results)
        atomic_write_text(self.output_dir / "results.md", table)
        print(table)
        log.info(f"Wrote {self.output_dir / 'results.json'} and results.md")

    def _score(self, task: str, items: List[Dict]) -> Dict:
        stuck = sum("stuck" in (r.get("flags") or []) for r in items)
        if task == "asr":
            wer = with_and_without(items, lambda r, h: asr_scores(r, h)["wer"])
            cer = with_and_without(items, lambda r, h: asr_scores(r, h)["cer"])
            return {
                "n": wer["num_items"],
                "stuck": wer["num_flagged"],
                "wer": wer["all"],
                "cer": cer["all"],
                "wer_without_stuck": wer["without"],
                "cer_without_stuck": cer["without"],
            }
        if task == "st":
            langs = sorted({r.get("target_lang") for r in items if r.get("target_lang")})
            out = {"n": len(items), "stuck": stuck, "by_language": {}}
            for lang in langs or [None]:
                sub = [r for r in items if r.get("target_lang") == lang] if lang else items
                refs, hyps = [r["reference"] for r in sub], [r["hypothesis"] for r in sub]
                s = st_scores(refs, hyps, lang or "en")
                shares = language_shares(hyps, lang) if lang else {}
                out["by_language"][lang or "?"] = {
                    "bleu": s["bleu"],
                    "chrf": s["chrf"],
                    "bleu_signature": s["bleu_signature"],
                    "target_share": shares.get("target"),
                    "english_share": shares.get("english"),
                    **self._comet(sub),
                }
            return out
        if task == "ner":
            refs = [parse_entities(r["reference"])[0] for r in items]
            parsed = [parse_entities(r["hypothesis"]) for r in items]
            s = ner_scores(refs, [p[0] for p in parsed])
            clean = [i for i, r in enumerate(items) if "stuck" not in (r.get("flags") or [])]
            without = ner_scores([refs[i] for i in clean], [parsed[i][0] for i in clean]) if clean else None
            return {
                "n": len(items),
                "stuck": stuck,
                "f1": s["f1"],
                "label_f1": s["label_f1"],
                "precision": s["precision"],
                "recall": s["recall"],
                "per_tag": s["per_tag"],
                "unparsed_parts": sum(p[1] for p in parsed),
                "f1_without_stuck": without["f1"] if without else None,
            }
        if task == "sa":
            bad = [r["id"] for r in items if parse_sentiment(r["reference"]) is None]
            if bad:
                raise ValueError(
                    f"{len(bad)} sa rows have a reference that is not Negative/Neutral/Positive "
                    f"(e.g. {', '.join(map(str, bad[:5]))})"
                )
            s = sentiment_scores([r["reference"] for r in items], [r["hypothesis"] for r in items])
            return {
                "n": len(items),
                "stuck": stuck,
                "f1": s["macro_f1"],
                "weighted_f1": s["weighted_f1"],
                "accuracy": s["accuracy"],
                "per_class": s["per_class"],
                "unparsed": s["unparsed"],
            }
        if task == "self":
            return agreement(items)
        return {"n": len(items), "note": f"no metric for task {task!r}"}

    def _comet(self, items: List[Dict]) -> Dict:
        if self.comet is None:
            return {}
        source = {id(r): self.sources.get(r["id"]) or r.get("transcript") or r.get("source") for r in items}
        sourced = [r for r in items if source[id(r)]]
        s = self.comet(
            [source[id(r)] for r in sourced], [r["reference"] for r in sourced], [r["hypothesis"] for r in sourced]
        )
        if len(sourced) < len(items):
            log.warning(
                f"COMET: {len(items) - len(sourced)} of {len(items)} ST rows have no source transcript "
                "(in comet.sources, or the row's transcript/source), not scored"
            )
        return {"comet": s["comet"], "comet_n": s["num_items"], "comet_no_source": len(items) - len(sourced)}

    def _judge(self, groups: List[List[Dict]]) -> Dict[str, Dict[int, Optional[bool]]]:
        """Every judge's verdict on every SQA row (keyed by the row's identity), one judge in memory at a time."""
        items = [r for g in groups for r in g]
        verdicts: Dict[str, Dict[int, Optional[bool]]] = {}
        if not items:
            return verdicts
        for spec in self.judges:
            log.info(f"judge {spec['name']}: {len(items)} SQA items")
            judge = _Judge(spec)
            verdicts[spec["name"]] = {id(r): v for r, v in zip(items, judge(items))}
            del judge
            gc.collect()
        return verdicts

    def _sqa(self, items: List[Dict], verdicts: Dict[str, Dict[int, Optional[bool]]]) -> Dict:
        out = {"n": len(items), "stuck": sum("stuck" in (r.get("flags") or []) for r in items)}
        if not self.judges:
            return {**out, "accuracy": None, "note": "no judge configured (set judges: [{llm: ...}])"}
        per = {}
        for name, by_row in verdicts.items():
            mine = [by_row[id(r)] for r in items]
            ok = [v for v in mine if v is not None]
            per[name] = {"accuracy": 100.0 * sum(ok) / len(ok) if ok else None, "unparsed_judgements": mine.count(None)}
        accs = [p["accuracy"] for p in per.values() if p["accuracy"] is not None]
        return {
            **out,
            "accuracy": sum(accs) / len(accs) if accs else None,
            "judges": per,
            "unparsed_judgements": sum(p["unparsed_judgements"] for p in per.values()),
        }

    def cleanup(self) -> None:
        pass


class _Judge:
    """A local judge LLM (torchtune-loaded) answering the yes/no equivalence prompt (paper: BERGEN)."""

    def __init__(self, spec: Dict[str, Any]):

        from speechmapper_tune.dtypes import resolve_dtype
        from speechmapper_tune.models.chat_format import ChatTokenizer
        from speechmapper_tune.models.llms import load_llm

        llm = spec["llm"]
        ckpt = llm["checkpoint"]
        ckpt = str(config.instantiate(OmegaConf.create(ckpt))) if isinstance(ckpt, dict) else str(ckpt)
        dtype = resolve_dtype(
            llm.get("dtype"), "cpu", setting=f"{spec['where']}.llm.dtype"
        )  # auto: bf16 only if native
        self.model, _, _ = load_llm(llm["name"], ckpt, dtype=dtype)
        self.chat = ChatTokenizer.from_dir(ckpt, chat_format=llm["chat_format"])
        self.batch_size = spec["batch_size"]

    def __call__(self, items: List[Dict]) -> List[Optional[bool]]:
        import torch

        from speechmapper_tune.generation import greedy_generate

        verdicts = []
        for s in range(0, len(items), self.batch_size):
            chunk = items[s : s + self.batch_size]
            prompts = [
                self.model.tok_embeddings(
                    torch.tensor(
                        self.chat.render(
                            judge_prompt(
                                r.get("context", ""), r.get("instruction", ""), r["reference"], r["hypothesis"]
                            )
                        )
                    )
                )
                for r in chunk
            ]
            with torch.no_grad():
                results = greedy_generate(self.model, prompts, max_new_tokens=4, stop_ids=self.chat.stop_ids)
            for res in results:
                verdicts.append(parse_judgement(self.chat.decode(res.ids, skip_special_tokens=True)))
        return verdicts


def agreement(items: List[Dict]) -> Dict:
    """The agreement metric on ``self`` rows, with and without stuck decodes, and its chance level."""
    refs, hyps = [r["reference"] for r in items], [r["hypothesis"] for r in items]
    s = agreement_scores(refs, hyps)
    clean = [r for r in items if "stuck" not in (r.get("flags") or [])]
    without = agreement_scores([r["reference"] for r in clean], [r["hypothesis"] for r in clean]) if clean else None
    out = {
        "n": len(items),
        "stuck": len(items) - len(clean),
        "agreement_chrf": s["chrf"],
        "agreement_exact": s["exact"],
        "agreement_chrf_without_stuck": without["chrf"] if without else None,
        "chrf_signature": s["chrf_signature"],
    }
    chance = [r for r in items if r.get("shuffled_answer")]
    if chance:
        c = agreement_scores([r["reference"] for r in chance], [r["shuffled_answer"] for r in chance])
        out.update(chance_chrf=c["chrf"], chance_exact=c["exact"], chance_n=len(chance))
    by = {}  # per instruction: answers of a fixed format ("No.") agree by chance far more than free text
    for ins in sorted({r.get("instruction", "") for r in items}):
        sub = [r for r in items if r.get("instruction", "") == ins]
        a = agreement_scores([r["reference"] for r in sub], [r["hypothesis"] for r in sub])
        by[ins] = {"n": len(sub), "chrf": a["chrf"], "exact": a["exact"]}
        sub_c = [r for r in sub if r.get("shuffled_answer")]
        if sub_c:
            c = agreement_scores([r["reference"] for r in sub_c], [r["shuffled_answer"] for r in sub_c])
            by[ins].update(chance_chrf=c["chrf"], chance_exact=c["exact"])
    out["by_instruction"] = by
    return out


def agreement_table(results: List[Dict]) -> str:
    rows = [r for r in results if r["task"] == "self"]
    if not rows:
        return ""
    lines = [
        "",
        "Unseen instructions: agreement with the LLM's answer from the transcript (chance: its answer to "
        "another utterance's transcript)",
        "",
        "| name | n | agreement chrF | exact % | chrF w/o stuck | stuck | chance chrF | chance exact % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r.get('n')} | {_fmt(r.get('agreement_chrf'))} | {_fmt(r.get('agreement_exact'))} | "
            f"{_fmt(r.get('agreement_chrf_without_stuck'))} | {_fmt(r.get('stuck'))} | "
            f"{_fmt(r.get('chance_chrf'))} | {_fmt(r.get('chance_exact'))} |"
        )
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))


def markdown_table(results: List[Dict]) -> str:
    lines = [
        "| name | task | n | WER | CER | WER w/o stuck | stuck | BLEU | chrF | COMET | target lang % | accuracy | F1 | "
        "no ref | not generated |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        st = next(iter(r.get("by_language", {}).values()), {}) if r["task"] == "st" else {}
        lines.append(
            f"| {r['name']} | {r['task']} | {r.get('n')} | {_fmt(r.get('wer'))} | {_fmt(r.get('cer'))} | "
            f"{_fmt(r.get('wer_without_stuck'))} | {_fmt(r.get('stuck'))} | {_fmt(st.get('bleu'))} | "
            f"{_fmt(st.get('chrf'))} | {_fmt(st.get('comet'))} | {_fmt(st.get('target_share'))} | "
            f"{_fmt(r.get('accuracy'))} | {_fmt(r.get('f1'))} | "
            f"{_fmt(r.get('no_reference'))} | {_fmt(r.get('not_generated'))} |"
        )
    return "\n".join(lines) + "\n"


SCHEMA = EvalSettings  # this recipe's schema (tests load every packaged config through it)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:  # scoring is quick, and N processes would each score every file and write the same results
        raise ValueError(
            f"speechmapper_eval runs in one process (WORLD_SIZE={world_size}): run it without --nproc_per_node"
        )
    recipe = EvalRecipe(cfg)
    recipe.setup()
    recipe.run()
    recipe.cleanup()


if __name__ == "__main__":
    from speechmapper_tune.errors import run_recipe

    # an error prints its message first, in one line (SPEECHMAPPER_DEBUG=1: and the traceback)
    sys.exit(run_recipe("speechmapper_eval", resolve_config_argv, recipe_main))
