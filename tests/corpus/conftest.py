"""Fixtures of the corpus tests."""

import pytest
from corpus_helpers import FAKE_DATA_NOUN, FAKE_DATA_VERB


@pytest.fixture
def fake_wordnet(tmp_path):
    """A folder with data.noun and data.verb in WordNet's line format."""
    folder = tmp_path / "wordnet"
    folder.mkdir()
    (folder / "data.noun").write_text(FAKE_DATA_NOUN, encoding="latin-1")
    (folder / "data.verb").write_text(FAKE_DATA_VERB, encoding="latin-1")
    return folder
