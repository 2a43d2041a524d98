"""The paper's corpora read from tiny copies of their released layouts, written here by each test.

Audio: CoVoST's Common Voice clips are MP3 and VoxPopuli's segments Ogg Vorbis, both written and
read by soundfile (libsndfile) here; FLEURS, Spoken-SQuAD and the EuroParl-ST speeches are WAV.
EuroParl-ST releases AAC .m4a speeches, which nothing here can decode offline (no ffmpeg, and
libsndfile has no AAC): the test converts-by-fixture (a .wav beside the .m4a, as
``ffmpeg -i X.m4a X.wav`` would leave it) and checks that a speech with only its .m4a is skipped
with that reason while its manifest parts (segments.lst, texts, speeches.lst) are still checked.
"""

import json
import logging

import numpy as np
import pytest
import soundfile as sf

from speechmapper_tune.corpus import load_audio_manifest
from speechmapper_tune.corpus.paper_corpora import (
    QAS,
    TARGET_LANG,
    TRANSLATION,
    detect_corpus_format,
    read_spoken_squad,
)
from speechmapper_tune.data.extract import load_cut_audio

SR = 16000


def tone(seconds, freq=220.0, sr=SR):
    t = np.arange(int(seconds * sr)) / sr
    return (0.2 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_audio(path, audio, sr=SR, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), audio, sr, **kw)
    return path


def warnings_of(caplog):
    return " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ----------------------------------------------------------------------------- CoVoST 2


def covost_fixture(tmp_path):
    lang_dir = tmp_path / "cv-corpus" / "en"
    for name, secs in (("common_voice_en_1.mp3", 1.0), ("common_voice_en_2.mp3", 0.5)):
        write_audio(lang_dir / "clips" / name, tone(secs), format="MP3", subtype="MPEG_LAYER_III")
    tsv = lang_dir / "covost_v2.en_de.dev.tsv"
    tsv.write_text(
        "path\tsentence\ttranslation\tclient_id\n"
        "common_voice_en_1.mp3\tHello there.\tHallo zusammen.\tc1\n"
        'common_voice_en_2.mp3\tA "quoted" word.\tEin "zitiertes" Wort.\tc2\n'
        "common_voice_en_3.mp3\tNot downloaded.\tNicht geladen.\tc3\n",
        encoding="utf-8",
    )
    return tsv


def test_covost2_split_file_keeps_translations_and_skips_missing_clips(tmp_path, caplog):
    tsv = covost_fixture(tmp_path)
    assert detect_corpus_format(tsv) == "covost2"
    with caplog.at_level(logging.WARNING):
        cuts = {c.id: c for c in load_audio_manifest(tsv)}
    assert sorted(cuts) == ["common_voice_en_1", "common_voice_en_2"]
    sup = cuts["common_voice_en_2"].supervisions[0]
    assert sup.text == 'A "quoted" word.' and sup.language == "en" and sup.speaker == "c2"
    assert sup.custom[TRANSLATION] == 'Ein "zitiertes" Wort.' and sup.custom[TARGET_LANG] == "de"
    assert sup.custom["split"] == "dev"
    assert abs(cuts["common_voice_en_1"].duration - 1.0) < 0.05  # MP3 decoders may pad a frame
    assert "skipped 1 of 3 items: audio file missing: 1 (e.g. common_voice_en_3" in warnings_of(caplog)
    assert load_cut_audio(cuts["common_voice_en_1"], 30.0).shape[0] == pytest.approx(SR, abs=SR * 0.05)
    # an explicit format prefix reads the same
    assert sorted(c.id for c in load_audio_manifest(f"covost2:{tsv}")) == sorted(cuts)


def test_covost2_malformed_row_and_header_name_file_and_line(tmp_path):
    tsv = covost_fixture(tmp_path)
    lines = tsv.read_text().splitlines()
    tsv.write_text("\n".join(lines[:2] + ["common_voice_en_2.mp3\tonly two fields"] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match=rf"{tsv.name}, line 3: 2 tab-separated fields, the header has 4"):
        load_audio_manifest(tsv)
    tsv.write_text("path\tsentence\n" + "x.mp3\thello\n")
    with pytest.raises(ValueError, match=r"line 1: the header lacks column\(s\) \['translation'\]"):
        load_audio_manifest(tsv)


def test_covost2_without_a_clips_folder_says_where_it_looked(tmp_path):
    tsv = tmp_path / "covost_v2.en_zh-CN.test.tsv"
    tsv.write_text("path\tsentence\ttranslation\tclient_id\n")
    with pytest.raises(FileNotFoundError, match="clips folder .*clips not found"):
        load_audio_manifest(tsv)


# ----------------------------------------------------------------------------- EuroParl-ST


def europarl_fixture(tmp_path):
    root = tmp_path / "v1.1"
    speech = np.concatenate([tone(1.0, 200), tone(1.0, 400), tone(1.0, 600)])
    write_audio(root / "en" / "audios" / "en.20080924.31.3-243.wav", speech)
    (root / "en" / "audios" / "en.20080924.31.3-243.m4a").write_bytes(b"\0\0\0\x18ftypM4A ")  # the original
    (root / "en" / "audios" / "en.20080925.4.3-018.m4a").write_bytes(b"\0\0\0\x18ftypM4A ")  # not converted
    split = root / "en" / "de" / "dev"
    split.mkdir(parents=True)
    (split / "segments.lst").write_text(
        "en.20080924.31.3-243 1.00 2.00\nen.20080924.31.3-243 2.00 2.90\nen.20080925.4.3-018 0.50 3.00\n"
    )
    (split / "segments.en").write_text("Madam President, thank you.\nI agree.\nUnconverted speech.\n")
    (split / "segments.de").write_text(
        "Frau Präsidentin, danke.\nIch stimme zu.\nNicht konvertiert.\n", encoding="utf-8"
    )
    (split / "speeches.lst").write_text("en.20080924.31.3-243\nen.20080925.4.3-018\n")
    return root, split, speech


def test_europarl_st_split_folder_gives_segment_cuts_over_the_speech(tmp_path, caplog):
    root, split, speech = europarl_fixture(tmp_path)
    assert detect_corpus_format(split) == "europarl_st"
    with caplog.at_level(logging.WARNING):
        cuts = list(load_audio_manifest(split))
    assert [c.id for c in cuts] == ["en.20080924.31.3-243_0001", "en.20080924.31.3-243_0002"]
    first, second = cuts
    assert (first.start, first.duration) == (1.0, 1.0) and (second.start, second.duration) == (2.0, 0.9)
    assert first.recording.sources[0].source.endswith(".wav")  # the decodable copy, not the .m4a
    sup = first.supervisions[0]
    assert sup.text == "Madam President, thank you." and sup.language == "en"
    assert sup.custom[TRANSLATION] == "Frau Präsidentin, danke." and sup.custom[TARGET_LANG] == "de"
    # the segment's audio is the speech's samples from 1 s to 2 s (what the feature extractor reads)
    np.testing.assert_allclose(load_cut_audio(first, 30.0), speech[SR : 2 * SR], atol=1e-4)  # 16-bit wav: 3e-5 steps
    assert "only .m4a audio, which soundfile cannot decode" in warnings_of(caplog)
    assert "en.20080925.4.3-018_0001" in warnings_of(caplog)


def test_europarl_st_malformed_parts_name_file_and_line(tmp_path):
    _, split, _ = europarl_fixture(tmp_path)
    (split / "segments.lst").write_text("en.20080924.31.3-243 1.00 2.00\nen.20080924.31.3-243 2.00\nx 1 2\n")
    with pytest.raises(ValueError, match=r"segments.lst, line 2: expected '<speech> <start> <end>'"):
        load_audio_manifest(split)
    (split / "segments.lst").write_text("en.20080924.31.3-243 1.00 2.00\nen.20080924.31.3-243 2.00 2.50\n")
    with pytest.raises(ValueError, match=r"segments.en has 3 lines, .*segments.lst has 2"):
        load_audio_manifest(split)
    (split / "segments.lst").write_text("en.20080924.31.3-243 1.00 2.00\nen.20080924.31.3-243 2.00 2.50\nother 0 1\n")
    with pytest.raises(ValueError, match=r"segments.lst, line 3: speech 'other' is not in .*speeches.lst"):
        load_audio_manifest(split)


def test_europarl_st_segment_past_the_audio_is_skipped(tmp_path, caplog):
    _, split, _ = europarl_fixture(tmp_path)
    (split / "segments.lst").write_text(
        "en.20080924.31.3-243 1.00 2.00\nen.20080924.31.3-243 2.00 9.00\nen.20080924.31.3-243 0.00 0.50\n"
    )
    with caplog.at_level(logging.WARNING):
        cuts = list(load_audio_manifest(split))
    assert [c.id for c in cuts] == ["en.20080924.31.3-243_0001", "en.20080924.31.3-243_0003"]
    assert "segment ends after its speech audio: 1" in warnings_of(caplog)


# ----------------------------------------------------------------------------- Spoken-SQuAD

SQUAD = {
    "data": [
        {
            "title": "Super_Bowl_50",
            "paragraphs": [
                {
                    "context": "super bowl fifty was an american football game. the game was played in santa clara.",
                    "qas": [
                        {
                            "id": "q1",
                            "question": "Where was Super Bowl 50 played?",
                            "answers": [
                                {"answer_start": 70, "text": "santa clara"},
                                {"answer_start": 70, "text": "santa clara"},
                            ],
                        },
                        {
                            "id": "q2",
                            "question": "What kind of game was it?",
                            "answers": [{"answer_start": 24, "text": "american football"}],
                        },
                    ],
                },
                {
                    "context": "a paragraph whose first sentence has no audio.",
                    "qas": [{"id": "q3", "question": "Why?", "answers": []}],
                },
            ],
        }
    ]
}


def spoken_squad_fixture(tmp_path):
    root = tmp_path / "Spoken-SQuAD"
    root.mkdir()
    (root / "spoken_test-v1.1.json").write_text(json.dumps(SQUAD))
    wavs = root / "Spoken-SQuAD_audio" / "dev_wav"  # the test set was made from SQuAD's dev set
    s0, s1 = tone(0.6, 300, 24000), tone(0.4, 500, 24000)  # the released TTS wavs are 24 kHz
    write_audio(wavs / "0_0_0.wav", s0, 24000)
    write_audio(wavs / "0_0_1.wav", s1, 24000)
    write_audio(wavs / "0_1_1.wav", tone(0.3, 24000), 24000)  # sentence 0 of paragraph 1 is missing
    return root / "spoken_test-v1.1.json", wavs, np.concatenate([s0, s1])


def test_spoken_squad_joins_sentence_wavs_into_paragraph_cuts_with_their_questions(tmp_path, caplog):
    js, wavs, joined = spoken_squad_fixture(tmp_path)
    assert detect_corpus_format(js) == "spoken_squad"
    with caplog.at_level(logging.WARNING):
        cuts = list(load_audio_manifest(js))
    assert [c.id for c in cuts] == ["0_0"]
    cut = cuts[0]
    sup = cut.supervisions[0]
    assert sup.text == SQUAD["data"][0]["paragraphs"][0]["context"] and sup.language == "en"
    assert sup.custom[QAS] == [
        {"id": "q1", "question": "Where was Super Bowl 50 played?", "answers": ["santa clara", "santa clara"]},
        {"id": "q2", "question": "What kind of game was it?", "answers": ["american football"]},
    ]
    paragraph_wav = wavs.with_name("dev_wav_paragraphs") / "0_0.wav"
    assert cut.recording.sources[0].source == str(paragraph_wav)
    audio, sr = sf.read(str(paragraph_wav), dtype="float32")
    assert sr == 24000 and audio.shape == joined.shape
    np.testing.assert_allclose(audio, joined, atol=1e-4)  # 16-bit PCM: steps of 3e-5
    assert cut.duration == pytest.approx(1.0)
    assert "sentence wavs missing inside the paragraph: 1 (e.g. 0_1 (sentence(s) [0]))" in warnings_of(caplog)
    # a second read reuses the joined file
    mtime = paragraph_wav.stat().st_mtime_ns
    assert [c.id for c in read_spoken_squad(js)] == ["0_0"] and paragraph_wav.stat().st_mtime_ns == mtime


def test_spoken_squad_malformed_json_names_file_line_and_item(tmp_path):
    js, _, _ = spoken_squad_fixture(tmp_path)
    js.write_text('{"data": [\n{"title": "x",\n "paragraphs": [}\n]}')
    with pytest.raises(ValueError, match=r"spoken_test-v1.1.json, line 3 column \d+: invalid JSON"):
        load_audio_manifest(js)
    bad = json.loads(json.dumps(SQUAD))
    del bad["data"][0]["paragraphs"][0]["qas"][1]["question"]
    js.write_text(json.dumps(bad))
    with pytest.raises(
        ValueError, match=r"data\[0\].paragraphs\[0\].qas\[1\]: expected an object with 'id' and 'question'"
    ):
        load_audio_manifest(js)


# ----------------------------------------------------------------------------- VoxPopuli


def test_voxpopuli_transcribed_layout(tmp_path, caplog):
    lang_dir = tmp_path / "transcribed_data" / "en"
    write_audio(
        lang_dir / "2009" / "20090113-0900-PLENARY-12-en_20090113-19:43:42_3.ogg",
        tone(0.8),
        format="OGG",
        subtype="VORBIS",
    )
    tsv = lang_dir / "asr_test.tsv"
    tsv.write_text(
        "id\traw_text\tnormalized_text\tspeaker_id\tsplit\tgender\n"
        "20090113-0900-PLENARY-12-en_20090113-19:43:42_3\tMr President, 2 points.\tmr president two points\t96\ttest\tmale\n"
        "20100305-0900-PLENARY-4-en_20100305-10:00:00_1\tGone.\tgone\t12\ttest\tfemale\n"
    )
    assert detect_corpus_format(tsv) == "voxpopuli"
    with caplog.at_level(logging.WARNING):
        cuts = list(load_audio_manifest(tsv))
    assert len(cuts) == 1
    sup = cuts[0].supervisions[0]
    assert sup.text == "mr president two points" and sup.custom["written"] == "Mr President, 2 points."
    assert sup.language == "en" and sup.speaker == "96" and sup.gender == "male"
    assert cuts[0].duration == pytest.approx(0.8)
    assert load_cut_audio(cuts[0], 30.0).shape == (int(0.8 * SR),)
    assert "audio file missing: 1" in warnings_of(caplog)
    tsv.write_text("id\traw_text\tnormalized_text\n20090113-x\ta\tb\textra\n")
    with pytest.raises(ValueError, match=r"asr_test.tsv, line 2: 4 tab-separated fields, the header has 3"):
        load_audio_manifest(tsv)


# ----------------------------------------------------------------------------- FLEURS


def test_fleurs_released_layout(tmp_path, caplog):
    lang_dir = tmp_path / "fleurs" / "data" / "en_us"
    write_audio(lang_dir / "audio" / "dev" / "1001.wav", tone(0.7))
    tsv = lang_dir / "dev.tsv"
    tsv.write_text(
        "1661\t1001.wav\tHe did not set a figure.\the did not set a figure\th e | d i d |\t11200\tMALE\n"
        "1662\t1002.wav\tMissing audio.\tmissing audio\tm i |\t16000\tFEMALE\n"
    )
    assert detect_corpus_format(tsv) == "fleurs"
    with caplog.at_level(logging.WARNING):
        cuts = list(load_audio_manifest(tsv))
    assert [c.id for c in cuts] == ["1001"]
    sup = cuts[0].supervisions[0]
    assert sup.text == "he did not set a figure" and sup.custom["written"] == "He did not set a figure."
    assert sup.language == "en" and sup.custom["fleurs_lang"] == "en_us" and sup.custom["sentence_id"] == "1661"
    assert "audio file missing: 1" in warnings_of(caplog)
    tsv.write_text("1661\t1001.wav\tonly three\n")
    with pytest.raises(ValueError, match=r"dev.tsv, line 1: 3 tab-separated fields, FLEURS rows have 7"):
        load_audio_manifest(tsv)


def test_no_readable_audio_at_all_is_an_error_with_the_reasons(tmp_path):
    lang_dir = tmp_path / "en_us"
    (lang_dir / "audio" / "test").mkdir(parents=True)
    (lang_dir / "test.tsv").write_text("1\t1.wav\tA.\ta\ta |\t16000\tMALE\n")
    with pytest.raises(ValueError, match=r"no utterance with readable audio \(skipped: \{'audio file missing': 1\}\)"):
        load_audio_manifest(lang_dir / "test.tsv")


def test_other_manifests_are_not_taken_for_a_corpus(tmp_path):
    plain = tmp_path / "train.tsv"  # a FLEURS name but no audio/ folder beside it
    plain.write_text("x\n")
    assert detect_corpus_format(plain) is None and detect_corpus_format(tmp_path) is None
    # Spoken-SQuAD's noisy-test transcripts do not belong to the clean dev_wav audio: never paired by name
    assert detect_corpus_format(tmp_path / "spoken_test-v1.1_WER44.json") is None
    with pytest.raises(ValueError, match=r"call read_spoken_squad\(path, audio_dir="):
        load_audio_manifest(f"spoken_squad:{plain}")
    with pytest.raises(ValueError, match="corpus format 'mustc'"):
        load_audio_manifest(plain, corpus_format="mustc")
