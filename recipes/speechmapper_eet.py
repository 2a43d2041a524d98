"""Embedding Error Threshold (paper appendix A.3, algorithm 1): how much embedding noise an LLM tolerates.

    tune run speechmapper_eet --config smollm2_135M/eet

For each noise degree d, every dimension of every token embedding of a sentence gets
``i * d`` added, with ``i`` drawn uniformly from 1..9 per dimension (algorithm 1); the LLM is
asked to repeat the sentence (the B.3 prompt, with its forced answer prefix) and the WER
against the sentence is measured. The paper's table 6: Llama-3.1-8B and EuroLLM-9B tolerate
d = 1e-3, which sets SpeechMapper's MSE target (1e-6, hence the x1e3 scaling of the loss).
Writes ``${output_dir}/eet.json`` (noise degree -> WER) and prints the table.
"""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import field
from pathlib import Path
from typing import List

import torch
from omegaconf import DictConfig
from torchtune import config, training, utils

from speechmapper_tune.checkpoint.atomic import atomic_write_json, atomic_write_text
from speechmapper_tune.config_schema import MISSING, TextLLMSettings, at_least, load_settings, settings
from speechmapper_tune.configs import resolve_config_argv, resolve_path_setting
from speechmapper_tune.dtypes import resolve_dtype
from speechmapper_tune.generation import greedy_generate, newline_token_ids
from speechmapper_tune.metrics import asr_scores
from speechmapper_tune.models.chat_format import ChatTokenizer
from speechmapper_tune.models.llms import embed_tokens, load_llm
from speechmapper_tune.text import normalize_text

log = utils.get_logger("INFO")


def noisy_embeddings(emb: torch.Tensor, degree: float, generator: torch.Generator) -> torch.Tensor:
    """Algorithm 1: add ``i * degree`` to every dimension, ``i`` uniform in 1..9 per dimension."""
    if degree == 0:
        return emb
    i = torch.randint(1, 10, emb.shape, generator=generator, device="cpu").to(emb.device, torch.float32)
    return (emb.float() + i * degree).to(emb.dtype)


def first_line(text: str) -> str:
    """The answer is one sentence: keep the first non-empty line (the model may open with a newline)."""
    return next((l.strip() for l in text.splitlines() if l.strip()), "")


@settings
class SentenceSettings:
    source: str = "wordnet"  # wordnet (the corpus text), or a file: one sentence a line, or JSON lines with "text"
    num_sentences: int = at_least(1)
    seed: int = 0


@settings
class EETPrompt:
    user: str = MISSING  # <sentence> is the sentence
    assistant_prefix: str = ""  # the forced answer prefix


@settings
class EETSettings:
    """Every setting speechmapper_eet reads (see configs/smollm2_135M/eet.yaml)."""

    output_dir: str = MISSING
    seed: int = 0
    llm: TextLLMSettings = field(default_factory=TextLLMSettings)
    sentences: SentenceSettings = field(default_factory=SentenceSettings)
    noise_degrees: List[float] = MISSING  # table 6
    prompt: EETPrompt = field(default_factory=EETPrompt)
    stop_at_newline: bool = False
    max_new_tokens: int = at_least(1)
    batch_size: int = at_least(1)


def load_sentences(cfg: DictConfig) -> List[str]:
    """``sentences.source``: ``wordnet`` (the corpus text) or a file (one sentence a line, or JSON lines with ``text``)."""
    src, n, seed = cfg.source, cfg.num_sentences, cfg.seed
    if src == "wordnet":
        from speechmapper_tune.corpus import load_wordnet_sentences

        texts = [s.text for s in load_wordnet_sentences()[0]]
    else:
        lines = [l for l in Path(src).read_text(encoding="utf-8").splitlines() if l.strip()]
        texts = [json.loads(l)["text"] if l.lstrip().startswith("{") else l for l in lines]
    texts = [normalize_text(t) for t in texts if normalize_text(t)]
    if len(texts) < n:
        raise ValueError(f"sentences.source={src}: {len(texts)} sentences, fewer than num_sentences={n}")
    return random.Random(seed).sample(texts, n)


class EETRecipe:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)

    def setup(self) -> None:
        cfg = self.cfg
        training.set_seed(seed=cfg.seed)
        ckpt, chat_format = TextLLMSettings.resolve(cfg.llm, resolve_path_setting)
        self.sentences = load_sentences(cfg.sentences)
        self.model, _, _ = load_llm(cfg.llm.name, ckpt, dtype=resolve_dtype(cfg.llm.dtype, "cpu", setting="llm.dtype"))
        self.chat = ChatTokenizer.from_dir(ckpt, chat_format=chat_format)
        msgs = [{"role": "user", "content": cfg.prompt.user}]
        ids, start = self.chat.render_with_speech(msgs, 0, placeholder="<sentence>", fill_id=0)
        self.prefix, self.suffix = (
            ids[:start],
            ids[start:] + self.chat.encode_text(cfg.prompt.assistant_prefix),
        )
        self.newlines = newline_token_ids(self.chat) if cfg.stop_at_newline else None

    @torch.no_grad()
    def run(self) -> None:
        cfg = self.cfg
        results, table = {}, ["| noise degree | WER | CER | stuck |", "|---|---|---|---|"]
        for degree in [float(d) for d in cfg.noise_degrees]:
            g = torch.Generator().manual_seed(cfg.seed)
            hyps, stuck = [], 0
            bs = cfg.batch_size
            for s in range(0, len(self.sentences), bs):
                prompts = []
                for text in self.sentences[s : s + bs]:
                    sent = noisy_embeddings(
                        embed_tokens(self.model, torch.tensor(self.chat.encode_text(text))), degree, g
                    )
                    prompts.append(
                        torch.cat(
                            [
                                embed_tokens(self.model, torch.tensor(self.prefix)),
                                sent,
                                embed_tokens(self.model, torch.tensor(self.suffix)),
                            ]
                        )
                    )
                for res in greedy_generate(
                    self.model,
                    prompts,
                    max_new_tokens=cfg.max_new_tokens,
                    stop_ids=self.chat.stop_ids,
                    stop_at_newline=self.newlines is not None,
                    newline_ids=self.newlines,
                ):
                    hyps.append(first_line(self.chat.decode(res.ids, skip_special_tokens=True)))
                    stuck += int(res.stuck)
            sc = asr_scores(self.sentences, hyps)
            results[str(degree)] = {"wer": sc["wer"], "cer": sc["cer"], "stuck": stuck, "examples": hyps[:3]}
            table.append(f"| {degree:g} | {sc['wer']:.1f} | {sc['cer']:.1f} | {stuck} |")
            log.info(f"noise {degree:g}: WER {sc['wer']:.1f}")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self.output_dir / "eet.json",
            {
                "llm": cfg.llm.name,
                "num_sentences": len(self.sentences),
                "wer": {k: v["wer"] for k, v in results.items()},
                "details": results,
            },
        )
        atomic_write_text(self.output_dir / "eet.md", "\n".join(table) + "\n")
        print("\n".join(table))

    def cleanup(self) -> None:
        pass


SCHEMA = EETSettings  # this recipe's schema (tests load every packaged config through it)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:  # N processes would each run every sentence and noise degree and write the same table
        raise ValueError(
            f"speechmapper_eet runs in one process (WORLD_SIZE={world_size}): run it without --nproc_per_node"
        )
    cfg = load_settings(cfg, EETSettings, "speechmapper_eet")  # a misspelt or unknown setting stops here
    recipe = EETRecipe(cfg)
    recipe.setup()
    recipe.run()
    recipe.cleanup()


if __name__ == "__main__":
    from speechmapper_tune.errors import run_recipe

    # an error prints its message first, in one line (SPEECHMAPPER_DEBUG=1: and the traceback)
    sys.exit(run_recipe("speechmapper_eet", resolve_config_argv, recipe_main))
