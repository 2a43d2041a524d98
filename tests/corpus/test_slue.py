"""SLUE-VoxPopuli (NER) and SLUE-VoxCeleb (sentiment) readers on tiny folders in the released layout."""

import csv

import numpy as np
import pytest
import soundfile as sf

from speechmapper_tune.corpus.manifest_io import AUDIO_ERROR, load_audio_manifest
from speechmapper_tune.corpus.slue import is_slue, load_slue, parse_ner_spans
from speechmapper_tune.metrics import parse_entities

SR = 16000
VP_COLUMNS = ["id", "raw_text", "normalized_text", "speaker_id", "split", "raw_ner", "normalized_ner"]


def _tone(seconds, freq=220.0):
    t = np.arange(int(seconds * SR)) / SR
    return (0.1 * np.sin(2 * np.pi * freq * t)).astype("float32")


def _tsv(path, columns, rows):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t")  # pandas' to_csv(sep="\t") quoting, as the released files
        w.writerow(columns)
        w.writerows(rows)


@pytest.fixture
def voxpopuli(tmp_path):
    root = tmp_path / "slue-voxpopuli"
    for split in ("fine-tune", "dev", "test"):
        (root / split).mkdir(parents=True)
    text = "the european union met in brussels on monday with mr smith"
    spans = [("ORG", "european union"), ("GPE", "brussels"), ("DATE", "monday"), ("PERSON", "smith"), ("EVENT", "the")]
    ner = [[tag, text.index(phrase), len(phrase)] for tag, phrase in spans]  # (tag, character start, length)
    rows = [
        ["20100118-0900-PLENARY-3_en_1", "The European Union ...", text, "1234", "dev", "[]", str(ner)],
        ["20100118-0900-PLENARY-3_en_2", "No entities.", "no entities here", "1235", "dev", "[]", "None"],
    ]
    _tsv(root / "slue-voxpopuli_dev.tsv", VP_COLUMNS, rows)
    sf.write(root / "dev" / f"{rows[0][0]}.ogg", _tone(1.0), SR, format="OGG", subtype="VORBIS")
    # the second item's audio is missing: one bad item, not a bad manifest
    _tsv(root / "slue-voxpopuli_test_blind.tsv", ["id", "speaker_id", "split"], [["t_1", "9", "test"]])
    sf.write(root / "test" / "t_1.ogg", _tone(0.5), SR, format="OGG", subtype="VORBIS")
    return root, text


def test_voxpopuli_ner_labels_in_combined_tags(voxpopuli):
    root, text = voxpopuli
    cuts = load_audio_manifest(root / "slue-voxpopuli_dev.tsv")
    assert [c.id for c in cuts] == ["20100118-0900-PLENARY-3_en_1", "20100118-0900-PLENARY-3_en_2"]
    first, second = cuts
    sup = first.supervisions[0]
    assert sup.text == text and sup.language == "en" and sup.speaker == "1234"
    # EVENT is one of the tags SLUE's combined set drops; GPE -> PLACE, DATE -> WHEN
    assert sup.custom["ner"] == [
        ["ORG", "european union"],
        ["PLACE", "brussels"],
        ["WHEN", "monday"],
        ["PERSON", "smith"],
    ]
    assert sup.custom["ner_answer"] == "ORG: european union; PLACE: brussels; WHEN: monday; PERSON: smith"
    assert parse_entities(sup.custom["ner_answer"])[0] == [tuple(e) for e in sup.custom["ner"]]
    assert sup.custom["task"] == "ner" and sup.custom["split"] == "dev"
    assert first.duration == pytest.approx(1.0, abs=1e-3) and first.load_audio().shape == (1, SR)
    assert second.supervisions[0].custom["ner"] == [] and second.supervisions[0].custom["ner_answer"] == "none"
    assert "does not exist" in second.supervisions[0].custom[AUDIO_ERROR]


def test_voxpopuli_combined_column_preferred_and_blind_test(voxpopuli):
    root, text = voxpopuli
    _tsv(
        root / "slue-voxpopuli_fine-tune.tsv",
        VP_COLUMNS + ["normalized_combined_ner"],
        [["f_1", "", "in paris today", "7", "fine-tune", "[]", "[['GPE', 3, 5]]", "[['PLACE', 3, 5], ['WHEN', 9, 5]]"]],
    )
    sf.write(root / "fine-tune" / "f_1.ogg", _tone(0.3), SR, format="OGG", subtype="VORBIS")
    cuts = {c.id: c for c in load_audio_manifest(root)}  # the released folder: every split's TSV
    assert set(cuts) == {"20100118-0900-PLENARY-3_en_1", "20100118-0900-PLENARY-3_en_2", "f_1", "t_1"}
    assert cuts["f_1"].supervisions[0].custom["ner"] == [["PLACE", "paris"], ["WHEN", "today"]]
    blind = cuts["t_1"].supervisions[0]
    assert blind.text == "" and "ner" not in blind.custom and blind.custom["split"] == "test"


def test_bad_ner_cells_are_named():
    assert parse_ner_spans("None", "abc", "x") == [] and parse_ner_spans("[]", "abc", "x") == []
    with pytest.raises(ValueError, match=r"f\.tsv, line 3: NER span \['GPE', 2, 5\] lies outside"):
        parse_ner_spans("[['GPE', 2, 5]]", "abc", "f.tsv, line 3")
    with pytest.raises(ValueError, match="not a list"):
        parse_ner_spans("__import__('os')", "abc", "f.tsv, line 3")


@pytest.fixture
def voxceleb(tmp_path):
    root = tmp_path / "slue-voxceleb"
    (root / "dev_raw").mkdir(parents=True)
    cols = ["id", "normalized_text", "speaker_id", "split", "start_second", "end_second", "sentiment"]
    rows = [
        ["id10059_229vKIGbxrI_00001", "i loved it", "id10059", "dev", "0.5", "1.5", "Positive"],
        ["id10059_229vKIGbxrI_00002", "it was fine", "id10059", "dev", "0.0", "0.8", "Neutral"],
        ["id10060_abc_00001", "so so", "id10060", "dev", "0.0", "0.5", "<mixed>"],
    ]
    _tsv(root / "slue-voxceleb_dev.tsv", cols, rows)
    sf.write(root / "dev_raw" / f"{rows[0][0]}.flac", _tone(2.0), SR)
    sf.write(root / "dev_raw" / f"{rows[1][0]}.flac", _tone(1.0), SR)
    return root


def test_voxceleb_sentiment_segments_of_the_raw_audio(voxceleb, caplog):
    cuts = load_audio_manifest(voxceleb / "slue-voxceleb_dev.tsv")
    assert [c.id for c in cuts] == ["id10059_229vKIGbxrI_00001", "id10059_229vKIGbxrI_00002"]
    assert "left out 1 rows" in caplog.text and "<mixed>: 1" in caplog.text  # as slue-toolkit filters them
    first = cuts[0]
    assert first.start == pytest.approx(0.5) and first.duration == pytest.approx(1.0)
    audio = first.load_audio()
    assert audio.shape == (1, SR)
    raw, _ = sf.read(voxceleb / "dev_raw" / f"{first.id}.flac", dtype="float32")
    np.testing.assert_allclose(audio[0], raw[SR // 2 : SR // 2 + SR], atol=1e-4)  # FLAC is lossless at 16 bits: 1 LSB
    sup = first.supervisions[0]
    assert sup.custom["sentiment"] == "Positive" and sup.custom["task"] == "sa" and sup.text == "i loved it"


def test_voxceleb_segmented_audio_is_used_whole(voxceleb):
    (voxceleb / "dev").mkdir()
    sf.write(voxceleb / "dev" / "id10059_229vKIGbxrI_00001.flac", _tone(1.0), SR)
    cut = load_slue(voxceleb / "slue-voxceleb_dev.tsv")[0]
    assert cut.start == 0.0 and cut.duration == pytest.approx(1.0)


def test_not_slue(tmp_path):
    (tmp_path / "asr_dev.tsv").write_text("id\n")
    assert not is_slue(tmp_path / "asr_dev.tsv") and not is_slue(tmp_path)
    (tmp_path / "slue-voxceleb_dev.tsv").write_text("id\tnormalized_text\n")
    with pytest.raises(ValueError, match="no column start_second, end_second"):
        load_slue(tmp_path)
