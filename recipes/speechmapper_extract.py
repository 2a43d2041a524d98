"""Extract frozen-SFM features for SpeechMapper: audio manifest -> averaged fp16 feature manifest.

    tune run speechmapper_extract --config features/whisper_base manifest=corpus/manifests/cuts_train.jsonl.gz output_dir=feats/train
    tune run --nproc_per_node 2 speechmapper_extract --config features/whisper_base sfm.name=whisper_tiny_en \
        feature_type=whisper_tiny_en_avg2 manifest=... output_dir=...
    tune run speechmapper_extract --config features/seamless_m4t_v2_large sfm.path=/models/seamless-m4t-v2-large ...

``manifest`` is a lhotse CutSet (or Recording+Supervision sets), a JSON-lines file with
``id``, ``audio``, ``text`` and optional ``lang``, or a LibriSpeech-style folder. The output
``${output_dir}/cuts.jsonl.gz`` is what the training recipes read; read it yourself with
``speechmapper_tune.data.iter_features``. Resumable: finished chunks are skipped on a rerun.
Bad audio (unreadable, empty, too long, NaN) is skipped and listed in ``failures.jsonl``.
Optional ``perturb`` (not in the paper; training splits only) adds speed- and noise-perturbed
copies of each utterance, see ``configs/features/whisper_base.yaml``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import field
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torchtune import config, utils
from tqdm import tqdm

from speechmapper_tune.checkpoint.atomic import atomic_write_text
from speechmapper_tune.config_schema import MISSING, at_least, load_settings, settings
from speechmapper_tune.configs import resolve_config_argv
from speechmapper_tune.corpus import load_audio_manifest
from speechmapper_tune.data.extract import (
    EXTRACT_INFO,
    check_resume_settings,
    chunk_done,
    chunked,
    extract_chunk,
    extract_settings,
    merge_chunks,
    perturbations_from_config,
    record_settings,
    with_copies,
)
from speechmapper_tune.dtypes import resolve_dtype

log = utils.get_logger("INFO")
EXTRACT_DTYPES = ("auto", "fp32", "bf16", "fp16")  # auto: bf16 where computed natively, fp32 elsewhere


@settings
class SfmSettings:
    """``sfm.build_sfm``'s arguments: name, path, layer, and the SFM class's keywords (unset: its defaults)."""

    name: str = MISSING  # whisper_base, whisper_tiny_en, seamless_m4t_v2 or hf_ssl
    path: Optional[str] = None  # a local model folder (required by seamless_m4t_v2 and hf_ssl)
    layer: Optional[int] = None  # None: the final encoder output
    batch_size: Optional[int] = None  # utterances (or packed windows) per encoder call
    pack: Optional[bool] = None  # Whisper: share 30-s windows (faster, not faithful)
    pack_gap_s: Optional[float] = None
    window: Optional[str] = None  # Whisper: full (a 30-s window per utterance) or trimmed
    max_seconds: Optional[float] = None


@settings
class PerturbSettings:
    """``data.extract.perturbations_from_config``: perturbed copies of a training split (off unless set)."""

    speeds: Any = None  # a factor or a list of them, e.g. [0.9, 1.1]
    noise_snr_db: Any = None  # dB or a list (null: no noise)
    noise: Optional[str] = None  # the noise colour (default white)
    channels: Any = None  # reverb, telephone, or null (the recording's own)
    seed: Optional[int] = None


@settings
class ExtractSettings:
    """Every setting speechmapper_extract reads (see configs/features/*.yaml)."""

    output_dir: str = MISSING
    manifest: str = MISSING  # an audio manifest: lhotse CutSet, JSON lines, or a LibriSpeech folder
    device: str = "cpu"
    dtype: str = MISSING  # the encoder's compute dtype
    sfm: SfmSettings = field(default_factory=SfmSettings)
    average_frames: int = at_least(1)  # paper: 2
    batch_size: int = at_least(1)  # utterances read and sent to the SFM at a time
    max_duration: float = MISSING  # seconds: longer items are skipped and listed
    max_utterances: Optional[int] = None  # the first N only
    shard_size: int = at_least(1)  # utterances per shard: the unit of resume
    feature_type: Optional[str] = None  # default {sfm.name}_layer{sfm.layer}_avg{average_frames}
    perturb: Optional[PerturbSettings] = None


def _sfm_record(sfm) -> dict:
    """The encoder as set: name, path, layer and the keywords given (what a checkpoint records to rebuild it)."""
    s = OmegaConf.to_container(sfm, resolve=True)
    return {k: v for k, v in s.items() if k in ("name", "path", "layer") or v is not None}


class ExtractRecipe:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.output_dir = Path(cfg.output_dir)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("gloo")  # only barriers: every rank encodes its own chunks

    def setup(self) -> None:
        cfg = self.cfg
        if OmegaConf.is_missing(cfg, "manifest") or cfg.manifest in (None, ""):
            raise ValueError("set manifest=<audio manifest, JSON-lines file or LibriSpeech folder>")
        if cfg.average_frames < 1:
            raise ValueError(f"average_frames={cfg.average_frames} must be >= 1 (paper: 2)")
        if cfg.dtype not in EXTRACT_DTYPES:
            raise ValueError(f"dtype={cfg.dtype!r}: expected one of {list(EXTRACT_DTYPES)}")
        self.cuts = list(load_audio_manifest(cfg.manifest))
        if cfg.max_utterances:  # the first N, in manifest order: a quick subset
            self.cuts = self.cuts[: cfg.max_utterances]
        if not self.cuts:
            raise ValueError(f"{cfg.manifest}: no utterance found")
        perturb = cfg.perturb
        perturbations = perturbations_from_config(
            OmegaConf.to_container(perturb, resolve=True) if perturb is not None else None
        )
        self.settings = extract_settings(perturbations)
        check_resume_settings(self.output_dir, self.settings)  # chunk k must hold the same items as before
        items = with_copies(self.cuts, perturbations)
        self.chunks = chunked(items, cfg.shard_size)
        self.todo = [
            k
            for k in range(len(self.chunks))
            if k % self.world_size == self.rank and not chunk_done(self.output_dir, k)
        ]
        done = len(self.chunks) - sum(1 for k in range(len(self.chunks)) if not chunk_done(self.output_dir, k))
        copies = f" + {len(items) - len(self.cuts)} perturbed copies" if perturbations else ""
        log.info(f"{len(self.cuts)} utterances{copies} in {len(self.chunks)} chunks; {done} chunks already done")
        if self.rank == 0:
            record_settings(self.output_dir, self.settings)
        self.sfm = None
        if self.todo:  # a finished run does not load the encoder at all
            from speechmapper_tune.sfm import build_sfm

            s = cfg.sfm
            extra = {k: v for k, v in _sfm_record(s).items() if k not in ("name", "path", "layer")}
            self.sfm = build_sfm(
                s.name,
                path=s.path,
                layer=s.layer,
                device=utils.get_device(cfg.device),
                dtype=resolve_dtype(cfg.dtype, cfg.device, allowed=EXTRACT_DTYPES),
                **extra,
            )
            log.info(
                f"SFM {s.name}: dim {self.sfm.dim}, layer {self.sfm.layer}/{self.sfm.num_layers}, "
                f"{self.sfm.frame_rate:g} frames/s, averaged by {cfg.average_frames}"
            )

    def run(self) -> None:
        cfg = self.cfg
        k_avg = cfg.average_frames
        frame_shift = k_avg / self.sfm.frame_rate if self.sfm else None
        feature_type = cfg.feature_type or f"{cfg.sfm.name}_layer{cfg.sfm.layer}_avg{k_avg}"
        total = sum(len(self.chunks[k]) for k in self.todo)
        pbar = tqdm(total=total, desc=f"extract[{self.rank}]", unit="utt", disable=total == 0, dynamic_ncols=True)
        t0, seconds, failed = time.perf_counter(), 0.0, 0
        for k in self.todo:
            res = extract_chunk(
                self.chunks[k],
                lambda waves: [f.numpy() for f in self.sfm.encode(waves)],
                self.output_dir,
                k,
                feature_type,
                frame_shift,
                k_avg,
                cfg.batch_size,
                cfg.max_duration,
                on_item=lambda s: pbar.update(1),
            )
            seconds += res.audio_seconds
            failed += res.failed
            wall = time.perf_counter() - t0
            pbar.set_postfix(rtf=f"{seconds / max(wall, 1e-9):.1f}x", failed=failed)
        pbar.close()
        if total:
            wall = time.perf_counter() - t0
            log.info(
                f"rank {self.rank}: {seconds / 3600:.2f} h of audio in {wall:.0f} s "
                f"({seconds / max(wall, 1e-9):.1f} audio s per s); {failed} items skipped"
            )
        if self.world_size > 1:
            dist.barrier()
        if self.rank == 0:
            manifest, n, n_failed = merge_chunks(self.output_dir, len(self.chunks))
            info = {
                "manifest": str(manifest),
                "utterances": n,
                "failed": n_failed,
                "sfm": cfg.sfm.name,
                "average_frames": k_avg,
                **self.settings,
                # what a checkpoint trained on these features records, to rebuild them from audio
                "features": {
                    "sfm": _sfm_record(cfg.sfm),
                    "average_frames": k_avg,
                    "feature_type": feature_type,
                    "storage_dtype": "float16",
                },
            }
            atomic_write_text(self.output_dir / EXTRACT_INFO, json.dumps(info, indent=2) + "\n")
            log.info(f"Wrote {manifest}: {n} utterances; {n_failed} skipped (see {self.output_dir / 'failures.jsonl'})")

    def cleanup(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


SCHEMA = ExtractSettings  # this recipe's schema (tests load every packaged config through it)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    cfg = load_settings(cfg, ExtractSettings, "speechmapper_extract")  # a misspelt or unknown setting stops here
    recipe = ExtractRecipe(cfg)
    recipe.setup()
    recipe.run()
    recipe.cleanup()


if __name__ == "__main__":
    from speechmapper_tune.errors import run_recipe

    # an error prints its message first, in one line (SPEECHMAPPER_DEBUG=1: and the traceback)
    sys.exit(run_recipe("speechmapper_extract", resolve_config_argv, recipe_main))
