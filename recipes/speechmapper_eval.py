"""Score generations: ASR WER/CER, ST BLEU/chrF (+ COMET, language adherence), SQA LLM-as-judge.

    tune run speechmapper_eval --config eval/default \
        'generations={stage1_test: runs/gen/s1/generations.jsonl, stage2_test: runs/gen/s2/generations.jsonl}'

Writes ``${output_dir}/results.json`` and ``${output_dir}/results.md`` (one row per named
generations file and task) and prints the table. Every metric is reported on all items and
without the items flagged as stuck decodes (paper B.2), with the count flagged. Only items with a
reference are scored; the others are counted (``no_reference``), and so are the manifest items the
generation run did not produce (``not_generated``, with reasons, from ``not_generated.jsonl``):
a score on a subset says so.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List

from omegaconf import DictConfig, OmegaConf

from torchtune import config, utils

from speechmapper_tune.checkpoint.atomic import atomic_write_json, atomic_write_text
from speechmapper_tune.config_keys import check_recipe_config
from speechmapper_tune.configs import resolve_config_argv
from speechmapper_tune.data.generation_data import SETTINGS, read_not_generated, read_rows
from speechmapper_tune.metrics import asr_scores, judge_prompt, language_shares, parse_judgement, st_scores, with_and_without

log = utils.get_logger("INFO")


class EvalRecipe:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)

    def setup(self) -> None:
        gens = OmegaConf.to_container(self.cfg.generations, resolve=True) if self.cfg.get("generations") else {}
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
        self.judge = None
        if self.cfg.get("judge"):
            self.judge = _Judge(self.cfg.judge)

    def run(self) -> None:
        results: List[Dict] = []
        for name, rows in self.sets.items():
            missing = self.missing[name]
            if missing:
                reasons = Counter(m["reason"] for m in missing)
                log.warning(f"{name}: {len(missing)} manifest items were not generated, so not scored: "
                            + "; ".join(f"{r}: {n}" for r, n in reasons.most_common()))
            for task in sorted({r.get("task", "asr") for r in rows}):
                items = [r for r in rows if r.get("task", "asr") == task]
                scored = [r for r in items if r.get("reference")]
                results.append({"name": name, "task": task, **self._score(task, scored),
                                "no_reference": len(items) - len(scored),
                                "not_generated": None if missing is None else len(missing),
                                "not_generated_reasons": dict(Counter(m["reason"] for m in missing or [])),
                                "settings": self.settings[name]})
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.output_dir / "results.json", results)
        table = markdown_table(results)
        atomic_write_text(self.output_dir / "results.md", table)
        print(table)
        log.info(f"Wrote {self.output_dir / 'results.json'} and results.md")

    def _score(self, task: str, items: List[Dict]) -> Dict:
        if task == "asr":
            wer = with_and_without(items, lambda r, h: asr_scores(r, h)["wer"])
            cer = with_and_without(items, lambda r, h: asr_scores(r, h)["cer"])
            return {"n": wer["num_items"], "stuck": wer["num_flagged"], "wer": wer["all"], "cer": cer["all"],
                    "wer_without_stuck": wer["without"], "cer_without_stuck": cer["without"]}
        if task == "st":
            langs = sorted({r.get("target_lang") for r in items if r.get("target_lang")})
            out = {"n": len(items), "stuck": sum("stuck" in (r.get("flags") or []) for r in items), "by_language": {}}
            for lang in langs or [None]:
                sub = [r for r in items if r.get("target_lang") == lang] if lang else items
                refs, hyps = [r["reference"] for r in sub], [r["hypothesis"] for r in sub]
                s = st_scores(refs, hyps, lang or "en")
                shares = language_shares(hyps, lang) if lang else {}
                out["by_language"][lang or "?"] = {"bleu": s["bleu"], "chrf": s["chrf"], "bleu_signature": s["bleu_signature"],
                                                    "target_share": shares.get("target"), "english_share": shares.get("english")}
            return out
        if task == "sqa":
            if self.judge is None:
                return {"n": len(items), "accuracy": None, "note": "no judge configured (set judge.llm)"}
            verdicts = self.judge(items)
            ok = [v for v in verdicts if v is not None]
            return {"n": len(items), "accuracy": 100.0 * sum(ok) / max(len(ok), 1), "unparsed_judgements": verdicts.count(None),
                    "stuck": sum("stuck" in (r.get("flags") or []) for r in items)}
        return {"n": len(items), "note": f"no metric for task {task!r}"}

    def cleanup(self) -> None:
        pass


class _Judge:
    """A local judge LLM (torchtune-loaded) answering the yes/no equivalence prompt (paper: BERGEN)."""

    def __init__(self, cfg: DictConfig):
        import torch

        from speechmapper_tune.models.chat_format import ChatTokenizer
        from speechmapper_tune.models.llms import load_llm

        ckpt = str(config.instantiate(cfg.llm.checkpoint)) if isinstance(cfg.llm.checkpoint, DictConfig) else str(cfg.llm.checkpoint)
        self.model, _, _ = load_llm(cfg.llm.name, ckpt, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.llm.get("dtype", "bf16")])
        self.chat = ChatTokenizer.from_dir(ckpt, chat_format=cfg.llm.chat_format)
        self.batch_size = int(cfg.get("batch_size", 8))

    def __call__(self, items: List[Dict]) -> List:
        import torch

        from speechmapper_tune.generation import greedy_generate

        verdicts = []
        for s in range(0, len(items), self.batch_size):
            chunk = items[s : s + self.batch_size]
            prompts = [self.model.tok_embeddings(torch.tensor(self.chat.render(
                judge_prompt(r.get("context", ""), r.get("instruction", ""), r["reference"], r["hypothesis"]))))
                for r in chunk]
            for res in greedy_generate(self.model, prompts, max_new_tokens=4, stop_ids=self.chat.stop_ids):
                verdicts.append(parse_judgement(self.chat.decode(res.ids, skip_special_tokens=True)))
        return verdicts


def _fmt(v) -> str:
    return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))


def markdown_table(results: List[Dict]) -> str:
    lines = ["| name | task | n | WER | CER | WER w/o stuck | stuck | BLEU | chrF | target lang % | accuracy | no ref | not generated |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        st = next(iter(r.get("by_language", {}).values()), {}) if r["task"] == "st" else {}
        lines.append(f"| {r['name']} | {r['task']} | {r.get('n')} | {_fmt(r.get('wer'))} | {_fmt(r.get('cer'))} | "
                     f"{_fmt(r.get('wer_without_stuck'))} | {_fmt(r.get('stuck'))} | {_fmt(st.get('bleu'))} | "
                     f"{_fmt(st.get('chrf'))} | {_fmt(st.get('target_share'))} | {_fmt(r.get('accuracy'))} | "
                     f"{_fmt(r.get('no_reference'))} | {_fmt(r.get('not_generated'))} |")
    return "\n".join(lines) + "\n"


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:  # scoring is quick, and N processes would each score every file and write the same results
        raise ValueError(f"speechmapper_eval runs in one process (WORLD_SIZE={world_size}): run it without --nproc_per_node")
    check_recipe_config(cfg, "speechmapper_eval")  # a misspelt or unknown setting stops here, before anything loads
    recipe = EvalRecipe(cfg)
    recipe.setup()
    recipe.run()
    recipe.cleanup()


if __name__ == "__main__":
    resolve_config_argv()
    sys.exit(recipe_main())
