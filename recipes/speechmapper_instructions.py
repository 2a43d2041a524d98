# recipes/speechmapper_instructions.py
"""Write the ``instructions.jsonl`` the ST / SQA stage-2 configs read, from a feature manifest.

    tune run speechmapper_instructions --config instructions/st manifest=runs/features/whisper_base/st_train/cuts.jsonl.gz
    tune run speechmapper_instructions --config instructions/sqa manifest=runs/features/whisper_base/sqa_dev/cuts.jsonl.gz

The manifest is ``speechmapper_extract``'s output for one of the paper's corpora (CoVoST 2,
EuroParl-ST, Spoken-SQuAD... read by ``speechmapper_tune.corpus.paper_corpora``), whose cuts
keep their translation or questions, or of any corpus with ``translations=<file.jsonl>`` (rows of
``{"source", "translation", "target_lang"}``, matched on the normalized transcript; the demo's TTS
test and dev sentences have French ones in ``speechmapper_tune/corpus/translations``). ``<output_dir>/instructions.jsonl`` (``output_dir`` default:
the manifest's folder) gets one row per ST cut or per question, with the paper's prompts (appendix B.3).
The logic lives in ``speechmapper_tune.data.instructions``; this recipe wires the config to it.

``task=self`` (``instructions/self_train``, ``instructions/self_heldout``): self-generated instruction data
for behaviour alignment. Each cut gets ``per_item`` instructions drawn from ``pool``; the frozen LLM answers
each from the cut's transcript, greedily (``speechmapper_generate span_source=transcript``, run here with
the ``answer`` settings: resumable, in ``<output_dir>/answers``), and its answer becomes the row's
``answer``. ``shuffled_reference=True`` (held-out rows) also answers each row from another cut's transcript
(``<output_dir>/shuffled``) into ``shuffled_answer``: the chance level of the agreement metric.
"""

import json
import sys
from dataclasses import field
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from torchtune import config
from torchtune.utils import get_logger

from speechmapper_tune.config_schema import (
    MISSING,
    LLMSettings,
    PromptSettings,
    StuckGuardSettings,
    at_least,
    load_settings,
    settings,
)
from speechmapper_tune.configs import resolve_config_argv
from speechmapper_tune.data.instructions import QUESTION, SELF, TASKS, build_instructions

log = get_logger("INFO")
INSTRUCTIONS_FILE = "instructions.jsonl"  # the name the stage-2 ST / SQA configs read


@settings
class AnswerSettings:
    """task=self: how the frozen LLM answers (speechmapper_generate span_source=transcript)."""

    device: str = "cpu"
    llm: LLMSettings = field(default_factory=LLMSettings)
    prompt: PromptSettings = field(default_factory=PromptSettings)
    batch_size: int = at_least(1, 16)
    max_new_tokens: int = at_least(1, 48)
    overwrite: bool = False
    stuck_guard: Optional[StuckGuardSettings] = None


@settings
class InstructionsSettings:
    """Every setting speechmapper_instructions reads (see configs/instructions/*.yaml)."""

    manifest: str = MISSING  # a feature manifest written by speechmapper_extract
    output_dir: Optional[str] = None  # default: the manifest's folder
    task: Optional[str] = None  # st, sqa or self
    translations: Optional[str] = None  # task=st: JSON lines of {source, translation, target_lang}
    target_langs: Optional[List[str]] = None  # task=st: only these (default: every one in the manifest)
    with_transcript: bool = True  # the source transcript as "transcript" (stage 2's MSE term)
    st_instructions: Optional[Dict[str, str]] = None  # by target language
    sqa_instruction: Optional[str] = None  # default: the paper's question prompt
    pool: Optional[List[str]] = None  # task=self: the instructions drawn from
    per_item: int = at_least(1, 1)  # task=self: instructions per utterance
    seed: int = 0
    shuffled_reference: bool = False  # task=self: also answer from another utterance's transcript
    max_items: Optional[int] = None  # task=self: the first N utterances
    answer: Optional[AnswerSettings] = None  # task=self


class InstructionsRecipe:
    """Config -> checked settings (setup) -> instructions file (run)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def setup(self) -> None:
        cfg = self.cfg
        if OmegaConf.is_missing(cfg, "manifest") or cfg.manifest in (None, ""):
            raise ValueError("set manifest=<feature manifest written by speechmapper_extract (cuts.jsonl.gz)>")
        if cfg.task not in TASKS:
            raise ValueError(f"task={cfg.task!r}: expected one of {TASKS}")
        self.manifest = Path(cfg.manifest)
        if not self.manifest.is_file():
            raise FileNotFoundError(f"manifest={self.manifest}: file not found")
        if cfg.task == SELF and not (cfg.pool and cfg.answer is not None):
            raise ValueError(
                "task=self needs pool=[instructions...] and the answer settings (answer.llm, answer.prompt)"
            )
        self.output = Path(cfg.output_dir or self.manifest.parent) / INSTRUCTIONS_FILE
        st = cfg.st_instructions
        self.st_instructions = (
            {str(k): str(v) for k, v in OmegaConf.to_container(st, resolve=True).items()} if st else {}
        )
        self.sqa_instruction = str(cfg.sqa_instruction or QUESTION)
        langs = cfg.target_langs
        self.target_langs = [str(x) for x in langs] if langs else None
        self.translations = cfg.translations or None
        if self.translations and cfg.task != "st":
            raise ValueError(f"translations={self.translations} is for task=st (task={cfg.task})")

    def run(self) -> None:
        cfg = self.cfg
        if cfg.task == SELF:
            return self._self_generated()
        n, skipped = build_instructions(
            self.manifest,
            self.output,
            cfg.task,
            self.st_instructions,
            self.sqa_instruction,
            cfg.with_transcript,
            self.target_langs,
            self.translations,
        )
        log.info(f"Wrote {self.output}: {n} {cfg.task} rows from {self.manifest}; skipped: {skipped.summary()}")

    def _self_generated(self) -> None:
        """Pooled instructions -> the LLM's answers from the transcripts -> ``instructions.jsonl``."""
        import time

        from lhotse import CutSet

        from speechmapper_tune.checkpoint.atomic import atomic_write_text
        from speechmapper_tune.data.generation_data import GENERATIONS, read_rows
        from speechmapper_tune.data.instructions import attach_answers, pooled_instruction_rows, shuffled_rows
        from speechmapper_tune.data.manifest import SkipCounter

        cfg, t0 = self.cfg, time.perf_counter()
        if cfg.output_dir in (None, ""):
            raise ValueError("task=self needs output_dir=<folder> (its answers and rows are written there)")
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        skipped = SkipCounter()
        pool = [str(p) for p in OmegaConf.to_container(cfg.pool, resolve=True)] if cfg.pool else []
        rows = pooled_instruction_rows(
            CutSet.from_file(str(self.manifest)) or [],
            pool,
            cfg.per_item,
            cfg.seed,
            skipped,
            cfg.max_items,
        )
        if not rows:
            raise ValueError(f"{self.manifest}: no cut to ask about (skipped: {skipped.summary()})")
        questions = out / "questions.jsonl"
        atomic_write_text(questions, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self._answer(questions, out / "answers")
        rows = attach_answers(rows, read_rows(out / "answers" / GENERATIONS), "answer", skipped)
        if cfg.shuffled_reference:
            shuffled = out / "questions_shuffled.jsonl"
            atomic_write_text(
                shuffled,
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in shuffled_rows(rows, cfg.seed)),
            )
            self._answer(shuffled, out / "shuffled")
            rows = attach_answers(rows, read_rows(out / "shuffled" / GENERATIONS), "shuffled_answer", skipped)
        if not rows:
            raise ValueError(f"no row was answered (skipped: {skipped.summary()})")
        atomic_write_text(self.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        log.info(
            f"Wrote {self.output}: {len(rows)} self-generated rows from {self.manifest} in "
            f"{time.perf_counter() - t0:.0f} s; skipped: {skipped.summary()}"
        )

    def _answer(self, questions: Path, output_dir: Path) -> None:
        """The LLM's greedy answers from the transcripts: ``speechmapper_generate span_source=transcript``
        (resumable: a rerun with the same settings goes on where it stopped)."""
        from speechmapper_generate import GenerateRecipe

        a = OmegaConf.to_container(self.cfg.answer, resolve=False)
        gen = OmegaConf.create(
            {
                "output_dir": str(output_dir),
                "projector_checkpoint": None,
                "manifest": str(self.manifest),
                "instructions": str(questions),
                "task": SELF,
                "device": a["device"],
                "seed": self.cfg.seed,
                "llm": a["llm"],
                "prompt": a["prompt"],
                "span_source": "transcript",
                "trim_pad_vectors": None,
                "batch_size": a["batch_size"],
                "max_new_tokens": a["max_new_tokens"],
                "stop_at_newline": False,
                "length_cap": None,
                "stuck_guard": a["stuck_guard"],
                "max_duration": 30.0,
                "overwrite": a["overwrite"],
                "max_items": None,
                "cascade": {"model_dir": None, "compute_type": "int8"},
            }
        )
        recipe = GenerateRecipe(gen)
        recipe.setup()
        recipe.run()
        if hasattr(recipe, "cleanup"):
            recipe.cleanup()

    def cleanup(self) -> None:
        """Nothing to release."""


SCHEMA = InstructionsSettings  # this recipe's schema (tests load every packaged config through it)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    cfg = load_settings(
        cfg, InstructionsSettings, "speechmapper_instructions"
    )  # a misspelt or unknown setting stops here
    recipe = InstructionsRecipe(cfg)
    recipe.setup()
    recipe.run()
    recipe.cleanup()


if __name__ == "__main__":
    from speechmapper_tune.errors import run_recipe

    # resolve_config_argv lets --config take a packaged bare name like instructions/st
    # an error prints its message first, in one line (SPEECHMAPPER_DEBUG=1: and the traceback)
    sys.exit(run_recipe("speechmapper_instructions", resolve_config_argv, recipe_main))
