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
"""

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torchtune import config
from torchtune.utils import get_logger

from speechmapper_tune.config_keys import check_recipe_config
from speechmapper_tune.configs import resolve_config_argv
from speechmapper_tune.data.instructions import QUESTION, TASKS, build_instructions

log = get_logger("INFO")
INSTRUCTIONS_FILE = "instructions.jsonl"  # the name the stage-2 ST / SQA configs read


class InstructionsRecipe:
    """Config -> checked settings (setup) -> instructions file (run)."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.get("manifest") in (None, "", "???"):
            raise ValueError("set manifest=<feature manifest written by speechmapper_extract (cuts.jsonl.gz)>")
        if cfg.get("task") not in TASKS:
            raise ValueError(f"task={cfg.get('task')!r}: expected one of {TASKS}")
        self.manifest = Path(cfg.manifest)
        if not self.manifest.is_file():
            raise FileNotFoundError(f"manifest={self.manifest}: file not found")
        self.output = Path(cfg.get("output_dir") or self.manifest.parent) / INSTRUCTIONS_FILE
        st = cfg.get("st_instructions")
        self.st_instructions = {str(k): str(v) for k, v in OmegaConf.to_container(st, resolve=True).items()} if st else {}
        self.sqa_instruction = str(cfg.get("sqa_instruction") or QUESTION)
        langs = cfg.get("target_langs")
        self.target_langs = [str(x) for x in langs] if langs else None
        self.translations = cfg.get("translations") or None
        if self.translations and cfg.task != "st":
            raise ValueError(f"translations={self.translations} is for task=st (task={cfg.task})")

    def run(self) -> None:
        cfg = self.cfg
        n, skipped = build_instructions(
            self.manifest, self.output, cfg.task, self.st_instructions, self.sqa_instruction,
            bool(cfg.get("with_transcript", True)), self.target_langs, self.translations,
        )
        log.info(f"Wrote {self.output}: {n} {cfg.task} rows from {self.manifest}; skipped: {skipped.summary()}")

    def cleanup(self) -> None:
        """Nothing to release."""


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    check_recipe_config(cfg, "speechmapper_instructions")  # a misspelt or unknown setting stops here
    recipe = InstructionsRecipe(cfg)
    recipe.setup()
    recipe.run()
    recipe.cleanup()


if __name__ == "__main__":
    resolve_config_argv()  # lets --config take a packaged bare name like instructions/st
    sys.exit(recipe_main())
