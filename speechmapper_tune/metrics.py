"""Evaluation metrics for SpeechMapper (paper section 3 "Inference and evaluation", appendix B).

Plain Python (no torchtune); every function takes lists of strings and returns plain dicts.

* ASR: :func:`asr_scores` -- corpus-level WER/CER with jiwer, after :func:`normalize_text`.
* ST: :func:`st_scores` -- corpus-level BLEU and chrF with sacrebleu, with their signatures;
  :func:`load_comet` / :func:`comet_scores` -- COMET (``Unbabel/wmt22-comet-da`` in the paper,
  scores x 100), only with the optional ``unbabel-comet`` package and a local model folder.
* Target-language adherence (paper table 9): :func:`language_shares` with ``langdetect``
  (the toolkit the paper used), seeded so results are deterministic.
* Stuck decodes (appendix B.2): :func:`with_and_without` computes a metric with and without
  the items carrying a flag.
* SQA LLM-as-judge (BERGEN-style yes/no equivalence): :func:`judge_prompt` builds the chat
  messages and :func:`parse_judgement` reads the judge's reply.
* SLUE (SpeechLLM's tasks): :func:`ner_scores` (micro F1 over (tag, phrase) pairs and the tags-only
  "label F1", slue-toolkit's definitions) with the answer format :func:`format_entities` /
  :func:`parse_entities`; :func:`sentiment_scores` (macro F1, weighted F1, accuracy).
* Unseen instructions: :func:`agreement_scores` -- chrF and exact match of the speech-fed answer against
  the same LLM's transcript-fed answer (and of chance and cascade references scored the same way).

All scores are on the 0-100 scale the paper reports (WER/CER in percent, BLEU, chrF, COMET x 100,
language shares in percent).
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from speechmapper_tune.text import normalize_text

__all__ = [
    "asr_scores",
    "st_scores",
    "bleu_tokenizer",
    "comet_scores",
    "comet_checkpoint",
    "load_comet",
    "CometScorer",
    "language_shares",
    "detect_language",
    "with_and_without",
    "judge_prompt",
    "parse_judgement",
    "format_entities",
    "parse_entities",
    "ner_scores",
    "parse_sentiment",
    "sentiment_scores",
]


def _check_pairs(references: Sequence[str], hypotheses: Sequence[str]) -> None:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")


def _rate(errors: int, total: int) -> float:
    if total > 0:
        return 100.0 * errors / total
    return 0.0 if errors == 0 else math.inf


# --------------------------------------------------------------------------------------- ASR


def asr_scores(references: Sequence[str], hypotheses: Sequence[str], normalize: bool = True) -> dict[str, Any]:
    """Corpus-level WER and CER (jiwer), in percent.

    ``wer = 100 * (S + D + I) / N`` with S, D, I summed over all utterances and N the total
    number of reference words (not the mean of per-utterance WERs), as jiwer does for lists.
    CER is the same over characters; jiwer counts the spaces between words as characters.
    Both can exceed 100 (insertions, e.g. stuck decodes; appendix B.2).

    With ``normalize`` (default) both sides first go through
    :func:`speechmapper_tune.text.normalize_text` (MMS-style): case and punctuation differences
    are not errors. Numbers are *not* spelled out: digits stay digits, so ``3`` vs ``three``
    counts as a substitution (and ``3.5`` becomes the two words ``3 5``). Contractions stay
    single words (``don't`` vs ``do not`` is 1 substitution + 1 insertion); typographic
    apostrophes are unified first, so ``don’t`` == ``don't``. Hyphens split words.

    Empty strings (also after normalization) are allowed on either side. An empty hypothesis
    counts every reference word as a deletion; an empty reference counts every hypothesis word
    as an insertion and adds nothing to N. If N == 0 for the whole corpus (all references
    empty), the rate is 0.0 when there are no errors and ``math.inf`` otherwise. Empty input
    lists give 0.0 with ``num_items == 0``.

    Returns ``dict(wer, cer, num_items, substitutions, deletions, insertions, ref_words,
    ref_chars)`` -- the counts are word-level except ``ref_chars``.
    """
    import jiwer

    _check_pairs(references, hypotheses)
    refs = [normalize_text(r) if normalize else r.strip() for r in references]
    hyps = [normalize_text(h) if normalize else h.strip() for h in hypotheses]
    if not refs:
        return dict(wer=0.0, cer=0.0, num_items=0, substitutions=0, deletions=0, insertions=0, ref_words=0, ref_chars=0)
    words = jiwer.process_words(refs, hyps)
    chars = jiwer.process_characters(refs, hyps)
    ref_words = words.hits + words.substitutions + words.deletions
    ref_chars = chars.hits + chars.substitutions + chars.deletions
    word_errors = words.substitutions + words.deletions + words.insertions
    char_errors = chars.substitutions + chars.deletions + chars.insertions
    return dict(
        wer=_rate(word_errors, ref_words),
        cer=_rate(char_errors, ref_chars),
        num_items=len(refs),
        substitutions=words.substitutions,
        deletions=words.deletions,
        insertions=words.insertions,
        ref_words=ref_words,
        ref_chars=ref_chars,
    )


# ---------------------------------------------------------------------------------------- ST


def _base_lang(lang: str) -> str:
    """``"fr"``, ``"fr-FR"``, ``"fr_FR"``, ``"FR"`` -> ``"fr"``; ``"zh-cn"`` -> ``"zh"``."""
    return re.split(r"[-_]", lang.strip().lower(), maxsplit=1)[0]


def bleu_tokenizer(target_lang: str) -> str:
    """sacrebleu tokenizer for a target language: ``"zh"`` for Chinese, ``"13a"`` otherwise
    (the paper's footnote signature uses tok:13a for the European pairs). Japanese/Korean
    are not targets in the paper and also get 13a here."""
    return "zh" if _base_lang(target_lang) == "zh" else "13a"


def st_scores(references: Sequence[str], hypotheses: Sequence[str], target_lang: str) -> dict[str, Any]:
    """Corpus-level BLEU (BLEU-4) and chrF with sacrebleu defaults, one reference per item.

    No text normalization: raw detokenized strings, case-sensitive (case:mixed), as in the
    paper's signature ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp``. BLEU uses the ``zh``
    tokenizer when ``target_lang`` is Chinese (``zh``, ``zh-CN``...), ``13a`` otherwise;
    chrF is character based (nc:6, nw:0, whitespace ignored) and takes no tokenizer.

    Returns ``dict(bleu, chrf, bleu_signature, chrf_signature, num_items)``, scores 0-100.
    """
    import sacrebleu

    _check_pairs(references, hypotheses)
    if not references:
        raise ValueError("st_scores needs at least one item")
    refs = [list(references)]
    hyps = list(hypotheses)
    bleu = sacrebleu.BLEU(tokenize=bleu_tokenizer(target_lang))
    chrf = sacrebleu.CHRF()
    return dict(
        bleu=bleu.corpus_score(hyps, refs).score,
        chrf=chrf.corpus_score(hyps, refs).score,
        bleu_signature=str(bleu.get_signature()),
        chrf_signature=str(chrf.get_signature()),
        num_items=len(hyps),
    )


_COMET_HELP = (
    "COMET needs the optional package `unbabel-comet` (pip install unbabel-comet) and a local "
    "copy of a COMET model, e.g. Unbabel/wmt22-comet-da as used in the paper: its folder holds "
    "hparams.yaml and checkpoints/model.ckpt (pass the folder or the .ckpt file)."
)


def comet_checkpoint(model_dir: str | Path | None, setting: str = "model_path") -> Path:
    """The ``checkpoints/model.ckpt`` of a local COMET model folder (or the ``.ckpt`` itself), checked
    without importing COMET: COMET's loader also reads ``hparams.yaml`` two levels above the file.
    Errors name ``setting`` (the config key the path came from) and the path."""
    if model_dir is None or str(model_dir) == "":
        raise ValueError(f"{setting} is not set. {_COMET_HELP}")
    path = Path(model_dir).expanduser()
    ckpt = path / "checkpoints" / "model.ckpt" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"{setting}={model_dir}: no such file or folder. {_COMET_HELP}")
    if not ckpt.is_file() or ckpt.suffix != ".ckpt":
        raise FileNotFoundError(f"{setting}={model_dir}: not a COMET checkpoint ({ckpt} is missing). {_COMET_HELP}")
    hparams = ckpt.parent.parent / "hparams.yaml"
    if not hparams.is_file():
        raise FileNotFoundError(f"{setting}={model_dir}: not a COMET checkpoint ({hparams} is missing). {_COMET_HELP}")
    return ckpt


class CometScorer:
    """A loaded COMET model: ``scorer(sources, references, hypotheses)`` -> ``dict(comet, scores, num_items)``,
    scores x 100. Build it with :func:`load_comet`."""

    def __init__(self, model: Any, checkpoint: Path, batch_size: int = 16, gpus: int = 0):
        self.model, self.checkpoint, self.batch_size, self.gpus = model, checkpoint, int(batch_size), int(gpus)

    def __call__(self, sources: Sequence[str], references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, Any]:
        _check_pairs(references, hypotheses)
        _check_pairs(sources, hypotheses)
        if not hypotheses:
            return dict(comet=None, scores=[], num_items=0)
        data = [dict(src=s, mt=h, ref=r) for s, h, r in zip(sources, hypotheses, references)]
        out = self.model.predict(data, batch_size=self.batch_size, gpus=self.gpus, progress_bar=False)
        scores = [100.0 * float(s) for s in out.scores]
        return dict(comet=sum(scores) / len(scores), scores=scores, num_items=len(scores))


def load_comet(
    model_dir: str | Path | None, setting: str = "model_path", batch_size: int = 16, gpus: int = 0
) -> CometScorer:
    """Load a local COMET model (never downloaded here). The folder is checked first, then the
    ``comet`` package is imported: either missing raises (``FileNotFoundError``/``ValueError``,
    ``ImportError``) naming ``setting`` and the path. COMET's checkpoint is a PyTorch Lightning
    ``.ckpt``, which COMET itself loads: point it only at a model you trust (e.g. Unbabel's)."""
    ckpt = comet_checkpoint(model_dir, setting)
    try:
        from comet import load_from_checkpoint  # package "unbabel-comet"
    except ImportError as exc:
        raise ImportError(
            f"{setting}={model_dir}: the `comet` module is not importable ({exc}). {_COMET_HELP}"
        ) from exc
    scorer = CometScorer(load_from_checkpoint(str(ckpt)), ckpt, 1, gpus)
    try:  # one item now: an unbabel-comet too old for the installed transformers fails here, not mid-evaluation
        scorer(["a"], ["a"], ["a"])
    except Exception as exc:  # noqa: BLE001  (COMET and transformers raise various types)
        raise RuntimeError(
            f"{setting}={model_dir}: COMET loaded the model but cannot score with it "
            f"({type(exc).__name__}: {exc}); {_versions()}"
        ) from exc
    scorer.batch_size = int(batch_size)
    return scorer


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("unbabel-comet", "transformers", "numpy"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} not installed")
    return (
        "installed: " + ", ".join(found) + " (unbabel-comet 2.2.x needs transformers < 5: "
        "score COMET in an environment that has it)"
    )


def comet_scores(
    sources: Sequence[str],
    references: Sequence[str],
    hypotheses: Sequence[str],
    model_path: str | Path | None,
    batch_size: int = 16,
    gpus: int = 0,
) -> dict[str, Any]:
    """COMET with a locally stored model, scores multiplied by 100 (one-shot :func:`load_comet` + call).

    The paper uses ``Unbabel/wmt22-comet-da`` with the reference transcription as source and
    the reference translation as reference. Returns ``dict(comet, scores, num_items)``: the
    system score (mean) and per-item scores.
    """
    _check_pairs(references, hypotheses)
    _check_pairs(sources, hypotheses)
    return load_comet(model_path, "model_path", batch_size, gpus)(sources, references, hypotheses)


# ------------------------------------------------------------------------- language shares

UNKNOWN_LANG = "unknown"


@functools.lru_cache(maxsize=None)
def _langdetect_factory(seed: int):
    """A private, seeded langdetect factory (the global one is left untouched). langdetect is
    pure Python and its 55 language profiles are files inside the package: no network."""
    try:
        from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory
    except ImportError as exc:
        raise ImportError("language_shares needs `langdetect` (pip install langdetect==1.0.9)") from exc
    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.seed = seed
    return factory


def detect_language(text: str, seed: int = 0) -> str:
    """ISO 639-1 code of ``text`` by langdetect (``zh-cn``/``zh-tw`` folded to ``zh``), or
    ``"unknown"`` when nothing can be detected (empty, digits or punctuation only)."""
    from langdetect.lang_detect_exception import LangDetectException

    detector = _langdetect_factory(seed).create()
    detector.append(text)
    try:
        return _base_lang(detector.detect())
    except LangDetectException:
        return UNKNOWN_LANG


def language_shares(hypotheses: Iterable[str], target_lang: str, seed: int = 0) -> dict[str, Any]:
    """Share of outputs detected as the target language and as English (paper table 9).

    Each hypothesis (raw, un-normalized text) gets one language from langdetect, which is
    seeded (``seed``) so that repeated runs agree. ``target_lang`` is an ISO 639-1 code, region
    suffixes ignored (``de``, ``zh-CN``). Shares are percentages over *all* hypotheses,
    undetectable ones (``"unknown"``) included in the denominator; with ``target_lang="en"``
    both shares are the same number.

    Returns ``dict(target, english, detected, num_items)`` with ``detected`` a ``Counter`` of
    language codes. Empty input gives shares of 0.0.
    """
    target = _base_lang(target_lang)
    detected = Counter(detect_language(h, seed=seed) for h in hypotheses)
    n = sum(detected.values())
    share = (lambda code: 100.0 * detected[code] / n) if n else (lambda code: 0.0)
    return dict(target=share(target), english=share("en"), detected=detected, num_items=n)


# --------------------------------------------------------------------------- stuck decodes


def _has_flag(item: Mapping[str, Any], flag: str) -> bool:
    flags = item.get("flags") or ()
    if isinstance(flags, str):
        flags = (flags,)
    return flag in flags


def with_and_without(
    items: Sequence[Mapping[str, Any]],
    metric_fn: Callable[[list[str], list[str]], Any],
    flag: str = "stuck",
) -> dict[str, Any]:
    """A metric over all items and over the items *not* carrying ``flag`` (appendix B.2: a few
    stuck decodes can inflate WER into the thousands).

    ``items`` are dicts with ``reference``, ``hypothesis`` and ``flags`` (a list/set/tuple of
    strings, a single string, or missing/None for no flags). ``metric_fn(references,
    hypotheses)`` is e.g. :func:`asr_scores` or ``functools.partial(st_scores,
    target_lang="de")``.

    Returns ``dict(all, without, num_items, num_flagged, flag)``; ``all``/``without`` are
    ``metric_fn``'s results, or ``None`` when there is no item to score.
    """
    kept = [it for it in items if not _has_flag(it, flag)]

    def score(subset):
        if not subset:
            return None
        return metric_fn([it["reference"] for it in subset], [it["hypothesis"] for it in subset])

    return dict(
        all=score(list(items)),
        without=score(kept),
        num_items=len(items),
        num_flagged=len(items) - len(kept),
        flag=flag,
    )


# ----------------------------------------------------------------------------- SQA judge

JUDGE_SYSTEM = "You are an evaluation tool. Answer only with Yes or No."

JUDGE_TEMPLATE = (
    "Below are a context, a question about it, a reference answer and a candidate answer "
    "produced by an AI system. Using the context and the reference answer, judge whether the "
    "candidate answer correctly answers the question (it may be worded differently from the "
    "reference). Answer with a single word: Yes or No.\n\n"
    "Context: {context}\n\n"
    "Question: {question}\n\n"
    "Reference answer: {reference}\n\n"
    "Candidate answer: {answer}"
)


def judge_prompt(context: str, question: str, reference: str, answer: str) -> list[dict[str, str]]:
    """Chat messages for a yes/no answer-equivalence judgement (BERGEN-style LLM-as-judge, with
    the reference context added as in the BEST-IWSLT25-IF protocol the paper follows).

    Returns ``[{"role": "system", ...}, {"role": "user", ...}]``; generate a few tokens
    greedily and read the reply with :func:`parse_judgement`. (BERGEN itself scores the first
    token's Yes/No logits; prepend the system text to the user turn for judges without a
    system role.)
    """
    user = JUDGE_TEMPLATE.format(
        context=context.strip(), question=question.strip(), reference=reference.strip(), answer=answer.strip()
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


_YES = {"yes", "y", "true", "correct"}
_NO = {"no", "n", "false", "incorrect", "wrong"}
_WORD = re.compile(r"[a-z]+")


def parse_judgement(text: str | None) -> bool | None:
    """Judge reply -> ``True`` (yes), ``False`` (no) or ``None`` (unparseable).

    Case, markdown and punctuation are ignored and a leading ``Response:``/``Answer:`` label is
    skipped. The first word decides when it is yes/no (also y/n, true/false,
    correct/incorrect/wrong): ``"Yes."``, ``"YES, because..."``, ``"**No**"``. Otherwise the
    last word decides when it is yes/no (``"The answer is: yes."``); anything else
    (``"I have no idea"``, empty, garbage) -> ``None``.
    """
    if not text:
        return None
    words = _WORD.findall(text.lower())
    while words and words[0] in ("response", "answer", "judgement", "judgment", "verdict"):
        words = words[1:]
    if not words:
        return None
    if words[0] in _YES:
        return True
    if words[0] in _NO:
        return False
    if words[-1] in ("yes", "no"):
        return words[-1] == "yes"
    return None


# ------------------------------------------------------------------------------ SLUE NER / SA

# SLUE's "combined" NER label set (slue-toolkit generic_utils): OntoNotes tags merged into 7, five dropped
SLUE_RAW_TO_COMBINED: dict[str, str | None] = {
    "DATE": "WHEN",
    "TIME": "WHEN",
    "CARDINAL": "QUANT",
    "ORDINAL": "QUANT",
    "QUANTITY": "QUANT",
    "MONEY": "QUANT",
    "PERCENT": "QUANT",
    "GPE": "PLACE",
    "LOC": "PLACE",
    "NORP": "NORP",
    "ORG": "ORG",
    "LAW": "LAW",
    "PERSON": "PERSON",
    "FAC": None,
    "EVENT": None,
    "WORK_OF_ART": None,
    "PRODUCT": None,
    "LANGUAGE": None,
}
SLUE_NER_TAGS = ("LAW", "NORP", "ORG", "PERSON", "PLACE", "QUANT", "WHEN")
SLUE_SENTIMENTS = ("Negative", "Neutral", "Positive")
NO_ENTITIES = "none"

Entity = tuple[str, str]  # (tag, phrase)


def format_entities(entities: Iterable[Sequence[str]]) -> str:
    """The NER answer format, for references and for the model: ``"TAG: phrase; TAG: phrase"`` in
    utterance order (tags upper case, phrases as given), or ``"none"`` when there is no entity."""
    parts = [f"{str(tag).strip().upper()}: {' '.join(str(phrase).split())}" for tag, phrase in entities]
    return "; ".join(parts) if parts else NO_ENTITIES


_TAG = re.compile(r"^[A-Za-z][A-Za-z_ -]*$")
_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s*")


def parse_entities(text: str | None) -> tuple[list[Entity], int]:
    """Read a NER answer (see :func:`format_entities`) -> ``(entities, unparsed_parts)``.

    Parts are separated by ``;`` or new lines; each is ``TAG: phrase`` (a leading bullet or number,
    markdown ``*``/backticks and surrounding quotes are ignored; the tag is upper-cased, spaces and
    hyphens in it become ``_``). ``"none"`` (or an empty answer) is no entity. A part without a
    ``:``, with a tag that is not a word, or with an empty phrase counts as unparsed, not as an entity.
    """
    if not text or not text.strip():
        return [], 0
    entities, unparsed = [], 0
    for part in re.split(r"[;\n]", text.replace("`", "").replace("**", "")):
        part = _BULLET.sub("", part).strip().strip("\"'")
        if not part or part.strip(" .").lower() in (NO_ENTITIES, "no entities", "no entity"):
            continue
        tag, sep, phrase = part.partition(":")
        tag, phrase = tag.strip().strip("\"'"), phrase.strip().strip("\"'.,").strip()
        if not sep or not phrase or not _TAG.match(tag):
            unparsed += 1
            continue
        entities.append((re.sub(r"[ -]+", "_", tag.upper()), phrase))
    return entities, unparsed


def _distinct(entities: Iterable[Entity], label_only: bool) -> set[tuple[str, str, int]]:
    """SLUE's make_distinct: the k-th repeat of a (tag, phrase) pair is its own item; ``label_only``
    replaces every phrase by one dummy, so only the tags (with their counts) are compared."""
    seen: Counter = Counter()
    out = set()
    for tag, phrase in entities:
        key = (tag.upper(), "phrase" if label_only else normalize_text(phrase))
        seen[key] += 1
        out.add((*key, seen[key]))
    return out


def _prf(tp: int, n_gt: int, n_pred: int) -> tuple[float, float, float]:
    """Precision, recall, F1 in percent; 0 where a denominator is 0 (slue-toolkit's safe_divide)."""
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gt if n_gt else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return 100.0 * p, 100.0 * r, 100.0 * f


def _ner_counts(references, hypotheses, label_only: bool) -> dict[str, list[int]]:
    per_tag: dict[str, list[int]] = {}  # tag -> [tp, gt, pred]
    for ref, hyp in zip(references, hypotheses):
        gt, pred = _distinct(ref, label_only), _distinct(hyp, label_only)
        for tag in {t for t, _, _ in gt} | {t for t, _, _ in pred}:
            g = {e for e in gt if e[0] == tag}
            p = {e for e in pred if e[0] == tag}
            c = per_tag.setdefault(tag, [0, 0, 0])
            c[0] += len(g & p)
            c[1] += len(g)
            c[2] += len(p)
    return per_tag


def ner_scores(references: Sequence[Sequence[Entity]], hypotheses: Sequence[Sequence[Entity]]) -> dict[str, Any]:
    """SLUE NER scores (slue-toolkit ``get_ner_scores``), in percent.

    Each item is an unordered list of ``(tag, phrase)`` pairs; a pair repeated in an utterance is
    counted as often as it occurs. ``f1``: micro-averaged F1 over (tag, phrase) pairs, summed over
    utterances and tags (SLUE's primary NER metric); ``label_f1``: the same with phrases ignored, so
    only the tags and how often each occurs count (SLUE's "label" score). Phrases are compared after
    :func:`speechmapper_tune.text.normalize_text` (SLUE compares normalized words), tags upper-cased.
    Use SLUE's combined tags (:data:`SLUE_NER_TAGS`) on both sides.

    Returns ``dict(f1, precision, recall, label_f1, label_precision, label_recall, per_tag, num_items,
    num_reference_entities, num_predicted_entities)``; ``per_tag``: tag -> ``dict(precision, recall, f1)``.
    """
    _check_pairs(references, hypotheses)
    out: dict[str, Any] = {"num_items": len(references)}
    for prefix, label_only in (("", False), ("label_", True)):
        per_tag = _ner_counts(references, hypotheses, label_only)
        tp, gt, pred = (sum(c[i] for c in per_tag.values()) for i in range(3))
        out[f"{prefix}precision"], out[f"{prefix}recall"], out[f"{prefix}f1"] = _prf(tp, gt, pred)
        if not label_only:
            out["per_tag"] = {t: dict(zip(("precision", "recall", "f1"), _prf(*c))) for t, c in sorted(per_tag.items())}
            out["num_reference_entities"], out["num_predicted_entities"] = gt, pred
    return out


_SENTIMENT_WORD = re.compile(r"\b(negative|neutral|positive)\b", re.IGNORECASE)


def parse_sentiment(text: str | None) -> str | None:
    """The first of Negative / Neutral / Positive named in ``text`` (any case, as a whole word), or
    ``None``: ``"Positive."``, ``"Sentiment: negative"``, ``"I think it is neutral"``."""
    m = _SENTIMENT_WORD.search(text or "")
    return m.group(1).capitalize() if m else None


def sentiment_scores(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, Any]:
    """SLUE sentiment scores over Negative / Neutral / Positive, in percent.

    ``references``: the labels; ``hypotheses``: the model's answers, read with :func:`parse_sentiment`.
    ``macro_f1`` (SLUE's primary SA metric): the unweighted mean of the per-class F1 over the classes
    that occur among the references or the parsed predictions (scikit-learn's default label set);
    ``weighted_f1``: per-class F1 weighted by the classes' reference counts (what slue-toolkit prints
    as "micro"); ``accuracy``. An answer naming no class is wrong for its item and predicts no class.

    Returns ``dict(macro_f1, macro_precision, macro_recall, weighted_f1, accuracy, per_class,
    num_items, unparsed)``.
    """
    _check_pairs(references, hypotheses)
    refs = [parse_sentiment(r) for r in references]
    if None in refs:
        bad = references[refs.index(None)]
        raise ValueError(f"reference sentiment {bad!r} is not one of {SLUE_SENTIMENTS}")
    preds = [parse_sentiment(h) for h in hypotheses]
    classes = [c for c in SLUE_SENTIMENTS if c in refs or c in preds]
    per_class, support = {}, Counter(refs)
    for c in classes:
        tp = sum(r == c and p == c for r, p in zip(refs, preds))
        p, r, f = _prf(tp, support[c], sum(p == c for p in preds))
        per_class[c] = dict(precision=p, recall=r, f1=f, support=support[c])
    n = len(refs)
    mean = (lambda k: sum(v[k] for v in per_class.values()) / len(per_class)) if per_class else (lambda k: 0.0)
    return dict(
        macro_f1=mean("f1"),
        macro_precision=mean("precision"),
        macro_recall=mean("recall"),
        weighted_f1=sum(v["f1"] * v["support"] for v in per_class.values()) / n if n else 0.0,
        accuracy=100.0 * sum(r == p for r, p in zip(refs, preds)) / n if n else 0.0,
        per_class=per_class,
        num_items=n,
        unparsed=preds.count(None),
    )


# --- agreement with the LLM's own behaviour on the transcript (unseen instructions) ------------------------


def agreement_scores(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, Any]:
    """How far answers agree with reference answers of the same LLM: corpus chrF (sacrebleu defaults, raw
    strings, as :func:`st_scores`) and exact match (percent of items equal after :func:`normalize_text`).

    For held-out instructions the reference is the LLM's answer from the transcript; scored the same way,
    its answer to another utterance's transcript gives chance agreement and a cascade's answer what a user
    would get instead. Returns ``dict(chrf, exact, chrf_signature, num_items)``; no item: an error."""
    import sacrebleu

    _check_pairs(references, hypotheses)
    if not references:
        raise ValueError("agreement_scores needs at least one item")
    chrf = sacrebleu.CHRF()
    exact = sum(normalize_text(r) == normalize_text(h) for r, h in zip(references, hypotheses))
    return dict(
        chrf=chrf.corpus_score(list(hypotheses), [list(references)]).score,
        exact=100.0 * exact / len(references),
        chrf_signature=str(chrf.get_signature()),
        num_items=len(references),
    )
