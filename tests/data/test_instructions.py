"""ST / SQA instruction rows from feature manifests of the paper's corpora, and `tune run speechmapper_instructions`.

The feature manifests are made by the extractor's own chunk writer (``extract_chunk`` +
``merge_chunks``) from tiny CoVoST 2 / Spoken-SQuAD copies in their released layouts, with a
stand-in encoder (one 8-dim frame per 20 ms) in place of the SFM: the rows only need the cuts'
ids and supervision fields, which come through extraction unchanged.
"""

import json

import numpy as np
import pytest
import soundfile as sf
from documented_variants import load_with_overrides, shell_variables, variant_args
from omegaconf import OmegaConf

from speechmapper_tune.assets import smollm2_dir
from speechmapper_tune.configs import resolve_config
from speechmapper_tune.corpus import load_audio_manifest
from speechmapper_tune.data.extract import extract_chunk, merge_chunks
from speechmapper_tune.data.instructions import build_instructions, instruction_rows, load_translations
from speechmapper_tune.data.manifest import SkipCounter, load_feature_items
from speechmapper_tune.data.stage2 import PromptTemplate, prepare_instruction_examples
from speechmapper_tune.models.chat_format import ChatTokenizer

SR = 16000
ST_CONFIG = OmegaConf.load(resolve_config("instructions/st"))
ST = dict(ST_CONFIG.st_instructions)


def tone(seconds, sr=SR):
    return (0.1 * np.sin(np.arange(int(seconds * sr)) / 7)).astype(np.float32)


def fake_encoder(waves):
    return [np.stack([np.full(8, i / 10, np.float32) for i in range(len(w) // 320)]) for w in waves]


def features_of(corpus_path, out_dir):
    """The feature manifest speechmapper_extract would write for ``corpus_path`` (stand-in encoder)."""
    cuts = list(load_audio_manifest(corpus_path))
    extract_chunk(cuts, fake_encoder, out_dir, 0, "fake_avg2", 0.04, 2, batch_size=4, max_duration=60.0)
    manifest, n, failed = merge_chunks(out_dir, 1)
    assert (n, failed) == (len(cuts), 0)
    return manifest


def covost(tmp_path, pair="en_de", rows=None):
    lang_dir = tmp_path / "cv" / "en"
    rows = rows or [
        ("common_voice_en_1.mp3", "Hello there.", "Hallo zusammen."),
        ("common_voice_en_2.mp3", "Good, thanks!", "Gut, danke!"),
        ("common_voice_en_3.mp3", "Empty target.", ""),
    ]
    for name, _, _ in rows:
        (lang_dir / "clips").mkdir(parents=True, exist_ok=True)
        sf.write(str(lang_dir / "clips" / name), tone(0.5), SR, format="MP3", subtype="MPEG_LAYER_III")
    tsv = lang_dir / f"covost_v2.{pair}.dev.tsv"
    tsv.write_text(
        "path\tsentence\ttranslation\tclient_id\n" + "".join(f"{p}\t{s}\t{t}\tc\n" for p, s, t in rows),
        encoding="utf-8",
    )
    return tsv


def spoken_squad(tmp_path):
    root = tmp_path / "sqa"
    doc = {
        "data": [
            {
                "title": "T",
                "paragraphs": [
                    {
                        "context": "the broncos won the game in santa clara.",
                        "qas": [
                            {
                                "id": "a1",
                                "question": "Who won the game? ",
                                "answers": [{"text": "the broncos"}, {"text": "broncos"}],
                            },
                            {"id": "a2", "question": "Where was it?", "answers": [{"text": "santa clara"}]},
                            {"id": "a3", "question": "No answer?", "answers": []},
                        ],
                    }
                ],
            }
        ]
    }
    root.mkdir()
    (root / "spoken_train-v1.1.json").write_text(json.dumps(doc))
    wavs = root / "Spoken-SQuAD_audio" / "train_wav"
    wavs.mkdir(parents=True)
    for s in range(2):
        sf.write(str(wavs / f"0_0_{s}.wav"), tone(0.4), SR)
    return root / "spoken_train-v1.1.json"


def cuts_of(manifest):
    from lhotse import CutSet

    return list(CutSet.from_file(str(manifest)))


def test_st_rows_carry_the_target_language_instruction_and_the_translation(tmp_path):
    manifest = features_of(covost(tmp_path), tmp_path / "feats")
    skipped = SkipCounter()
    rows = instruction_rows(cuts_of(manifest), "st", ST, skipped=skipped)
    assert rows == [
        {
            "id": "common_voice_en_1",
            "features": "common_voice_en_1",
            "task": "st",
            "target_lang": "de",
            "instruction": ST["de"],
            "answer": "Hallo zusammen.",
            "transcript": "hello there",
        },
        {
            "id": "common_voice_en_2",
            "features": "common_voice_en_2",
            "task": "st",
            "target_lang": "de",
            "instruction": ST["de"],
            "answer": "Gut, danke!",
            "transcript": "good thanks",
        },
    ]
    assert skipped.as_dict() == {"empty translation": 1}
    no_transcript = instruction_rows(cuts_of(manifest), "st", ST, with_transcript=False)
    assert all("transcript" not in r for r in no_transcript)
    assert instruction_rows(cuts_of(manifest), "st", ST, target_langs=["zh-CN"], skipped=SkipCounter()) == []


def test_regional_target_codes_use_their_base_language_and_unknown_ones_are_named(tmp_path):
    rows = [("common_voice_en_1.mp3", "Hello.", "你好。")]
    manifest = features_of(covost(tmp_path, "en_zh-CN", rows), tmp_path / "feats")
    (row,) = instruction_rows(cuts_of(manifest), "st", ST)
    assert row["target_lang"] == "zh-CN" and row["instruction"] == ST["zh"] and row["answer"] == "你好。"
    with pytest.raises(
        ValueError, match=r"no ST instruction for target language 'zh-CN' \(st_instructions has \['de'\]\)"
    ):
        instruction_rows(cuts_of(manifest), "st", {"de": ST["de"]})


def test_sqa_rows_one_per_answered_question(tmp_path):
    manifest = features_of(spoken_squad(tmp_path), tmp_path / "feats")
    skipped = SkipCounter()
    rows = instruction_rows(
        cuts_of(manifest), "sqa", sqa_instruction="Answer: {question}", with_transcript=False, skipped=skipped
    )
    assert [r["id"] for r in rows] == ["0_0/a1", "0_0/a2"]
    assert rows[0] == {
        "id": "0_0/a1",
        "features": "0_0",
        "task": "sqa",
        "instruction": "Answer: Who won the game?",
        "question": "Who won the game? ",
        "answer": "the broncos",
        "answers": ["the broncos", "broncos"],
        "context": "the broncos won the game in santa clara.",
    }
    assert skipped.as_dict() == {"question without an answer": 1}
    # an ST corpus has no questions, an SQA corpus no translations: counted, and no row is an error
    with pytest.raises(ValueError, match=r"no st instruction row \(skipped: no translation in the manifest"):
        build_instructions(manifest, tmp_path / "x.jsonl", "st", ST)
    with pytest.raises(ValueError, match=r"sqa_instruction must contain \{question\} exactly once"):
        instruction_rows([], "sqa", sqa_instruction="no slot")


def test_a_translations_file_gives_cuts_without_one_their_translation(tmp_path):
    # a corpus with no translations in its manifest (Spoken-SQuAD's layout stands in for the TTS corpus)
    manifest = features_of(spoken_squad(tmp_path), tmp_path / "feats")
    table = tmp_path / "fr.jsonl"
    table.write_text(
        json.dumps(
            {
                "source": "The Broncos won the game, in Santa Clara!",
                "translation": " Les Broncos ont gagné. ",
                "target_lang": "fr",
            }
        )
        + "\n",
        encoding="utf-8",
    )
    n, skipped = build_instructions(manifest, tmp_path / "st.jsonl", "st", ST, translations=table)
    (row,) = [json.loads(line) for line in (tmp_path / "st.jsonl").read_text(encoding="utf-8").splitlines()]
    assert (n, row["target_lang"], row["answer"], row["instruction"]) == (1, "fr", "Les Broncos ont gagné.", ST["fr"])
    assert skipped.as_dict() == {}
    table.write_text(
        json.dumps({"source": "another sentence", "translation": "une autre phrase", "target_lang": "fr"}) + "\n"
    )
    with pytest.raises(ValueError, match=r"skipped: no translation in the manifest or the translations file"):
        build_instructions(manifest, tmp_path / "st.jsonl", "st", ST, translations=table)
    # bad files are named with their line before the manifest is read
    table.write_text('{"source": "a", "translation": "b", "target_lang": "fr"}\n{"source": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"fr.jsonl:2: expected a JSON object with source, translation, target_lang"):
        build_instructions(manifest, tmp_path / "st.jsonl", "st", ST, translations=table)
    table.write_text(
        '{"source": "A!", "translation": "b", "target_lang": "fr"}\n'
        '{"source": "a", "translation": "c", "target_lang": "fr"}\n',
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match=r"fr.jsonl:2: 'a' has two different translations"):
        load_translations(table)
    with pytest.raises(FileNotFoundError, match="translations file not found"):
        load_translations(tmp_path / "missing.jsonl")


def test_the_packaged_demo_translations_read_cleanly():
    from speechmapper_tune.corpus import translations_file

    table = load_translations(translations_file("tts_en_fr"))
    assert len(table) == 100 and {lang for lang, _ in table.values()} == {"fr"}


def test_shipped_st_instructions_equal_the_stage2_st_prompts():
    for name in ("smollm2_135M/stage2_st_ce", "llama3_1_8B/stage2_st_ce"):
        assert dict(OmegaConf.load(resolve_config(name)).prompt.instructions) == ST, name
    eurollm = load_with_overrides("llama3_1_8B/stage2_st_ce", shell_variables()["EUROLLM"].split())
    assert dict(eurollm.prompt.instructions) == ST


def test_instructions_recipe_writes_what_stage2_reads(tmp_path, tune):
    manifest = features_of(covost(tmp_path), tmp_path / "st_dev")
    tune(["run", "speechmapper_instructions", "--config", "instructions/st", f"manifest={manifest}"], cwd=tmp_path)
    written = tmp_path / "st_dev" / "instructions.jsonl"  # beside the manifest, where the stage-2 configs look
    rows = [json.loads(line) for line in written.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["common_voice_en_1", "common_voice_en_2"]
    # stage 2 reads them with its ST config's prompt and the model's chat format
    stage2 = OmegaConf.load(resolve_config("smollm2_135M/stage2_st_ce"))
    template = PromptTemplate(**OmegaConf.to_container(stage2.prompt, resolve=True))
    chat = ChatTokenizer.from_dir(smollm2_dir(), chat_format="smollm2", pad_token=16)
    items = {it.id: it for it in load_feature_items(manifest)}
    skipped = SkipCounter()
    examples = prepare_instruction_examples(written, items, chat, template, lambda n: n // 2, 512, skipped, "st")
    assert skipped.total() == 0 and [ex.item.id for ex in examples] == ["common_voice_en_1", "common_voice_en_2"]
    assert chat.decode(examples[1].response[:-1]) == "Gut, danke!" and examples[1].meta["target_lang"] == "de"
    assert "Kannst du den Sprachinhalt" in chat.decode(examples[0].prompt.suffix)
    assert examples[0].target_ids == chat.encode_text("hello there")  # the MSE targets, for sigma > 0

    sqa_manifest = features_of(spoken_squad(tmp_path), tmp_path / "sqa_train")
    out = tmp_path / "elsewhere" / "instructions.jsonl"
    tune(
        [
            "run",
            "speechmapper_instructions",
            "--config",
            "instructions/sqa",
            f"manifest={sqa_manifest}",
            f"output_dir={out.parent}",
        ],
        cwd=tmp_path,
    )
    assert [json.loads(line)["instruction"] for line in out.read_text().splitlines()] == [
        "Who won the game?",
        "Where was it?",
    ]


def test_europarl_st_folder_through_extract_and_instructions(tmp_path, tune):
    """The user's chain on real Whisper tiny.en weights: EuroParl-ST split folder -> features -> instructions."""
    root = tmp_path / "europarl-st" / "v1.1"
    (root / "en" / "audios").mkdir(parents=True)
    sf.write(str(root / "en" / "audios" / "en.1.wav"), np.concatenate([tone(1.0), tone(1.5)]), SR)
    split = root / "en" / "it" / "dev"
    split.mkdir(parents=True)
    (split / "segments.lst").write_text("en.1 0.0 1.0\nen.1 1.0 2.5\n")
    (split / "segments.en").write_text("Thank you.\nI agree with you.\n")
    (split / "segments.it").write_text("Grazie.\nSono d'accordo con lei.\n")
    (split / "speeches.lst").write_text("en.1\n")
    feats = tmp_path / "st_dev"
    tune(
        [
            "run",
            "speechmapper_extract",
            *variant_args("features/whisper_tiny_en"),
            f"manifest=europarl_st:{split}",
            f"output_dir={feats}",
            "sfm.window=trimmed",
        ],
        cwd=tmp_path,
    )
    items = load_feature_items(feats / "cuts.jsonl.gz")
    assert [(it.id, it.num_features) for it in items] == [("en.1_0001", 384), ("en.1_0002", 384)]
    assert items[1].num_frames == pytest.approx(1.5 * 50 / 2, abs=2)  # 50 frames/s averaged by 2
    tune(
        ["run", "speechmapper_instructions", "--config", "instructions/st", f"manifest={feats / 'cuts.jsonl.gz'}"],
        cwd=tmp_path,
    )
    rows = [json.loads(line) for line in (feats / "instructions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["features"], r["target_lang"], r["answer"]) for r in rows] == [
        ("en.1_0001", "it", "Grazie."),
        ("en.1_0002", "it", "Sono d'accordo con lei."),
    ]
    assert rows[0]["instruction"] == ST["it"]
