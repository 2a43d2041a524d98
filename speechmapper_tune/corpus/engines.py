"""The offline TTS engines (espeak-ng, flite, festival): voice names, availability, synthesis.

A voice is written ``ENGINE:NAME`` in configs and manifests, e.g. ``espeak-ng:en-us+m3``,
``flite:slt``, ``festival:voice_kal_diphone``. Every engine writes raw wavs at its own rate
into a scratch folder; :mod:`speechmapper_tune.corpus.audio` converts them to 16 kHz mono.

Prosody varies per utterance through seeded parameters (see :meth:`Engine.sample_params`):
espeak-ng speed ``-s`` (words/min) and pitch ``-p`` (0-99); flite and festival diphone
voices a duration stretch (1.0 = the voice's own rate). Festival's HTS voice ignores
``Duration_Stretch``, so it gets no parameter.

Festival runs in batch mode: one ``festival -b script.scm`` per chunk of utterances; the
script loads the voice once and saves each utterance, reporting ``OK``/``FAIL`` per file,
so one bad sentence does not lose the rest of the chunk.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

ENGINE_NAMES = ("espeak-ng", "flite", "festival")
SOX_AND_WORDNET = ("sox", "wordnet-base")  # sox is optional here: conversion uses soxr
DEBIAN_PACKAGES = {
    "espeak-ng": ("espeak-ng",),
    "flite": ("flite",),
    "festival": ("festival", "festvox-kallpc16k", "festvox-kdlpc16k", "festvox-us-slt-hts"),
}
FESTIVAL_VOICE_PACKAGES = {
    "kal_diphone": "festvox-kallpc16k",
    "ked_diphone": "festvox-kdlpc16k",
    "cmu_us_slt_arctic_hts": "festvox-us-slt-hts",
}
INSTALL_HINT = "apt-get install " + " ".join(
    [p for pkgs in DEBIAN_PACKAGES.values() for p in pkgs] + list(SOX_AND_WORDNET)
)
# Voices made from the same person's recordings: holding out one but not the other leaks.
RECORDED_SPEAKERS = {
    "flite:slt": "slt",
    "festival:cmu_us_slt_arctic_hts": "slt",
    "flite:kal": "kal",
    "flite:kal16": "kal",
    "festival:kal_diphone": "kal",
    "flite:awb": "awb",
    "flite:rms": "rms",
    "festival:ked_diphone": "ked",
}
PER_SENTENCE_TIMEOUT_S = 60.0
_SLUG = re.compile(r"[^A-Za-z0-9]+")


@dataclass(frozen=True)
class Voice:
    """An engine and one of its voice names (the ``ENGINE:NAME`` spec of configs)."""

    engine: str
    name: str

    @classmethod
    def parse(cls, spec: str) -> "Voice":
        engine, sep, name = str(spec).partition(":")
        if not sep or not name or engine not in ENGINE_NAMES:
            raise ValueError(f"Bad voice {spec!r}: expected ENGINE:NAME with ENGINE one of {ENGINE_NAMES}")
        return cls(engine, name)

    @property
    def spec(self) -> str:
        return f"{self.engine}:{self.name}"

    @property
    def key(self) -> str:
        """Spec with festival's optional ``voice_`` prefix removed, to compare voices."""
        name = self.name
        if self.engine == "festival" and name.startswith("voice_"):
            name = name[len("voice_") :]
        return f"{self.engine}:{name}"

    @property
    def speaker(self) -> Optional[str]:
        """The recorded human behind a flite/festival voice (slt, kal...); None for espeak-ng."""
        return RECORDED_SPEAKERS.get(self.key)

    @property
    def slug(self) -> str:
        """A file-name-safe form: ``espeak-ng:en-us+m3`` -> ``espeak_ng_en_us_m3``."""
        return _SLUG.sub("_", self.spec).strip("_")


@dataclass(frozen=True)
class SynthItem:
    """One synthesis request: text to read, voice, parameters and the raw output wav."""

    text: str
    voice: str  # the engine's own voice name (Voice.name)
    params: Tuple[Tuple[str, float], ...]
    raw_path: str


def _run(cmd: Sequence[str], timeout: float, stdin: Optional[str] = None) -> str:
    """Run a command, return stdout; raise RuntimeError with stderr on failure."""
    try:
        proc = subprocess.run(list(cmd), input=stdin, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"{cmd[0]} timed out after {timeout:.0f} s") from e
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {proc.returncode}: {proc.stderr[-500:]}")
    return proc.stdout


def _uniform(rng: random.Random, bounds: Sequence[float], ndigits: int) -> float:
    lo, hi = float(bounds[0]), float(bounds[1])
    return round(rng.uniform(lo, hi), ndigits)


@dataclass
class Engine:
    """Base class: a TTS command-line program, its settings and its voices."""

    name: str = ""
    binary: str = ""
    settings: Dict[str, object] = field(default_factory=dict)

    def available(self) -> bool:
        return shutil.which(self.binary) is not None

    def list_voices(self) -> Set[str]:
        raise NotImplementedError

    def missing_voice_hint(self, voice_name: str) -> str:
        return f"see `{self.binary}` documentation for its voice names"

    def sample_params(self, voice_name: str, rng: random.Random) -> Dict[str, float]:
        return {}

    def synthesize(self, items: Sequence[SynthItem]) -> List[Optional[str]]:
        """Write each item's raw wav; return one error message (or None) per item."""
        errors: List[Optional[str]] = []
        for item in items:
            try:
                self._synthesize_one(item)
                errors.append(None)
            except RuntimeError as e:
                errors.append(str(e))
        return errors

    def _synthesize_one(self, item: SynthItem) -> None:
        raise NotImplementedError


@dataclass
class EspeakEngine(Engine):
    """espeak-ng: ``LANG[+VARIANT]`` voices (mbrola ``mb/`` voices are left out)."""

    def list_voices(self) -> Set[str]:
        bases, variants = set(), set()
        for line in _run([self.binary, "--voices=en"], 30).splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 5 and not cols[4].startswith(("mb/", "!v/")):
                bases.add(cols[1])  # the language column: en-us, en-gb-x-rp, ...
                bases.update(c.strip("(") for c in cols[5:] if c.startswith("("))  # "(en 2)"
        for line in _run([self.binary, "--voices=variant"], 30).splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 5 and cols[4].startswith("!v/"):
                variants.add(cols[4][3:])  # the file name is what follows "+": m3, f2
        return bases | {f"{b}+{v}" for b in bases for v in variants}

    def missing_voice_hint(self, voice_name: str) -> str:
        return f"`{self.binary} --voices=en` and `--voices=variant` list the valid names"

    def sample_params(self, voice_name: str, rng: random.Random) -> Dict[str, float]:
        speed = self.settings.get("speed", (140, 200))
        pitch = self.settings.get("pitch", (30, 70))
        return {"speed": int(_uniform(rng, speed, 0)), "pitch": int(_uniform(rng, pitch, 0))}

    def _synthesize_one(self, item: SynthItem) -> None:
        p = dict(item.params)
        cmd = [self.binary, "-v", item.voice, "-w", item.raw_path]
        if "speed" in p:
            cmd += ["-s", str(int(p["speed"]))]
        if "pitch" in p:
            cmd += ["-p", str(int(p["pitch"]))]
        _run(cmd, PER_SENTENCE_TIMEOUT_S, stdin=item.text + "\n")  # stdin: text may start "-"


@dataclass
class FliteEngine(Engine):
    """flite: built-in voices kal (8 kHz), kal16, awb, rms, slt."""

    def list_voices(self) -> Set[str]:
        out = _run([self.binary, "-lv"], 30)
        return set(out.split(":", 1)[-1].split())

    def missing_voice_hint(self, voice_name: str) -> str:
        return f"`{self.binary} -lv` lists the valid names"

    def sample_params(self, voice_name: str, rng: random.Random) -> Dict[str, float]:
        return {"stretch": _uniform(rng, self.settings.get("stretch", (0.9, 1.1)), 2)}

    def _synthesize_one(self, item: SynthItem) -> None:
        p = dict(item.params)
        cmd = [self.binary, "-voice", item.voice, "-o", item.raw_path]
        if "stretch" in p:
            cmd += ["--setf", f"duration_stretch={p['stretch']}"]
        _run(cmd + ["-t", item.text], PER_SENTENCE_TIMEOUT_S)


def _scheme_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class FestivalEngine(Engine):
    """festival in batch mode; voices named ``voice_kal_diphone`` or ``kal_diphone``."""

    @staticmethod
    def _bare(voice_name: str) -> str:
        return voice_name[len("voice_") :] if voice_name.startswith("voice_") else voice_name

    def list_voices(self) -> Set[str]:
        out = _run([self.binary, "-b", "(begin (print (voice.list)))"], 60)
        names = set(out.replace("(", " ").replace(")", " ").split())
        return names | {f"voice_{n}" for n in names}

    def missing_voice_hint(self, voice_name: str) -> str:
        pkg = FESTIVAL_VOICE_PACKAGES.get(self._bare(voice_name))
        return f"install it with: apt-get install {pkg}" if pkg else "not a known festival voice"

    def sample_params(self, voice_name: str, rng: random.Random) -> Dict[str, float]:
        if "hts" in voice_name:
            return {}  # HTS voices ignore Duration_Stretch
        return {"stretch": _uniform(rng, self.settings.get("stretch", (0.9, 1.1)), 2)}

    def synthesize(self, items: Sequence[SynthItem]) -> List[Optional[str]]:
        if not items:
            return []
        voices = {item.voice for item in items}
        if len(voices) != 1:
            raise ValueError(f"festival batch must use one voice, got {sorted(voices)}")
        lines = [
            f"(voice_{self._bare(items[0].voice)})",
            "(define (smt_say text path)",
            "  (unwind-protect",
            '    (begin (utt.save.wave (SynthText text) path \'riff) (format t "OK %s\\n" path))',
            '    (format t "FAIL %s\\n" path)))',
        ]
        for item in items:
            stretch = dict(item.params).get("stretch", 1.0)
            lines.append(f"(Parameter.set 'Duration_Stretch {float(stretch)})")
            lines.append(f"(smt_say {_scheme_string(item.text)} {_scheme_string(item.raw_path)})")
        script = Path(items[0].raw_path).parent / "batch.scm"
        script.write_text("\n".join(lines) + "\n", encoding="utf-8")
        timeout = 60 + PER_SENTENCE_TIMEOUT_S * len(items) / 4
        try:
            out = _run([self.binary, "-b", str(script)], timeout)
        except RuntimeError as e:
            return [str(e)] * len(items)
        ok = {line[3:].strip() for line in out.splitlines() if line.startswith("OK ")}
        return [None if item.raw_path in ok else "festival failed on this sentence" for item in items]


_ENGINE_CLASSES = {"espeak-ng": EspeakEngine, "flite": FliteEngine, "festival": FestivalEngine}


def make_engine(name: str, settings: Optional[Dict[str, object]] = None) -> Engine:
    """Build an engine by name; ``settings['binary']`` overrides the program name."""
    if name not in _ENGINE_CLASSES:
        raise ValueError(f"Unknown TTS engine {name!r}; known engines: {ENGINE_NAMES}")
    settings = dict(settings or {})
    binary = str(settings.pop("binary", None) or name)
    return _ENGINE_CLASSES[name](name=name, binary=binary, settings=settings)
