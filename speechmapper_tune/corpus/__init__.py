"""Offline TTS corpus builder (WordNet sentences read by espeak-ng, flite and festival).

Plain Python, no torchtune. ``recipes/speechmapper_corpus.py`` wires a YAML config to
:func:`build_corpus`; :func:`load_audio_manifest` reads this corpus and other audio
manifests (lhotse, JSON lines, LibriSpeech folders) as a lhotse CutSet. ``translations/`` holds
reference translations of the default corpus's held-out sentences (:func:`translations_file`).
"""

from pathlib import Path

from speechmapper_tune.corpus.build import (
    CorpusResult,
    SynthReport,
    build_corpus,
    prepare_plan,
    synthesize,
    write_manifests,
)
from speechmapper_tune.corpus.engines import INSTALL_HINT, Voice, make_engine
from speechmapper_tune.corpus.manifest_io import load_audio_manifest
from speechmapper_tune.corpus.plan import Utterance, check_engines, make_plan
from speechmapper_tune.corpus.sentences import Sentence, filter_sentences, load_wordnet_sentences
from speechmapper_tune.corpus.settings import CorpusSettings

TRANSLATIONS = Path(__file__).parent / "translations"


def translations_file(name: str) -> Path:
    """The packaged translations file ``translations/<name>.jsonl``; an unknown name lists the known ones."""
    path = TRANSLATIONS / f"{name}.jsonl"
    if not path.is_file():
        known = sorted(p.stem for p in TRANSLATIONS.glob("*.jsonl"))
        raise FileNotFoundError(f"no packaged translations {name!r} (known: {known})")
    return path


__all__ = [
    "CorpusResult",
    "CorpusSettings",
    "INSTALL_HINT",
    "Sentence",
    "SynthReport",
    "Utterance",
    "Voice",
    "build_corpus",
    "check_engines",
    "filter_sentences",
    "load_audio_manifest",
    "load_wordnet_sentences",
    "make_engine",
    "make_plan",
    "prepare_plan",
    "synthesize",
    "translations_file",
    "write_manifests",
]
