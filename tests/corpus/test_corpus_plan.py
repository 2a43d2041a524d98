"""Settings validation and split-plan invariants (no TTS program needed)."""

from collections import Counter

import pytest
from corpus_helpers import plain_sentences
from documented_variants import fixture_config

from speechmapper_tune.corpus.engines import Voice, make_engine
from speechmapper_tune.corpus.plan import make_plan
from speechmapper_tune.corpus.sentences import filter_sentences
from speechmapper_tune.corpus.settings import CorpusSettings

TRAIN = ["espeak-ng:en-us", "espeak-ng:en-gb+m3", "flite:kal16", "festival:voice_kal_diphone"]
TEST = ["flite:slt", "espeak-ng:en-us+f5"]
ENGINES = {name: make_engine(name) for name in ("espeak-ng", "flite", "festival")}


def config(**overrides):
    cfg = {
        "output_dir": "/tmp/unused",
        "seed": 3,
        "splits": {
            "train": {"sentences": 40, "voices": TRAIN},
            "dev": {"sentences": 10, "voices": None},
            "test": {"sentences": 12, "voices": TEST, "voices_per_sentence": 2},
        },
    }
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def sentences():
    return filter_sentences(plain_sentences(100))[0]


def plan_for(sentences, **overrides):
    return make_plan(sentences, CorpusSettings.from_dict(config(**overrides)), ENGINES)


def test_no_sentence_in_two_splits_and_held_out_voices(sentences):
    plan = plan_for(sentences)
    texts = {split: {u.text for u in utts} for split, utts in plan.items()}
    assert len(texts["train"]) == 40 and len(texts["dev"]) == 10 and len(texts["test"]) == 12
    assert not texts["train"] & texts["dev"]
    assert not texts["train"] & texts["test"]
    assert not texts["dev"] & texts["test"]
    voices = {split: {u.voice.spec for u in utts} for split, utts in plan.items()}
    assert voices["train"] == set(TRAIN) and voices["dev"] <= set(TRAIN)
    assert voices["test"] == set(TEST) and not voices["test"] & voices["train"]
    assert len(plan["test"]) == 24  # two voices per test sentence


def test_plan_is_deterministic_for_a_seed(sentences):
    assert plan_for(sentences) == plan_for(sentences)
    other = plan_for(sentences, seed=4)
    assert [u.id for u in other["train"]] != [u.id for u in plan_for(sentences)["train"]]


def test_growing_train_keeps_dev_and_test(sentences):
    small, big = (
        plan_for(sentences),
        plan_for(
            sentences,
            splits={
                "train": {"sentences": 60, "voices": TRAIN},
                "dev": {"sentences": 10},
                "test": {"sentences": 12, "voices": TEST, "voices_per_sentence": 2},
            },
        ),
    )
    assert small["test"] == big["test"] and small["dev"] == big["dev"]


def test_train_all_takes_every_remaining_sentence_and_keeps_dev_and_test(sentences):
    fixed = plan_for(sentences)
    every = plan_for(
        sentences,
        splits={
            "train": {"sentences": "all", "voices": TRAIN},
            "dev": {"sentences": 10},
            "test": {"sentences": 12, "voices": TEST, "voices_per_sentence": 2},
        },
    )
    assert len(every["train"]) == 100 - 10 - 12
    assert every["test"] == fixed["test"] and every["dev"] == fixed["dev"]
    assert [u.text for u in every["train"][:40]] == [u.text for u in fixed["train"]]  # a smaller train is its prefix
    with pytest.raises(ValueError, match="splits.dev.sentences=all: only splits.train"):
        CorpusSettings.from_dict(
            config(splits={"train": {"sentences": 1, "voices": TRAIN}, "dev": {"sentences": "all"}})
        )


def test_voices_balanced_and_params_seeded(sentences):
    plan = plan_for(sentences)
    counts = Counter(u.voice.spec for u in plan["train"])
    assert set(counts.values()) == {10}
    for utt in plan["train"]:
        params = dict(utt.params)
        if utt.voice.engine == "espeak-ng":
            assert 140 <= params["speed"] <= 200 and 30 <= params["pitch"] <= 70
        else:
            assert 0.9 <= params["stretch"] <= 1.1
    assert len({u.id for u in plan["train"]}) == 40
    assert len({dict(u.params).get("speed") for u in plan["train"]} - {None}) > 3


def test_too_many_sentences_is_an_error(sentences):
    with pytest.raises(ValueError, match="splits.train.sentences=90.*only 100"):
        plan_for(
            sentences,
            splits={
                "train": {"sentences": 90, "voices": TRAIN},
                "test": {"sentences": 12, "voices": TEST},
            },
        )


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {
                "splits": {
                    "train": {"sentences": 1, "voices": TRAIN},
                    "test": {"sentences": 1, "voices": ["flite:kal16"]},
                }
            },
            "splits.test.voices must be held out of train",
        ),
        (
            {
                "splits": {
                    "train": {"sentences": 1, "voices": TRAIN},
                    "test": {"sentences": 1, "voices": ["festival:kal_diphone"]},
                }
            },
            r"\['festival:kal_diphone'\] are also in splits.train.voices",
        ),
        ({"splits": {"train": {"sentences": 1, "voices": ["kal16"]}}}, "splits.train.voices"),
        ({"splits": {"train": {"sentences": 1, "voices": ["say:alex"]}}}, "splits.train.voices"),
        ({"splits": {"train": {"sentences": 1, "voices": TRAIN}, "valid": {"sentences": 1}}}, "unknown split"),
        ({"splits": {"train": {"sentences": 1, "voices": TRAIN, "voices_per_sentence": 9}}}, "voices_per_sentence=9"),
        ({"num_workers": -1}, "num_workers"),
        ({"outputdir": "x"}, "Unknown corpus config keys"),
        ({"output_dir": None}, "output_dir is required"),
        ({"engines": {"espeak-ng": {"speed": [200, 100]}}}, "engines.espeak-ng.speed"),
    ],
)
def test_settings_errors_name_the_setting(change, message):
    with pytest.raises(ValueError, match=message):
        CorpusSettings.from_dict(config(**change))


def test_same_recorded_speaker_in_test_warns(caplog):
    CorpusSettings.from_dict(
        config(
            splits={
                "train": {"sentences": 1, "voices": TRAIN},
                "test": {"sentences": 1, "voices": ["flite:kal", "flite:slt"]},
            }
        )
    )
    assert "flite:kal is the same recorded speaker (kal)" in caplog.text
    assert "flite:slt" not in caplog.text


def test_voice_spec_and_slug():
    voice = Voice.parse("espeak-ng:en-us+m3")
    assert (voice.engine, voice.name, voice.slug) == ("espeak-ng", "en-us+m3", "espeak_ng_en_us_m3")


@pytest.mark.parametrize(
    "dev_voices, message",
    [
        (["espeak-ng:en-us+m8", "flite:kal16"], "splits.dev.voices must be held out of train, but \\['flite:kal16'\\]"),
        (["espeak-ng:en-us+m8", "flite:slt"], "splits.dev.voices must be held out of test, but \\['flite:slt'\\]"),
    ],
)
def test_dev_voices_given_are_held_out_of_train_and_test(dev_voices, message):
    splits = {
        "train": {"sentences": 1, "voices": TRAIN},
        "dev": {"sentences": 1, "voices": dev_voices},
        "test": {"sentences": 1, "voices": TEST},
    }
    with pytest.raises(ValueError, match=message):
        CorpusSettings.from_dict(config(splits=splits))
    splits["dev"]["voices"] = ["espeak-ng:en-us+m8"]
    held_out = CorpusSettings.from_dict(config(splits=splits)).splits["dev"].voices
    assert [v.spec for v in held_out] == ["espeak-ng:en-us+m8"]


def test_shipped_corpus_configs_hold_dev_and_test_voices_out():
    from omegaconf import OmegaConf

    from speechmapper_tune.configs import resolve_config

    for name in ("corpus/tts_en", fixture_config("corpus/tts_en_tiny"), "corpus/tts_en_large"):
        splits = CorpusSettings.from_dict(OmegaConf.to_container(OmegaConf.load(resolve_config(name)))).splits
        train, dev, test = ({v.key for v in splits[s].voices} for s in ("train", "dev", "test"))
        assert dev and test and not (train & dev) and not (train & test) and not (dev & test), name


def test_large_corpus_has_the_dev_and_test_of_tts_en_and_40_held_out_train_voices():
    from omegaconf import OmegaConf

    from speechmapper_tune.configs import resolve_config

    small, large = (
        CorpusSettings.from_dict(OmegaConf.to_container(OmegaConf.load(resolve_config(name))))
        for name in ("corpus/tts_en", "corpus/tts_en_large")
    )
    # what the dev/test plan depends on (seed, text filter, engine ranges, held-out splits) is identical
    for key in ("seed", "min_words", "max_words", "spell_out_numbers", "engines", "wordnet_dir"):
        assert getattr(small, key) == getattr(large, key), key
    assert small.splits["dev"] == large.splits["dev"] and small.splits["test"] == large.splits["test"]
    train = large.splits["train"]
    assert train.sentences == -1 and len(train.voices) >= 40
    assert {v.key for v in small.splits["train"].voices} <= {v.key for v in train.voices}
    held = [v for s in ("dev", "test") for v in large.splits[s].voices if v.engine == "espeak-ng"]
    held_variants = {v.name.partition("+")[2].lower() for v in held}
    for v in train.voices:
        if v.engine == "espeak-ng":
            assert v.name.partition("+")[2].lower() not in held_variants, v.spec
            assert v.name.partition("+")[0] != "en-gb-x-gbcwmd", v.spec  # the West Midlands test accent
