"""Perturbed copies at extraction: speed (lhotse), seeded noise, the copies' manifest cuts, a chunk with copies."""

import json

import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet, MonoCut, Recording, SupervisionSegment
from lhotse.utils import perturb_num_samples

from speechmapper_tune.data.extract import (
    BadAudio,
    ExtractItem,
    Perturbation,
    add_noise,
    check_resume_settings,
    copy_rng,
    extract_chunk,
    extract_settings,
    load_cut_audio,
    mu_law,
    perturbations_from_config,
    record_settings,
    reverberate,
    telephone_channel,
    with_copies,
)
from speechmapper_tune.data.manifest import load_feature_items

SR = 16000


def _cut(tmp_path, name, seconds, freq=300.0, written="Hello, world."):
    t = np.arange(int(SR * seconds)) / SR
    sf.write(tmp_path / f"{name}.wav", (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), SR, subtype="FLOAT")
    rec = Recording.from_file(str(tmp_path / f"{name}.wav"), recording_id=name)
    sup = SupervisionSegment(
        id=name, recording_id=name, start=0.0, duration=rec.duration, text="hello world", custom={"written": written}
    )
    return MonoCut(id=name, start=0.0, duration=rec.duration, channel=0, recording=rec, supervisions=[sup])


def _peak_hz(audio):
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
    return float(np.argmax(spectrum)) * SR / audio.size


@pytest.mark.parametrize("speed", [0.9, 1.1])
def test_speed_copy_has_the_perturbed_length_pitch_and_manifest_cut(tmp_path, speed):
    cut = _cut(tmp_path, "u", 1.7)
    item = ExtractItem(cut, Perturbation(speed=speed))
    audio, source = item.load_audio(30.0), load_cut_audio(cut, 30.0)
    assert audio.dtype == np.float32 and audio.size == perturb_num_samples(source.size, speed)
    assert abs(audio.size - source.size / speed) <= 1
    assert abs(_peak_hz(audio) - 300.0 * speed) < 2.0  # sox-style speed: the pitch moves with the tempo
    copy = item.output_cut()
    assert copy.id == item.id == f"u_sp{speed}" and copy.supervisions[0].id == f"u_sp{speed}"
    assert copy.num_samples == audio.size and copy.duration == pytest.approx(audio.size / SR)
    assert copy.supervisions[0].text == "hello world" and copy.supervisions[0].custom["written"] == "Hello, world."
    assert copy.custom["perturbation"] == {
        "source": "u",
        "speed": speed,
        "snr_db": None,
        "noise": "white",
        "seed": 0,
        "channel": None,
    }


def _snr_db(clean, noisy):
    return 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean((noisy.astype(np.float64) - clean) ** 2))


def _band_power(x, lo, hi):
    power = np.abs(np.fft.rfft(x)) ** 2
    freqs = np.fft.rfftfreq(x.size, 1 / SR)
    return power[(freqs >= lo) & (freqs < hi)].mean()


@pytest.mark.parametrize("color", ["white", "pink"])
def test_noise_is_at_the_snr_seeded_by_copy_id_and_coloured(color):
    clean = (0.3 * np.sin(2 * np.pi * 300 * np.arange(SR * 2) / SR)).astype(np.float32)
    noisy = add_noise(clean, 10.0, color, copy_rng(0, "u_snr10"))
    assert noisy.dtype == np.float32 and noisy.shape == clean.shape
    assert _snr_db(clean, noisy) == pytest.approx(10.0, rel=1e-4)  # scaled exactly; float32 rounding only
    assert np.array_equal(noisy, add_noise(clean, 10.0, color, copy_rng(0, "u_snr10")))  # a resume: same audio
    assert not np.array_equal(noisy, add_noise(clean, 10.0, color, copy_rng(0, "v_snr10")))  # another copy
    assert not np.array_equal(noisy, add_noise(clean, 10.0, color, copy_rng(1, "u_snr10")))  # another seed
    noise = noisy - clean
    ratio = _band_power(noise, 100, 200) / _band_power(noise, 1000, 2000)  # pink: 1/f, so ~10 a decade apart
    assert (5 < ratio < 20) if color == "pink" else (0.5 < ratio < 2)
    silence = np.zeros(1600, np.float32)
    assert np.array_equal(add_noise(silence, 10.0, color, copy_rng(0, "s")), silence)


def test_perturb_config_gives_the_cross_product_without_the_original():
    assert perturbations_from_config(None) == [] and perturbations_from_config({}) == []
    copies = perturbations_from_config(
        {"speeds": [0.9, 1.0, 1.1], "noise_snr_db": [None, 20], "noise": "pink", "seed": 3}
    )
    assert [c.suffix for c in copies] == ["_sp0.9", "_sp0.9_snr20", "_snr20", "_sp1.1", "_sp1.1_snr20"]
    assert all(c.noise == "pink" and c.seed == 3 for c in copies)
    assert [c.suffix for c in perturbations_from_config({"noise_snr_db": 15})] == ["_snr15"]
    grid = perturbations_from_config(
        {"speeds": [1.0, 1.1], "channels": [None, "reverb", "telephone"], "noise_snr_db": [None, 20]}
    )
    assert [c.suffix for c in grid] == [
        "_snr20",
        "_rev",
        "_rev_snr20",
        "_tel",
        "_tel_snr20",
        "_sp1.1",
        "_sp1.1_snr20",
        "_sp1.1_rev",
        "_sp1.1_rev_snr20",
        "_sp1.1_tel",
        "_sp1.1_tel_snr20",
    ]
    assert [c.suffix for c in perturbations_from_config({"channels": "reverb"})] == ["_rev"]
    for bad, match in [
        ({"speed": [0.9]}, "unknown keys"),
        ({"speeds": [0.1]}, "speeds"),
        ({"noise_snr_db": [20], "noise": "brown"}, "noise"),
        ({"speeds": [0.9, 0.9]}, "repeat"),
        ({"speeds": [0.9], "seed": 1.5}, "seed"),
        ({"channels": ["radio"]}, "channels"),
    ]:
        with pytest.raises(ValueError, match=match):
            perturbations_from_config(bad)


def fake_encode(waves):
    """50 frames/s, 3 features per 320-sample window: mean, mean |x|, max |x| (no weights needed)."""
    out = []
    for w in waves:
        frames = w[: w.size // 320 * 320].reshape(-1, 320)
        out.append(np.stack([frames.mean(1), np.abs(frames).mean(1), np.abs(frames).max(1)], 1))
    return out


def test_a_chunk_with_copies_writes_them_next_to_their_source(tmp_path):
    cuts = [_cut(tmp_path, "a", 1.0), _cut(tmp_path, "b", 1.6, freq=500.0, written="Bee.")]
    broken = MonoCut(
        id="c",
        start=0.0,
        duration=1.0,
        channel=0,
        recording=None,
        supervisions=[SupervisionSegment(id="c", recording_id="c", start=0, duration=1, text="see")],
    )
    perturbations = perturbations_from_config({"speeds": [0.9, 1.0, 1.1], "noise_snr_db": [None, 20]})
    items = with_copies([*cuts, broken], perturbations)
    for out in ("x", "y"):
        res = extract_chunk(items, fake_encode, tmp_path / out, 0, "fake", 0.04, 2, 4, 30.0)
        assert (res.done, res.failed) == (12, 6)
    manifest = CutSet.from_file(str(tmp_path / "x" / "shards" / "cuts-00000.jsonl.gz"))
    suffixes = ["", "_sp0.9", "_sp0.9_snr20", "_snr20", "_sp1.1", "_sp1.1_snr20"]
    assert [c.id for c in manifest] == [f"{u}{s}" for u in "ab" for s in suffixes]
    failures = [json.loads(l) for l in (tmp_path / "x" / "shards" / "failures-00000.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failures] == [f"c{s}" for s in suffixes]  # the source's reason, for every copy
    items_x = {it.id: it for it in load_feature_items(tmp_path / "x" / "shards" / "cuts-00000.jsonl.gz")}
    assert {it.text for it in items_x.values()} == {"hello world"}
    assert items_x["b_sp0.9"].written == items_x["b"].written == "Bee."
    for u, seconds in (("a", 1.0), ("b", 1.6)):  # 50 frames/s averaged by 2: 25 per second of (perturbed) audio
        for s, speed in (("", 1.0), ("_sp0.9", 0.9), ("_sp1.1", 1.1), ("_snr20", 1.0)):
            assert abs(items_x[u + s].num_frames - 25 * seconds / speed) <= 1
    x = {c.id: c.features.load() for c in manifest}
    y = {c.id: c.features.load() for c in CutSet.from_file(str(tmp_path / "y" / "shards" / "cuts-00000.jsonl.gz"))}
    assert all(np.array_equal(x[k], y[k]) for k in x)  # a rerun (resume) makes the same features
    assert not np.array_equal(x["a"], x["a_snr20"]) and x["a"].shape == x["a_snr20"].shape


def test_a_copy_too_long_after_slowing_down_is_a_skip(tmp_path):
    item = ExtractItem(_cut(tmp_path, "u", 1.9), Perturbation(speed=0.9))
    with pytest.raises(BadAudio, match="too long at speed 0.9"):
        item.load_audio(2.0)
    assert ExtractItem(_cut(tmp_path, "v", 2.1), Perturbation(speed=1.1)).load_audio(2.0).size <= 2 * SR


def test_resume_refuses_chunks_made_with_other_settings(tmp_path):
    plain, perturbed = extract_settings([]), extract_settings(perturbations_from_config({"speeds": [0.9]}))
    check_resume_settings(tmp_path, perturbed)  # a new folder: anything goes
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "cuts-00000.jsonl.gz").write_bytes(b"")  # a chunk done before settings were recorded
    check_resume_settings(tmp_path, plain)
    with pytest.raises(ValueError, match="extracted with"):
        check_resume_settings(tmp_path, perturbed)
    record_settings(tmp_path, perturbed)
    check_resume_settings(tmp_path, perturbed)
    with pytest.raises(ValueError, match="extracted with"):
        check_resume_settings(tmp_path, plain)


def _band_energy(audio, lo, hi):
    spectrum = np.abs(np.fft.rfft(audio.astype(np.float64))) ** 2
    freqs = np.fft.rfftfreq(audio.size, 1 / SR)
    return float(spectrum[(freqs >= lo) & (freqs < hi)].sum() / spectrum.sum())


def test_telephone_channel_removes_the_upper_band_and_quantizes_like_g711():
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(SR)).astype(np.float32)  # white: a quarter of its energy above 6 kHz
    out = telephone_channel(audio)
    assert out.dtype == np.float32 and out.size == audio.size
    assert _band_energy(audio, 4100, 8000) > 0.4 and _band_energy(out, 4100, 8000) < 1e-3  # 8 kHz line: 4 kHz top
    # mu-law: 256 levels, fine near zero and coarse near full scale; small values survive within a step
    levels = np.unique(mu_law(np.linspace(-1, 1, 20001).astype(np.float32)))
    assert levels.size == 255  # sign bit + 7 magnitude bits, one zero
    x = np.array([0.0, 0.001, -0.01, 0.3, -0.9], np.float32)
    assert np.allclose(mu_law(x), x, atol=0.025 * np.abs(x) + 1e-4)  # half a step: 0.5 * ln(256) / 127
    assert mu_law(np.zeros(3, np.float32)).tolist() == [0.0, 0.0, 0.0]
    assert np.array_equal(mu_law(np.array([2.0, -3.0], np.float32)), np.array([1.0, -1.0], np.float32))


def test_reverb_copy_smears_an_impulse_keeps_length_and_rms_and_is_reproducible(tmp_path):
    impulse = np.zeros(SR, np.float32)
    impulse[100] = 0.5
    wet = reverberate(impulse, copy_rng(0, "a"))
    assert wet.dtype == np.float32 and wet.size == impulse.size
    assert np.sqrt(np.mean(wet.astype(np.float64) ** 2)) == pytest.approx(
        np.sqrt(np.mean(impulse.astype(np.float64) ** 2)), rel=1e-4
    )
    assert np.count_nonzero(np.abs(wet[:100]) > 1e-6) == 0  # causal: nothing before the impulse
    tail = np.abs(wet[100 + 1600 : 100 + 3200]).mean()  # 0.1-0.2 s after: decaying but present
    assert tail > 1e-4 and tail < np.abs(wet[100:1700]).mean()
    assert np.array_equal(wet, reverberate(impulse, copy_rng(0, "a")))
    assert not np.array_equal(wet, reverberate(impulse, copy_rng(0, "b")))  # one room per copy id
    cut = _cut(tmp_path, "u", 1.0)
    item = ExtractItem(cut, Perturbation(channel="reverb", snr_db=20.0))
    audio = item.load_audio(30.0)
    assert np.array_equal(audio, item.load_audio(30.0)) and audio.size == load_cut_audio(cut, 30.0).size
    copy = item.output_cut()
    assert copy.id == "u_rev_snr20" and copy.supervisions[0].id == "u_rev_snr20" and copy.duration == cut.duration
    assert copy.custom["perturbation"]["channel"] == "reverb"
