"""WordNet example extraction, number spelling, filtering and deduplication."""

import pytest

from speechmapper_tune.corpus.sentences import (
    clean_sentence,
    filter_sentences,
    iter_wordnet_examples,
    load_wordnet_sentences,
    spell_out_numbers,
)


def test_iter_examples_reads_only_quoted_gloss_strings(fake_wordnet):
    examples = list(iter_wordnet_examples(fake_wordnet))
    assert examples[0] == "the dog barked at the mailman"  # data.noun before data.verb
    assert "not an example sentence here" not in examples  # licence header skipped
    assert examples[-1] == "they walked home after July 4 this year"
    assert len(examples) == 15


def test_missing_wordnet_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="wordnet-base"):
        list(iter_wordnet_examples(tmp_path))


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("clean for 4 years", "clean for four years"),
        ("in the early 1950s", "in the early nineteen fifties"),
        ("the 20th century", "the twentieth century"),
        ("a widow in her 70s", "a widow in her seventies"),
        ("it cost 1,000 dollars", "it cost one thousand dollars"),
        ("after July 4 this year", "after July fourth this year"),
        ("the 48 states", "the forty-eight states"),
        ("a figure of 8.5 percent", None),
        ("it cost $100", None),
        ("vision was 20:20", None),
        ("agent 007 is here", None),
    ],
)
def test_spell_out_numbers(raw, expected):
    assert spell_out_numbers(raw) == expected


def test_filter_reasons_and_stored_text(fake_wordnet):
    kept, stats = filter_sentences(iter_wordnet_examples(fake_wordnet))
    texts = [s.text for s in kept]
    assert texts == [
        "the dog barked at the mailman",
        "a cat sat on the warm mat",
        "she was clean for four years",
        "in the early nineteen fifties cars were big",
        "the twentieth century was long",
        "the number one begins the sequence",
        "he ran to the station in the rain",
        "they walked home after july fourth this year",
    ]
    assert stats == {
        "total": 15,
        "kept": 8,
        "duplicate": 1,
        "digits": 1,
        "acronym": 1,
        "symbols": 1,
        "length": 2,
        "abbreviation": 1,
    }
    by_text = {s.text: s for s in kept}
    # The engine reads the WordNet wording (capitals kept), the manifest stores the normalized text.
    assert by_text["the number one begins the sequence"].tts_text == "The number 'one' begins the sequence"
    assert not any(ch.isdigit() for s in kept for ch in s.tts_text)


def test_word_limits_and_dropping_numbers():
    assert clean_sentence("one two three", min_words=4)[1] == "length"
    assert clean_sentence("one two three four", min_words=4)[0] is not None
    assert clean_sentence(" ".join(["word"] * 31), max_words=30)[1] == "length"
    assert clean_sentence("clean for 4 long years", spell_numbers=False) == (None, "digits")


def test_real_wordnet_if_installed():
    pytest.importorskip("num2words")
    try:
        kept, stats = load_wordnet_sentences()
    except FileNotFoundError:
        pytest.skip("wordnet-base not installed")
    assert stats["kept"] == len(kept) > 20000
    assert len({s.text for s in kept}) == len(kept)
    assert all(4 <= len(s.text.split()) <= 30 for s in kept)
