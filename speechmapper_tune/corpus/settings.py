"""The corpus builder's settings, read from a plain dict (the recipe's YAML config).

Validation happens here, before any heavy work, and every error names the setting, e.g.
``splits.test.voices``. Keys (see ``configs/corpus/tts_en.yaml``)::

    output_dir, seed, num_workers, chunk_size, wordnet_dir,
    text: {min_words, max_words, spell_out_numbers},
    engines: {espeak-ng: {binary, speed, pitch}, flite: {binary, stretch},
              festival: {binary, stretch}},
    splits: {train|dev|test: {sentences, voices, voices_per_sentence}}

``splits.train.sentences: all`` takes every sentence that passes the filter and is in neither dev
nor test (held-out splits are cut first, so they stay those of a smaller corpus with the same seed,
text filter, engine settings and dev/test voices).

``splits.dev.voices`` left empty means "the train voices" (dev = seen voices, unseen
sentences); given, they must appear in neither train nor test (a dev split of held-out voices,
for validation and every choice between runs, so that the test voices are scored only for the
report); the test voices must not appear in train (held-out voices).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from speechmapper_tune.corpus.engines import ENGINE_NAMES, Voice
from speechmapper_tune.corpus.sentences import DEFAULT_WORDNET_DIR

log = logging.getLogger(__name__)
SPLITS = ("train", "dev", "test")
ALL_SENTENCES = -1  # splits.train.sentences: all
_TOP_KEYS = {
    "output_dir",
    "seed",
    "num_workers",
    "chunk_size",
    "wordnet_dir",
    "text",
    "engines",
    "splits",
    "progress",
}


@dataclass
class SplitSettings:
    """How many sentences a split has, read by which voices."""

    sentences: int  # ALL_SENTENCES (-1, train only): every sentence left after dev and test
    voices: List[Voice]
    voices_per_sentence: int = 1


@dataclass
class CorpusSettings:
    output_dir: str
    seed: int = 0
    num_workers: int = 1
    chunk_size: int = 32
    wordnet_dir: str = DEFAULT_WORDNET_DIR
    min_words: int = 4
    max_words: int = 30
    spell_out_numbers: bool = True
    progress: bool = True
    engines: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    splits: Dict[str, SplitSettings] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "CorpusSettings":
        """Validate a config dict (e.g. ``OmegaConf.to_container(cfg)``)."""
        unknown = set(cfg) - _TOP_KEYS
        if unknown:
            raise ValueError(f"Unknown corpus config keys {sorted(unknown)}; known: {sorted(_TOP_KEYS)}")
        if not cfg.get("output_dir"):
            raise ValueError("Config setting output_dir is required (e.g. output_dir=/tmp/corpus)")
        text = dict(cfg.get("text") or {})
        settings = cls(
            output_dir=str(cfg["output_dir"]),
            seed=_int(cfg, "seed", 0),
            num_workers=_int(cfg, "num_workers", 1, minimum=0),
            chunk_size=_int(cfg, "chunk_size", 32, minimum=1),
            wordnet_dir=str(cfg.get("wordnet_dir") or DEFAULT_WORDNET_DIR),
            min_words=_int(text, "min_words", 4, minimum=1, prefix="text."),
            max_words=_int(text, "max_words", 30, minimum=1, prefix="text."),
            spell_out_numbers=bool(text.get("spell_out_numbers", True)),
            progress=bool(cfg.get("progress", True)),
            engines=_engines(cfg.get("engines") or {}),
            splits=_splits(cfg.get("splits")),
        )
        if settings.min_words > settings.max_words:
            raise ValueError("Config setting text.min_words is larger than text.max_words")
        return settings


def _int(cfg: Mapping[str, Any], key: str, default: int, minimum: Optional[int] = None, prefix: str = "") -> int:
    value = cfg.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Config setting {prefix}{key} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"Config setting {prefix}{key} must be >= {minimum}, got {value}")
    return value


def _engines(engines: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    out = {}
    for name, opts in engines.items():
        if name not in ENGINE_NAMES:
            raise ValueError(f"Config setting engines.{name}: unknown engine; known: {ENGINE_NAMES}")
        out[name] = dict(opts or {})
        for key in ("speed", "pitch", "stretch"):
            bounds = out[name].get(key)
            if bounds is not None and (len(bounds) != 2 or float(bounds[0]) > float(bounds[1])):
                raise ValueError(f"Config setting engines.{name}.{key} must be [low, high], got {bounds}")
    return out


def _voices(specs: Any, where: str) -> List[Voice]:
    if not isinstance(specs, (list, tuple)):
        raise ValueError(f"Config setting {where} must be a list of ENGINE:NAME voices, got {specs!r}")
    voices = []
    for spec in specs:
        try:
            voice = Voice.parse(spec)
        except ValueError as e:
            raise ValueError(f"Config setting {where}: {e}") from None
        if voice in voices:
            raise ValueError(f"Config setting {where} lists {spec!r} twice")
        voices.append(voice)
    return voices


def _splits(splits: Any) -> Dict[str, SplitSettings]:
    if not isinstance(splits, Mapping) or "train" not in splits:
        raise ValueError("Config setting splits must map train (and optionally dev, test) to settings")
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"Config setting splits: unknown split(s) {sorted(unknown)}; known: {SPLITS}")
    out: Dict[str, SplitSettings] = {}
    dev_held_out = bool((splits.get("dev") or {}).get("voices"))
    for name in SPLITS:
        if name not in splits:
            continue
        opts = dict(splits[name] or {})
        specs = opts.get("voices")
        if name == "dev" and not specs:
            voices = list(out["train"].voices)  # dev = train voices on unseen sentences
        else:
            voices = _voices(specs, f"splits.{name}.voices")
        if opts.get("sentences") == "all":
            if name != "train":
                raise ValueError(
                    f"Config setting splits.{name}.sentences=all: only splits.train may take all "
                    "remaining sentences (dev and test need a size, cut first)"
                )
            opts["sentences"] = ALL_SENTENCES
            minimum = ALL_SENTENCES
        else:
            minimum = 0
        split = SplitSettings(
            sentences=_int(opts, "sentences", 0, minimum=minimum, prefix=f"splits.{name}."),
            voices=voices,
            voices_per_sentence=_int(opts, "voices_per_sentence", 1, minimum=1, prefix=f"splits.{name}."),
        )
        if split.sentences and split.voices_per_sentence > len(split.voices):
            raise ValueError(
                f"Config setting splits.{name}.voices_per_sentence={split.voices_per_sentence} "
                f"exceeds the {len(split.voices)} voices of splits.{name}.voices"
            )
        out[name] = split
    held_out = [("test", ["train"])] + ([("dev", ["train", "test"])] if dev_held_out else [])
    for name, others in held_out:
        if name not in out:
            continue
        for other in [o for o in others if o in out]:
            keys = {v.key for v in out[other].voices}
            shared = [v.spec for v in out[name].voices if v.key in keys]
            if shared:
                raise ValueError(
                    f"Config setting splits.{name}.voices must be held out of {other}, but "
                    f"{shared} are also in splits.{other}.voices"
                )
            speakers = {v.speaker for v in out[other].voices} - {None}
            for voice in out[name].voices:
                if voice.speaker in speakers:
                    log.warning(
                        "%s voice %s is the same recorded speaker (%s) as a %s voice: not fully out-of-domain",
                        name.capitalize(),
                        voice.spec,
                        voice.speaker,
                        other,
                    )
    return out
