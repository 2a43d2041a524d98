# recipes/speechmapper_corpus.py
"""Build an offline TTS corpus (WordNet sentences read by espeak-ng, flite and festival).

Writes 16 kHz mono wavs under ``{output_dir}/audio`` and, per split (train / dev / test,
test voices held out of train), a lhotse CutSet ``manifests/cuts_{split}.jsonl.gz`` and a
readable ``manifests/{split}.jsonl``. Re-running resumes. The logic lives in
``speechmapper_tune.corpus``; this recipe only wires the config to it.

Usage: tune run speechmapper_corpus --config corpus/tts_en [key=value ...]
"""

import logging
import sys
import time
from dataclasses import field
from typing import Any, Dict, Optional

from omegaconf import DictConfig, OmegaConf
from torchtune import config
from torchtune.utils import get_logger

from speechmapper_tune.config_schema import MISSING, at_least, load_settings, settings
from speechmapper_tune.configs import resolve_config_argv
from speechmapper_tune.corpus import CorpusSettings, build_corpus, prepare_plan

log = get_logger("INFO")


@settings
class CorpusText:
    min_words: int = at_least(1, 4)  # sentence length bounds, in words
    max_words: int = at_least(1, 30)
    spell_out_numbers: bool = True


@settings
class CorpusRecipeSettings:
    """Every setting speechmapper_corpus reads (see configs/corpus/*.yaml); ``CorpusSettings.from_dict``
    (speechmapper_tune.corpus) checks the engines' and splits' values."""

    output_dir: str = MISSING
    seed: int = 0
    num_workers: int = at_least(0, 1)
    chunk_size: int = at_least(1, 32)
    progress: bool = True
    wordnet_dir: Optional[str] = None  # default: the packaged WordNet folder
    text: CorpusText = field(default_factory=CorpusText)
    engines: Dict[str, Any] = field(default_factory=dict)  # engine name -> its options
    splits: Optional[Dict[str, Any]] = None  # split name -> its sizes and voices


class CorpusRecipe:
    """Config -> settings (setup, fails early) -> synthesis and manifests (run)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.settings = None
        self.prepared = None
        self.result = None

    def setup(self):
        """Validate the config, find engines, voices and WordNet, and plan the splits."""
        # Library modules log under speechmapper_tune.*: show their INFO/WARNING lines.
        lib_log = logging.getLogger("speechmapper_tune")
        if not lib_log.handlers:
            lib_log.addHandler(logging.StreamHandler())
        lib_log.setLevel(logging.INFO)
        self.settings = CorpusSettings.from_dict(OmegaConf.to_container(self.cfg, resolve=True))
        self.prepared = prepare_plan(self.settings)
        plan, check, _ = self.prepared
        for split, utts in plan.items():
            log.info(
                "Plan %s: %d utterances, voices %s",
                split,
                len(utts),
                ", ".join(v.spec for v in check.voices.get(split, [])) or "none",
            )

    def run(self):
        start = time.time()
        self.result = build_corpus(self.settings, self.prepared)
        for split, info in self.result.info["splits"].items():
            log.info("%s: %d utterances, %.3f h", split, info["utterances"], info["hours"])
        log.info(
            "Corpus in %s (%d synthesized, %d kept from a previous run, %d failed) in %.0f s",
            self.settings.output_dir,
            self.result.report.synthesized,
            self.result.report.skipped_existing,
            len(self.result.report.failed),
            time.time() - start,
        )

    def cleanup(self):
        """Nothing to release: workers and scratch folders are closed by the library."""


SCHEMA = CorpusRecipeSettings  # this recipe's schema (tests load every packaged config through it)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    cfg = load_settings(cfg, CorpusRecipeSettings, "speechmapper_corpus")  # a misspelt or unknown setting stops here
    recipe = CorpusRecipe(cfg)
    recipe.setup()
    recipe.run()
    recipe.cleanup()


if __name__ == "__main__":
    from speechmapper_tune.errors import run_recipe

    # resolve_config_argv lets --config take a packaged bare name like corpus/tts_en
    # an error prints its message first, in one line (SPEECHMAPPER_DEBUG=1: and the traceback)
    sys.exit(run_recipe("speechmapper_corpus", resolve_config_argv, recipe_main))
