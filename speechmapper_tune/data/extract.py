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
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import soundfile as sf
import soxr
from lhotse import CutSet, MonoCut
from lhotse.features import Features

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
        raise BadAudio(f"{src.source}: read {audio.shape[0] / sr:.2f} s of the {frames / sr:.2f} s the manifest gives "
                       f"(from {start / sr:.2f} s): the file is shorter than its manifest says")
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


EXTRACT_INFO = "extract_info.json"


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
    cuts: Sequence[MonoCut],
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
    """Encode one chunk of cuts into ``shards/feats-NNNNN.safetensors`` + its manifest part."""
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
    for cut in cuts:
        try:
            pending.append((cut, load_cut_audio(cut, max_duration)))
        except BadAudio as e:
            failures.append({"id": cut.id, "reason": str(e)})
            if on_item:
                on_item(0.0)
            continue
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


def chunked(cuts: Iterable[MonoCut], size: int) -> List[List[MonoCut]]:
    cuts = list(cuts)
    return [cuts[i : i + size] for i in range(0, len(cuts), size)]
