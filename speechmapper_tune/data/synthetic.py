"""A small, learnable synthetic speech-feature set and tiny LLM, for tests and ``tiny/stage1``.

Nothing is downloaded: random sentences over a small vocabulary are "spoken" as feature
frames. Each word has a fixed random code vector; a word is rendered as ``frames_per_word``
noisy copies of its code, with short noisy silences between words and at the ends. The
mapping frames -> word is learnable by a tiny projector in a few hundred steps.

Frames per word are sized like the paper's setting (25 feature frames/s after averaging,
~2.5 words/s, ~10 frames a word), so the projector's 4x compression leaves about as many pad
positions as word positions (the paper's "close to or below 1:1").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from lhotse import CutSet, MonoCut, SupervisionSegment
from lhotse.features import Features

from speechmapper_tune.checkpoint.atomic import atomic_write_json
from speechmapper_tune.data.features import STORAGE_TYPE, SafetensorsShardWriter
from speechmapper_tune.data.manifest import save_cutset_atomic
from speechmapper_tune.models.tiny_llm import read_tiny_llm_meta, write_tiny_llm

WORDS = (
    "red green blue black white small large quick slow bright dark happy sad river mountain forest "
    "city village cat dog bird fish horse runs jumps sleeps eats sings reads writes and the a of"
).split()
FRAME_SHIFT = 0.04  # seconds: 50 frames/s averaged by 2, as Whisper/Seamless features


def _sentence_frames(
    rng: np.random.Generator, word_ids: Sequence[int], codes: np.ndarray, frames_per_word: Tuple[int, int], noise: float
) -> np.ndarray:
    dim = codes.shape[1]
    parts = [rng.normal(0, noise, (int(rng.integers(2, 5)), dim))]
    for w in word_ids:
        n = int(rng.integers(frames_per_word[0], frames_per_word[1] + 1))
        parts.append(codes[w] + rng.normal(0, noise, (n, dim)))
        parts.append(rng.normal(0, noise, (int(rng.integers(0, 3)), dim)))
    parts.append(rng.normal(0, noise, (int(rng.integers(2, 5)), dim)))
    return np.concatenate(parts).astype(np.float32)


def write_synthetic_split(
    out_dir: Path,
    split: str,
    num_utterances: int,
    feature_dim: int,
    seed: int,
    words_per_sentence: Tuple[int, int] = (3, 8),
    frames_per_word: Tuple[int, int] = (7, 12),
    noise: float = 0.3,
    code_seed: int = 1234,
) -> Path:
    """Write ``{out_dir}/{split}_feats.safetensors`` and the manifest ``{out_dir}/{split}.jsonl.gz``."""
    codes = np.random.default_rng(code_seed).normal(0, 1, (len(WORDS), feature_dim))
    rng = np.random.default_rng(seed)
    shard = out_dir / f"{split}_feats.safetensors"
    writer = SafetensorsShardWriter(str(shard))
    cuts = []
    for i in range(num_utterances):
        n = int(rng.integers(words_per_sentence[0], words_per_sentence[1] + 1))
        word_ids = rng.integers(0, len(WORDS), n).tolist()
        text = " ".join(WORDS[w] for w in word_ids)
        frames = _sentence_frames(rng, word_ids, codes, frames_per_word, noise)
        cut_id = f"synth-{split}-{i:05d}"
        key = writer.write(cut_id, frames)
        duration = round(frames.shape[0] * FRAME_SHIFT, 4)
        feats = Features(
            type="synthetic",
            num_frames=frames.shape[0],
            num_features=feature_dim,
            frame_shift=FRAME_SHIFT,
            sampling_rate=16000,
            start=0.0,
            duration=duration,
            storage_type=STORAGE_TYPE,
            storage_path=str(shard.resolve()),
            storage_key=key,
        )
        sup = SupervisionSegment(id=cut_id, recording_id=cut_id, start=0.0, duration=duration, text=text, language="en")
        cuts.append(MonoCut(id=cut_id, start=0.0, duration=duration, channel=0, features=feats, supervisions=[sup]))
    writer.close()
    manifest = out_dir / f"{split}.jsonl.gz"
    return save_cutset_atomic(CutSet.from_cuts(cuts), manifest)


def prepare_tiny_stage1(
    out_dir: str,
    feature_dim: int = 16,
    llm_dim: int = 32,
    num_train: int = 400,
    num_val: int = 40,
    seed: int = 0,
    splits: Optional[Dict[str, int]] = None,
) -> Dict[str, str]:
    """Write the tiny LLM and the synthetic train/val feature manifests under ``out_dir``, once.

    Returns the paths (``llm_dir``, ``train_manifest``, ``val_manifest``) and the ``pad_id``.
    Already-complete outputs are reused, so resuming a run does not rewrite its data.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = out / "synthetic_done.json"
    if done.is_file():
        return _read_done(done)
    llm_dir = write_tiny_llm(out / "llm", list(WORDS), dim=llm_dim, seed=seed)
    splits = splits or {"train": num_train, "val": num_val}
    paths = {
        f"{s}_manifest": str(write_synthetic_split(out, s, n, feature_dim, seed + k + 1))
        for k, (s, n) in enumerate(splits.items())
    }
    info = {"llm_dir": str(llm_dir), "pad_id": read_tiny_llm_meta(llm_dir)["pad_id"], **paths}
    atomic_write_json(done, info)
    return info


def _read_done(path: Path) -> Dict:
    return json.loads(path.read_text())


def synthetic_vocabulary() -> List[str]:
    return list(WORDS)
