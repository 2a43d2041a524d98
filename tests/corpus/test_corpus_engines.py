"""Missing engines and voices: dropped from the plan with a warning; an error only when none is left."""

import logging
import shutil

import pytest
from corpus_helpers import needs

from speechmapper_tune.corpus.engines import INSTALL_HINT, FestivalEngine, SynthItem, make_engine
from speechmapper_tune.corpus.plan import check_engines
from speechmapper_tune.corpus.settings import CorpusSettings


def settings(engines=None, train=("espeak-ng:en-us", "flite:kal16"), test=("flite:slt",)):
    return CorpusSettings.from_dict(
        {
            "output_dir": "/tmp/unused",
            "engines": engines or {},
            "splits": {
                "train": {"sentences": 2, "voices": list(train)},
                "test": {"sentences": 1, "voices": list(test)},
            },
        }
    )


@needs("espeak-ng")
def test_missing_binary_drops_its_voices(caplog):
    caplog.set_level(logging.WARNING)
    check = check_engines(settings(engines={"flite": {"binary": "no-such-flite-binary"}}))
    assert set(check.engines) == {"espeak-ng"}
    assert [v.spec for v in check.voices["train"]] == ["espeak-ng:en-us"]
    assert check.voices["test"] == []
    assert "no-such-flite-binary" in caplog.text and "apt-get install" in caplog.text


def test_no_engine_at_all_is_an_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="No TTS engine found") as err:
        check_engines(settings())
    assert INSTALL_HINT in str(err.value)
    for package in ("espeak-ng", "flite", "festvox-us-slt-hts", "wordnet-base"):
        assert package in str(err.value)


@needs("espeak-ng", "flite")
def test_unknown_voice_is_dropped_with_hint(caplog):
    caplog.set_level(logging.WARNING)
    check = check_engines(settings(train=("espeak-ng:xx-nonexistent", "flite:kal16"), test=("flite:nosuchvoice",)))
    assert [v.spec for v in check.voices["train"]] == ["flite:kal16"]
    assert "espeak-ng:xx-nonexistent" in caplog.text and "flite -lv" in caplog.text


@needs("festival")
def test_festival_batch_reports_each_sentence(tmp_path):
    engine = make_engine("festival")
    items = [
        SynthItem("a short test sentence", "voice_kal_diphone", (("stretch", 1.0),), str(tmp_path / "0.wav")),
        SynthItem('it said "hi" there', "voice_kal_diphone", (), str(tmp_path / "1.wav")),
        SynthItem("cannot be written", "voice_kal_diphone", (), str(tmp_path / "no" / "2.wav")),
    ]
    errors = engine.synthesize(items)
    assert errors[:2] == [None, None] and errors[2] is not None
    assert (tmp_path / "0.wav").stat().st_size > 1000 and (tmp_path / "1.wav").is_file()


def test_festival_voice_hint_names_the_package():
    assert "festvox-us-slt-hts" in FestivalEngine(name="festival", binary="festival").missing_voice_hint(
        "voice_cmu_us_slt_arctic_hts"
    )
