"""English transcripts for the TTS corpus: WordNet example sentences, filtered and normalized.

WordNet's ``data.*`` files end each synset line with a gloss (after ``|``) that holds quoted
example sentences (``"she was able to program her computer"``). They are short, clean,
licence-compatible English, a good source of synthetic transcripts.

Each kept sentence has two forms (:class:`Sentence`):

* ``tts_text``: the WordNet wording with numbers spelled out (capitals, commas and hyphens
  kept), given to the TTS engine so that it reads with natural prosody;
* ``text``: ``normalize_text(tts_text)``, the transcript stored in the manifests.

Numbers: plain integers, ordinals (``20th``), decades (``1950s``, ``70s``) and years
(``1100``-``2099``) and day numbers after a month name are spelled out with ``num2words``; a sentence with any other digit use
(decimals ``8.5``, ``$100``, ``20:20``, ``50%``) is dropped. Sentences are also dropped
when the engine would read something the transcript does not hold, or the reverse:
non-ASCII or symbol characters, brackets (normalize_text removes bracketed text),
abbreviations (``Feb.``, ``U.S.``: a period inside the sentence) and acronyms (an
all-capitals word of two letters or more, which engines spell out letter by letter).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

from speechmapper_tune.text import normalize_text

log = logging.getLogger(__name__)

DEFAULT_WORDNET_DIR = "/usr/share/wordnet"
DATA_FILES = ("data.adj", "data.adv", "data.noun", "data.verb")

_QUOTED = re.compile(r'"([^"]*)"')
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# A whole number token with an optional ordinal/plural suffix, not part of a decimal,
# a time, a price, a percentage or a word.
_NUMBER = re.compile(r"(?<![\w.,$:/])(\d+)(st|nd|rd|th|s)?(?![\w%:/]|[.,]\d)")
_ALLOWED = re.compile(r"^[A-Za-z ,;:!?'.\-]+$")
_ACRONYM = re.compile(r"\b[A-Z]{2,}\b")
_INNER_PERIOD = re.compile(r"(?<!\.)\.(?!\.)(?=.*\w)")  # a lone "." with text after it
_SPACES = re.compile(r"\s+")
_MONTH_BEFORE = re.compile(
    r"\b(January|February|March|April|May|June|July|August|September|October|November"
    r"|December)\s+$"
)


@dataclass(frozen=True)
class Sentence:
    """One transcript: ``text`` is stored, ``tts_text`` is read by the engine."""

    text: str
    tts_text: str


def iter_wordnet_examples(wordnet_dir: Union[str, Path] = DEFAULT_WORDNET_DIR) -> Iterator[str]:
    """Yield every quoted example string of the WordNet ``data.*`` files, in file order."""
    wordnet_dir = Path(wordnet_dir)
    paths = [wordnet_dir / name for name in DATA_FILES if (wordnet_dir / name).is_file()]
    if not paths:
        raise FileNotFoundError(
            f"No WordNet data files ({', '.join(DATA_FILES)}) in {wordnet_dir} "
            "(setting wordnet_dir). Install them with: apt-get install wordnet-base"
        )
    for path in paths:
        # latin-1 never fails to decode; non-ASCII sentences are dropped by the filter.
        with open(path, encoding="latin-1") as f:
            for line in f:
                if line.startswith("  ") or " | " not in line:
                    continue  # licence header lines start with two spaces
                gloss = line.split(" | ", 1)[1]
                for match in _QUOTED.finditer(gloss):
                    yield match.group(1).strip()


def _pluralize(words: str) -> str:
    """``nineteen fifty`` -> ``nineteen fifties`` (for decades like ``1950s``)."""
    if words.endswith("y"):
        return words[:-1] + "ies"
    return words + "s"


def _number_words(digits: str, suffix: Optional[str], after_month: bool) -> Optional[str]:
    from num2words import num2words  # imported here: only the text step needs it

    if len(digits) > 1 and digits.startswith("0"):
        return None  # codes like "007" have no single reading
    value = int(digits)
    is_year = len(digits) == 4 and 1100 <= value <= 2099
    if suffix in ("st", "nd", "rd", "th") or (after_month and not suffix and value <= 31):
        return num2words(value, to="ordinal")
    if suffix == "s":
        return _pluralize(num2words(value, to="year" if is_year else "cardinal"))
    return num2words(value, to="year" if is_year else "cardinal")


def spell_out_numbers(text: str) -> Optional[str]:
    """Spell out whole numbers, ordinals, decades, years and dates; None if a digit is left.

    ``July 4`` reads ``July fourth``; ``1,000`` reads ``one thousand``.
    """
    text = _THOUSANDS.sub("", text)
    failed = False

    def replace(match: "re.Match[str]") -> str:
        nonlocal failed
        after_month = bool(_MONTH_BEFORE.search(match.string[: match.start()]))
        words = _number_words(match.group(1), match.group(2), after_month)
        if words is None:
            failed = True
            return match.group(0)
        return words

    text = _NUMBER.sub(replace, text)
    if failed or any(ch.isdigit() for ch in text):
        return None
    return text


def clean_sentence(
    raw: str, min_words: int = 4, max_words: int = 30, spell_numbers: bool = True
) -> Tuple[Optional[Sentence], str]:
    """Return ``(Sentence, "kept")`` or ``(None, reason)`` for one raw WordNet example."""
    # WordNet quotes words as `one': a backtick is an opening single quote.
    tts_text = _SPACES.sub(" ", raw.replace("`", "'")).strip(" -;:,")
    if any(ch.isdigit() for ch in tts_text):
        if not spell_numbers:
            return None, "digits"
        tts_text = spell_out_numbers(tts_text)
        if tts_text is None:
            return None, "digits"
    if not _ALLOWED.match(tts_text):
        return None, "symbols"
    if _ACRONYM.search(tts_text):
        return None, "acronym"
    if _INNER_PERIOD.search(tts_text):
        return None, "abbreviation"
    text = normalize_text(tts_text)
    n_words = len(text.split())
    if n_words < min_words or n_words > max_words:
        return None, "length"
    return Sentence(text=text, tts_text=tts_text), "kept"


def filter_sentences(
    raw_sentences: Iterable[str],
    min_words: int = 4,
    max_words: int = 30,
    spell_numbers: bool = True,
) -> Tuple[List[Sentence], Dict[str, int]]:
    """Clean, filter and deduplicate (on the normalized text, first wins), keeping order."""
    seen = set()
    kept: List[Sentence] = []
    stats: Counter = Counter()
    for raw in raw_sentences:
        stats["total"] += 1
        sentence, reason = clean_sentence(raw, min_words, max_words, spell_numbers)
        if sentence is not None and sentence.text in seen:
            sentence, reason = None, "duplicate"
        stats[reason] += 1
        if sentence is not None:
            seen.add(sentence.text)
            kept.append(sentence)
    return kept, dict(stats)


def load_wordnet_sentences(
    wordnet_dir: Union[str, Path] = DEFAULT_WORDNET_DIR,
    min_words: int = 4,
    max_words: int = 30,
    spell_numbers: bool = True,
) -> Tuple[List[Sentence], Dict[str, int]]:
    """All usable WordNet example sentences (deterministic order) and per-reason counts."""
    sentences, stats = filter_sentences(iter_wordnet_examples(wordnet_dir), min_words, max_words, spell_numbers)
    log.info("WordNet sentences: %s", ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    return sentences, stats
