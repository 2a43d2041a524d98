"""Feature extraction: audio manifest -> frozen SFM -> averaged fp16 features in safetensors shards.

Layout of an extraction output folder::

    shards/feats-00000.safetensors    fp16 arrays keyed by utterance id (one shard per chunk)
    shards/cuts-00000.jsonl.gz        the chunk's feature manifest; written last = chunk done
    shards/failures-00000.jsonl       items of the chunk that were skipped, with the reason
    cuts.jsonl.gz                     the whole feature manifest (all chunks, input order)
    failures.jsonl                    every skipped item, with the reason

Chunks of ``shard_size`` utterances are the unit of resume and of work sharing across ranks:
a chunk whose ``cuts-*.jsonl.gz`` exists is done and skipped; a chunk interrupted mid-way
is recomputed (its shard is only renamed into place once complete).

Optional perturbed copies (not in the paper; :class:`Perturbation`): each utterance followed by
copies with another speed, channel (reverberation, telephone) and/or additive noise, ids ``<id>_sp0.9``,
``<id>_rev``, ``<id>_snr20``, ``<id>_sp0.9_tel_snr20``, same transcript. Copies count as utterances in chunks, so resume is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import soundfile as sf
import soxr
from lhotse import CutSet, MonoCut
from lhotse.augmentation import Speed
from lhotse.features import Features
from lhotse.utils import fastcopy, perturb_num_samples

from speechmapper_tune.audio import wav_truncation
from speechmapper_tune.checkpoint.atomic import atomic_write_text
from speechmapper_tune.data.features import STORAGE_TYPE, SafetensorsShardWriter
from speechmapper_tune.data.manifest import save_cutset_atomic

log = logging.getLogger(__name__)
TARGET_SR = 16000
DURATION_TOLERANCE_S = 0.025  # lhotse's own tolerance between a manifest's duration and the audio read


class BadAudio(ValueError):
    """An item that cannot be encoded; the message is the reason logged in the failures file."""


def load_cut_audio(cut: MonoCut, max_duration: float) -> np.ndarray:
    """16 kHz mono float32 audio of a cut, read with soundfile, resampled with soxr."""
    for sup in cut.supervisions:
        if sup.custom and sup.custom.get("audio_error"):  # flagged by the manifest reader
            raise BadAudio(sup.custom["audio_error"])
    if cut.duration is not None and cut.duration > max_duration:
        raise BadAudio(f"too long: {cut.duration:.1f} s > max_duration {max_duration} s")
    rec = cut.recording
    if rec is None or not rec.sources:
        raise BadAudio("no recording attached")
    src = rec.sources[0]
    if src.type != "file":
        raise BadAudio(f"unsupported audio source type {src.type!r} (expected a file path)")
    try:
        with sf.SoundFile(src.source) as f:
            sr = f.samplerate
            start = int(round((cut.start or 0.0) * sr))
            frames = int(round(cut.duration * sr)) if cut.duration else -1
            f.seek(start)
            audio = f.read(frames, dtype="float32", always_2d=True)
        truncated = wav_truncation(src.source)
    except Exception as e:  # noqa: BLE001  (any decoding problem is a per-item skip)
        raise BadAudio(f"unreadable audio {src.source}: {type(e).__name__}: {e}") from e
    if truncated:  # libsndfile reads what is there: a cut-short file would pass as shorter audio
        raise BadAudio(f"truncated audio {src.source}: {truncated}")
    if frames > 0 and audio.shape[0] < frames - DURATION_TOLERANCE_S * sr:
        raise BadAudio(
            f"{src.source}: read {audio.shape[0] / sr:.2f} s of the {frames / sr:.2f} s the manifest gives "
            f"(from {start / sr:.2f} s): the file is shorter than its manifest says"
        )
    audio = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if audio.size == 0:
        raise BadAudio("empty audio")
    if not np.isfinite(audio).all():
        raise BadAudio("NaN/inf in audio")
    if sr != TARGET_SR:
        audio = soxr.resample(audio, sr, TARGET_SR, quality="HQ").astype(np.float32)
    if audio.size / TARGET_SR > max_duration:
        raise BadAudio(f"too long: {audio.size / TARGET_SR:.1f} s > max_duration {max_duration} s")
    return audio


NOISE_COLORS = ("white", "pink")
PERTURB_KEYS = ("speeds", "noise_snr_db", "noise", "channels", "seed")
CHANNELS = ("reverb", "telephone")  # None (in a config: null) = the recording's own channel
REVERB_T60 = (0.2, 0.7)  # seconds, drawn per copy: small rooms to a reverberant hall
TELEPHONE_SR = 8000


@dataclass(frozen=True)
class Perturbation:
    """One perturbed copy of an utterance: speed factor, channel (reverb: a synthetic room; telephone: an 8 kHz
    mu-law line), additive noise at ``snr_db`` (None: none); applied in the order of :meth:`apply`.

    Speed is lhotse's (``sox speed``: tempo and pitch move together; its own resampler, so no
    torchaudio), on the 16 kHz audio; the copy's manifest cut is lhotse's ``perturb_speed`` of the
    source, with the same sample-count rule. Noise is white or pink (1/f power), scaled to the SNR
    against the whole utterance's mean power, drawn from a generator seeded by (seed, copy id):
    a resumed or repeated extraction makes the same audio.
    """

    speed: float = 1.0
    snr_db: Optional[float] = None
    noise: str = "white"
    seed: int = 0
    channel: Optional[str] = None  # reverb | telephone (see :func:`reverberate`, :func:`telephone_channel`)

    @property
    def suffix(self) -> str:
        """What the copy's id adds to the source id (lhotse's ``_sp<factor>`` for speed)."""
        return (f"_sp{self.speed}" if self.speed != 1.0 else "") + self._channel_suffix

    @property
    def _channel_suffix(self) -> str:  # the part that leaves times unchanged (also on the supervisions' ids)
        channel = {"reverb": "_rev", "telephone": "_tel"}[self.channel] if self.channel else ""
        return channel + (f"_snr{self.snr_db:g}" if self.snr_db is not None else "")

    def apply(self, audio: np.ndarray, copy_id: str) -> np.ndarray:
        """The perturbed copy of 16 kHz mono float32 ``audio``: speed, room, noise, then the telephone line."""
        rng = copy_rng(self.seed, copy_id)
        if self.speed != 1.0:
            n = perturb_num_samples(audio.size, self.speed)
            audio = Speed(self.speed)(audio[None], TARGET_SR)[0, :n].astype(np.float32)
        if self.channel == "reverb":
            audio = reverberate(audio, rng)
        if self.snr_db is not None:
            audio = add_noise(audio, self.snr_db, self.noise, rng)
        if self.channel == "telephone":
            audio = telephone_channel(audio)
        return audio

    def copy_cut(self, cut: MonoCut) -> MonoCut:
        """The copy's manifest cut: new id (supervisions' too), perturbed times, same transcript,
        ``custom["perturbation"]`` saying how it was made."""
        out = cut.perturb_speed(self.speed) if self.speed != 1.0 else cut
        tail = self._channel_suffix
        return fastcopy(
            out,
            id=cut.id + self.suffix,
            supervisions=[fastcopy(s, id=s.id + tail) for s in out.supervisions],
            custom={**(out.custom or {}), "perturbation": {"source": cut.id, **asdict(self)}},
        )


def add_noise(audio: np.ndarray, snr_db: float, color: str, rng: np.random.Generator) -> np.ndarray:
    """``audio`` plus white or pink noise at ``snr_db`` below its mean power (silence stays silent)."""
    noise = rng.standard_normal(audio.size)
    if color == "pink":  # 1/f power: amplitudes scaled by 1/sqrt(f), no DC
        spectrum = np.fft.rfft(noise)
        spectrum[1:] /= np.sqrt(np.arange(1, spectrum.size))
        spectrum[0] = 0.0
        noise = np.fft.irfft(spectrum, n=audio.size)
    power, noise_power = float(np.mean(audio.astype(np.float64) ** 2)), float(np.mean(noise**2))
    if power == 0.0 or noise_power == 0.0:
        return audio
    noise *= math.sqrt(power / 10.0 ** (snr_db / 10.0) / noise_power)
    return (audio + noise).astype(np.float32)  # not clipped: the encoder takes float audio as it is


def reverberate(audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``audio`` in a synthetic room: convolved with a direct path plus an exponentially decaying noise tail
    (T60 drawn from ``REVERB_T60``: 60 dB of decay), cut to the input's length, at the input's RMS."""
    t60 = float(rng.uniform(*REVERB_T60))
    n = int(t60 * TARGET_SR)
    rir = rng.standard_normal(n) * np.exp(-math.log(1000.0) * np.arange(n) / n)  # 60 dB over t60
    rir[0] = 1.0 + abs(rir[0])  # the direct path dominates the first sample
    size = audio.size + n - 1
    wet = np.fft.irfft(np.fft.rfft(audio.astype(np.float64), size) * np.fft.rfft(rir, size), size)[: audio.size]
    rms_in, rms_out = float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))), float(np.sqrt(np.mean(wet**2)))
    return (wet * (rms_in / rms_out) if rms_out > 0 else wet).astype(np.float32)


def mu_law(audio: np.ndarray, mu: int = 255) -> np.ndarray:
    """G.711-style mu-law: compand, quantize to a sign bit and 7 magnitude bits, expand (clipped to [-1, 1])."""
    x = np.clip(audio.astype(np.float64), -1.0, 1.0)
    magnitude = np.round(np.log1p(mu * np.abs(x)) / math.log1p(mu) * 127.0) / 127.0
    return (np.sign(x) * ((1.0 + mu) ** magnitude - 1.0) / mu).astype(np.float32)


def telephone_channel(audio: np.ndarray) -> np.ndarray:
    """A narrowband telephone line: resampled to 8 kHz (soxr), mu-law coded, back to 16 kHz, same length."""
    narrow = mu_law(soxr.resample(audio.astype(np.float32), TARGET_SR, TELEPHONE_SR))
    wide = soxr.resample(narrow, TELEPHONE_SR, TARGET_SR).astype(np.float32)
    return np.pad(wide, (0, max(0, audio.size - wide.size)))[: audio.size]


def copy_rng(seed: int, copy_id: str) -> np.random.Generator:
    """A generator that depends on the seed and the copy's id only (not on order, chunk or rank)."""
    digest = int.from_bytes(hashlib.sha256(copy_id.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([int(seed), digest])


def perturbations_from_config(perturb: Optional[Mapping]) -> List[Perturbation]:
    """The copies ``perturb`` asks for: one per (speed, channel, SNR) of ``speeds`` x ``channels`` x
    ``noise_snr_db`` other than (1.0, null, null), which is the utterance itself. None or {} = no copies."""
    if not perturb:
        return []
    unknown = set(perturb) - set(PERTURB_KEYS)
    if unknown:
        raise ValueError(f"perturb: unknown keys {sorted(unknown)}; expected {list(PERTURB_KEYS)}")
    as_list = lambda v, default: default if v is None else ([v] if isinstance(v, (int, float, str)) else list(v))
    speeds = [float(x) for x in as_list(perturb.get("speeds"), [1.0])]
    snrs = [None if x is None else float(x) for x in as_list(perturb.get("noise_snr_db"), [None])]
    channels = [None if x is None else str(x) for x in as_list(perturb.get("channels"), [None])]
    noise, seed = str(perturb.get("noise") or "white"), perturb.get("seed") or 0
    if any(c is not None and c not in CHANNELS for c in channels):
        raise ValueError(f"perturb.channels={channels}: each must be null (as recorded) or one of {CHANNELS}")
    if any(not 0.5 <= x <= 2.0 for x in speeds):
        raise ValueError(f"perturb.speeds={speeds}: each factor must be in [0.5, 2] (e.g. [0.9, 1.1])")
    if any(x is not None and not math.isfinite(x) for x in snrs):
        raise ValueError(f"perturb.noise_snr_db={snrs}: expected finite dB values or null")
    if noise not in NOISE_COLORS:
        raise ValueError(f"perturb.noise={noise!r}: expected one of {NOISE_COLORS}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"perturb.seed={seed!r}: expected an integer")
    copies = [
        Perturbation(sp, snr, noise, seed, ch)
        for sp in speeds
        for ch in channels
        for snr in snrs
        if (sp, ch, snr) != (1.0, None, None)
    ]
    if len({c.suffix for c in copies}) < len(copies):
        raise ValueError(f"perturb: speeds {speeds} x channels {channels} x noise_snr_db {snrs} repeat a copy")
    return copies


@dataclass(frozen=True)
class ExtractItem:
    """An utterance to encode: a manifest cut, as it is or as a perturbed copy."""

    cut: MonoCut
    perturbation: Optional[Perturbation] = None

    @property
    def id(self) -> str:
        return self.cut.id + (self.perturbation.suffix if self.perturbation else "")

    def load_audio(self, max_duration: float) -> np.ndarray:
        p = self.perturbation
        if p is None:
            return load_cut_audio(self.cut, max_duration)
        audio = p.apply(load_cut_audio(self.cut, max_duration * max(1.0, p.speed)), self.id)
        if audio.size / TARGET_SR > max_duration:
            raise BadAudio(
                f"too long at speed {p.speed}: {audio.size / TARGET_SR:.1f} s > max_duration {max_duration} s"
            )
        return audio

    def output_cut(self) -> MonoCut:
        return self.cut if self.perturbation is None else self.perturbation.copy_cut(self.cut)


def extract_settings(perturbations: Sequence[Perturbation]) -> Dict:
    """What a resume must find unchanged (see :func:`check_resume_settings`), as plain JSON."""
    return {"perturbations": [asdict(p) for p in perturbations]}


def with_copies(cuts: Iterable[MonoCut], perturbations: Sequence[Perturbation]) -> List[ExtractItem]:
    """Each cut followed by its perturbed copies, in a fixed order: chunk k holds the same items on every run."""
    return [ExtractItem(c, p) for c in cuts for p in (None, *perturbations)]


EXTRACT_INFO = "extract_info.json"
SETTINGS = "settings.json"  # in shards/: the settings the done chunks were made with


def check_resume_settings(out_dir: Path, settings: Dict) -> None:
    """Refuse to resume chunks made with other settings (another ``perturb`` puts other items in
    chunk k); a folder with done chunks and no record was made without perturbation."""
    path = out_dir / "shards" / SETTINGS
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
    elif any((out_dir / "shards").glob("cuts-*.jsonl.gz")):
        before = {"perturbations": []}
    else:
        return
    if before != settings:
        raise ValueError(
            f"{out_dir} holds chunks extracted with {before}, not {settings}: "
            "use another output_dir (or the same settings to resume)"
        )


def record_settings(out_dir: Path, settings: Dict) -> None:
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "shards" / SETTINGS, json.dumps(settings, sort_keys=True) + "\n")


def features_record(manifest: str | Path) -> Optional[Dict]:
    """How the features of ``manifest`` were made (SFM settings, averaging, storage precision), from the
    ``extract_info.json`` speechmapper_extract writes beside it; None for features made otherwise.
    Checkpoints carry it so that ``speechmapper transcribe`` can rebuild the features from audio."""
    info = Path(manifest).parent / EXTRACT_INFO
    if not info.is_file():
        return None
    return json.loads(info.read_text(encoding="utf-8")).get("features")


def average_frames(x: np.ndarray, k: int) -> np.ndarray:
    """Mean of every ``k`` consecutive frames (paper: k=2); a last partial group is averaged too."""
    if k <= 1:
        return x
    n = x.shape[0]
    pad = (-n) % k
    groups = math.ceil(n / k)
    sums = np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)]).reshape(groups, k, -1).sum(1)
    counts = np.full((groups, 1), k, np.float32)
    if pad:
        counts[-1] = k - pad
    return sums / counts


@dataclass
class ChunkResult:
    done: int
    failed: int
    audio_seconds: float


def extract_chunk(
    cuts: Sequence[Union[MonoCut, ExtractItem]],
    encode: Callable[[List[np.ndarray]], List[np.ndarray]],
    out_dir: Path,
    chunk_index: int,
    feature_type: str,
    frame_shift: float,
    average: int,
    batch_size: int,
    max_duration: float,
    on_item: Optional[Callable[[float], None]] = None,
) -> ChunkResult:
    """Encode one chunk of cuts (or :class:`ExtractItem` copies) into ``shards/feats-NNNNN.safetensors``
    + its manifest part."""
    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    shard = shard_dir / f"feats-{chunk_index:05d}.safetensors"
    writer = SafetensorsShardWriter(str(shard.resolve()))
    failures, out_cuts, seconds = [], [], 0.0

    def flush(batch: List[Tuple[MonoCut, np.ndarray]]):
        nonlocal seconds
        if not batch:
            return
        try:
            feats = encode([a for _, a in batch])
        except Exception as e:  # noqa: BLE001  (a batch failure falls back to one by one)
            if len(batch) == 1:
                failures.append({"id": batch[0][0].id, "reason": f"encoder failed: {type(e).__name__}: {e}"})
                return
            for item in batch:
                flush([item])
            return
        for (cut, audio), f in zip(batch, feats):
            f = average_frames(np.asarray(f, dtype=np.float32), average)
            if not np.isfinite(f).all():
                failures.append({"id": cut.id, "reason": "NaN/inf in encoder output"})
                continue
            key = writer.write(cut.id, f)
            seconds += audio.size / TARGET_SR
            out_cuts.append(_feature_cut(cut, f, feature_type, frame_shift, str(shard.resolve()), key))
            if on_item:
                on_item(audio.size / TARGET_SR)

    pending: List[Tuple[MonoCut, np.ndarray]] = []
    for item in cuts:
        item = item if isinstance(item, ExtractItem) else ExtractItem(item)
        try:
            audio = item.load_audio(max_duration)
        except BadAudio as e:
            failures.append({"id": item.id, "reason": str(e)})
            if on_item:
                on_item(0.0)
            continue
        pending.append((item.output_cut(), audio))  # after the checks: a copy needs a readable recording
        if len(pending) >= batch_size:
            flush(pending)
            pending = []
    flush(pending)
    writer.close()
    atomic_write_text(shard_dir / f"failures-{chunk_index:05d}.jsonl", "".join(json.dumps(f) + "\n" for f in failures))
    save_cutset_atomic(CutSet.from_cuts(out_cuts), shard_dir / f"cuts-{chunk_index:05d}.jsonl.gz")  # last: marks done
    return ChunkResult(len(out_cuts), len(failures), seconds)


def _feature_cut(cut: MonoCut, f: np.ndarray, feature_type: str, frame_shift: float, shard: str, key: str) -> MonoCut:
    features = Features(
        type=feature_type,
        num_frames=int(f.shape[0]),
        num_features=int(f.shape[1]),
        frame_shift=frame_shift,
        sampling_rate=TARGET_SR,
        start=cut.start,
        duration=cut.duration,
        storage_type=STORAGE_TYPE,
        storage_path=shard,
        storage_key=key,
        recording_id=cut.recording_id,
        channels=0,
    )
    return MonoCut(
        id=cut.id,
        start=cut.start,
        duration=cut.duration,
        channel=cut.channel,
        recording=cut.recording,
        features=features,
        supervisions=cut.supervisions,
        custom=cut.custom,
    )


def chunk_done(out_dir: Path, chunk_index: int) -> bool:
    return (out_dir / "shards" / f"cuts-{chunk_index:05d}.jsonl.gz").is_file()


def merge_chunks(out_dir: Path, num_chunks: int) -> Tuple[Path, int, int]:
    """Concatenate the chunk manifests and failures, in input order, into the final files."""
    cuts: List[MonoCut] = []
    failures: List[str] = []
    for k in range(num_chunks):
        part = CutSet.from_file(str(out_dir / "shards" / f"cuts-{k:05d}.jsonl.gz"))
        cuts.extend(part or [])  # lhotse reads an empty manifest (a chunk where all failed) as None
        ff = out_dir / "shards" / f"failures-{k:05d}.jsonl"
        if ff.is_file():
            failures.extend(l for l in ff.read_text().splitlines() if l)
    manifest = save_cutset_atomic(CutSet.from_cuts(cuts), out_dir / "cuts.jsonl.gz")
    atomic_write_text(out_dir / "failures.jsonl", "".join(l + "\n" for l in failures))
    return manifest, len(cuts), len(failures)


def chunked(cuts: Iterable, size: int) -> List[List]:
    cuts = list(cuts)
    return [cuts[i : i + size] for i in range(0, len(cuts), size)]
