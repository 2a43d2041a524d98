"""The split plan: which sentence is read by which voice, with which prosody, in which split.

Invariants (tested):

* no sentence is in two splits: the seeded shuffle of all sentences is cut into disjoint
  slices, test first, then dev, then train, so growing train leaves dev and test as they were;
* test voices are held out of train (checked by the settings);
* a seed gives the same plan; each utterance's prosody comes from its own seeded generator
  (seed, split, voice, sentence), so it does not move when sizes or other voices change;
* voices are balanced inside a split (sentence ``i`` gets voices ``i*k .. i*k+k-1`` of a
  seeded voice permutation, modulo the number of voices).

An utterance id is ``{voice slug}-{12 hex of sha1(voice, text, params)}``: a changed request
gets a new file, so resuming never keeps audio made for another request.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from speechmapper_tune.corpus.engines import INSTALL_HINT, Engine, Voice, make_engine
from speechmapper_tune.corpus.sentences import Sentence
from speechmapper_tune.corpus.settings import ALL_SENTENCES, SPLITS, CorpusSettings

log = logging.getLogger(__name__)
ALLOCATION_ORDER = ("test", "dev", "train")  # held-out splits first: stable under train growth


@dataclass(frozen=True)
class Utterance:
    """One planned wav: transcript, engine request and where it goes."""

    id: str
    split: str
    voice: Voice
    text: str  # normalized transcript (stored)
    tts_text: str  # what the engine reads
    params: Tuple[Tuple[str, float], ...]

    @property
    def audio_relpath(self) -> str:
        return f"audio/{self.split}/{self.voice.slug}/{self.id}.wav"


@dataclass
class EngineCheck:
    """Engines found, voices kept per split, and what was skipped (with the reason)."""

    engines: Dict[str, Engine]
    voices: Dict[str, List[Voice]]
    skipped: List[str]


def check_engines(settings: CorpusSettings) -> EngineCheck:
    """Find the engines and voices of the split plan; drop the missing ones with a warning."""
    wanted = sorted({v.engine for s in settings.splits.values() for v in s.voices})
    engines: Dict[str, Engine] = {}
    known_voices: Dict[str, set] = {}
    skipped: List[str] = []
    for name in wanted:
        engine = make_engine(name, settings.engines.get(name))
        if not engine.available():
            skipped.append(f"engine {name}: program {engine.binary!r} not found ({INSTALL_HINT})")
            continue
        try:
            known_voices[name] = engine.list_voices()
        except RuntimeError as e:
            skipped.append(f"engine {name}: listing its voices failed: {e}")
            continue
        engines[name] = engine
    if not engines:
        raise RuntimeError(
            f"No TTS engine found among {wanted} (settings engines.*.binary). Install them with: {INSTALL_HINT}"
        )
    kept: Dict[str, List[Voice]] = {}
    for split, split_settings in settings.splits.items():
        kept[split] = []
        for voice in split_settings.voices:
            if voice.engine not in engines:
                skipped.append(f"{split} voice {voice.spec}: engine {voice.engine} missing")
            elif voice.name not in known_voices[voice.engine]:
                hint = engines[voice.engine].missing_voice_hint(voice.name)
                skipped.append(f"{split} voice {voice.spec}: not installed ({hint})")
            else:
                kept[split].append(voice)
    for message in skipped:
        log.warning("Skipped %s", message)
    return EngineCheck(engines=engines, voices=kept, skipped=skipped)


def _utterance_id(voice: Voice, tts_text: str, params: Dict[str, float]) -> str:
    key = "|".join([voice.spec, tts_text] + [f"{k}={params[k]}" for k in sorted(params)])
    return f"{voice.slug}-{hashlib.sha1(key.encode('utf-8')).hexdigest()[:12]}"


def make_plan(
    sentences: Sequence[Sentence],
    settings: CorpusSettings,
    engines: Dict[str, Engine],
    voices: Optional[Dict[str, List[Voice]]] = None,
) -> Dict[str, List[Utterance]]:
    """Assign sentences to splits and voices; ``voices`` overrides the settings' lists."""
    voices = voices or {name: s.voices for name, s in settings.splits.items()}
    total = sum(max(s.sentences, 0) for s in settings.splits.values())
    if total > len(sentences):
        sizes = ", ".join(f"splits.{n}.sentences={s.sentences}" for n, s in settings.splits.items())
        raise ValueError(f"{sizes} ask for {total} sentences but only {len(sentences)} pass the filter")
    order = list(range(len(sentences)))
    random.Random(settings.seed).shuffle(order)
    plan: Dict[str, List[Utterance]] = {}
    start = 0
    for split in ALLOCATION_ORDER:
        if split not in settings.splits:
            continue
        spec = settings.splits[split]
        count = len(order) - start if spec.sentences == ALL_SENTENCES else spec.sentences  # "all": the rest
        chosen = [sentences[i] for i in order[start : start + count]]
        start += count
        plan[split] = _assign_voices(chosen, split, voices[split], spec.voices_per_sentence, settings.seed, engines)
    return {split: plan[split] for split in SPLITS if split in plan}


def _assign_voices(
    chosen: Sequence[Sentence],
    split: str,
    voices: Sequence[Voice],
    k: int,
    seed: int,
    engines: Dict[str, Engine],
) -> List[Utterance]:
    if chosen and not voices:
        log.warning("Split %s has no available voice left: it will be empty", split)
        return []
    if chosen and k > len(voices):
        log.warning(
            "Split %s: voices_per_sentence=%d > %d available voices; using %d", split, k, len(voices), len(voices)
        )
        k = len(voices)
    perm = list(voices)
    random.Random(f"{seed}:{split}:voices").shuffle(perm)
    utterances = []
    for i, sentence in enumerate(chosen):
        for j in range(k):
            voice = perm[(i * k + j) % len(perm)]
            rng = random.Random(f"{seed}:{split}:{voice.spec}:{sentence.text}")
            params = engines[voice.engine].sample_params(voice.name, rng)
            utterances.append(
                Utterance(
                    id=_utterance_id(voice, sentence.tts_text, params),
                    split=split,
                    voice=voice,
                    text=sentence.text,
                    tts_text=sentence.tts_text,
                    params=tuple(sorted(params.items())),
                )
            )
    return utterances
