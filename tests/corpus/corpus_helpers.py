"""Shared data and helpers of the corpus tests: fake WordNet text, engine-availability marks."""

import shutil
from pathlib import Path

import pytest

# A WordNet-like data file: licence header, synset lines whose gloss holds quoted examples.
FAKE_DATA_NOUN = """  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license. "not an example sentence here"
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which exists; "the dog barked at the mailman"; "a cat sat on the warm mat"
00001741 03 n 01 thing 0 000 | a gloss; "The Dog barked at the mailman!"; "she was clean for 4 years"; "it cost $100 in total"
00001742 03 n 01 other 0 000 | a gloss; "the FBI opened a file on him"; "the occurrence (or presence) of life"; "tiny"
00001743 03 n 01 more 0 000 | a gloss; "the party lasted until Feb. the end"; "in the early 1950s cars were big"; "the 20th century was long"
00001744 03 n 01 word 0 000 | a gloss; "The number `one' begins the sequence"; "a b c d e f g h i j k l m n o p q r s t u v w x y z aa bb cc dd ee"
"""
FAKE_DATA_VERB = """00002000 29 v 01 run 0 000 | move fast; "he ran to the station in the rain"; "they walked home after July 4 this year"
"""

# More sentences for plan and build tests: distinct, 4-30 words, plain letters.
WORDS = "apple river stone cloud green quiet market window garden silver morning candle".split()


def plain_sentences(n):
    """n distinct plain sentences, e.g. 'the apple river stone is here'."""
    out = []
    for i in range(n):
        a, b, c = WORDS[i % 12], WORDS[(i // 12) % 12], WORDS[(i // 144) % 12]
        out.append(f"the {a} {b} {c} is here")
    return out


def write_wordnet(folder: Path, sentences):
    """Write sentences as the quoted examples of a one-file fake WordNet."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f'{i:08d} 03 n 01 w 0 000 | gloss; "{s}"\n' for i, s in enumerate(sentences)]
    (folder / "data.noun").write_text("".join(lines), encoding="latin-1")
    return folder


def needs(*programs):
    """Skip a test when one of the TTS programs is not installed."""
    missing = [p for p in programs if shutil.which(p) is None]
    return pytest.mark.skipif(
        bool(missing), reason=f"not installed: {missing} (apt-get install espeak-ng flite festival ...)"
    )
