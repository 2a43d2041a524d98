"""Extract frozen-SFM features for SpeechMapper: audio manifest -> averaged fp16 feature manifest.

    tune run speechmapper_extract --config features/whisper_base manifest=corpus/manifests/cuts_train.jsonl.gz output_dir=feats/train
    tune run --nproc_per_node 2 speechmapper_extract --config features/whisper_tiny_en manifest=... output_dir=...
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
from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torchtune import config, utils
from tqdm import tqdm

from speechmapper_tune.checkpoint.atomic import atomic_write_text
from speechmapper_tune.config_keys import check_recipe_config
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
        if cfg.get("manifest") in (None, "", "???"):
            raise ValueError("set manifest=<audio manifest, JSON-lines file or LibriSpeech folder>")
        if int(cfg.average_frames) < 1:
            raise ValueError(f"average_frames={cfg.average_frames} must be >= 1 (paper: 2)")
        if cfg.dtype not in EXTRACT_DTYPES:
            raise ValueError(f"dtype={cfg.dtype!r}: expected one of {list(EXTRACT_DTYPES)}")
        self.cuts = list(load_audio_manifest(cfg.manifest))
        if cfg.get("max_utterances"):  # the first N, in manifest order: a quick subset
            self.cuts = self.cuts[: int(cfg.max_utterances)]
        if not self.cuts:
            raise ValueError(f"{cfg.manifest}: no utterance found")
        perturb = cfg.get("perturb")
        perturbations = perturbations_from_config(OmegaConf.to_container(perturb, resolve=True) if perturb else None)
        self.settings = extract_settings(perturbations)
        check_resume_settings(self.output_dir, self.settings)  # chunk k must hold the same items as before
        items = with_copies(self.cuts, perturbations)
        self.chunks = chunked(items, int(cfg.shard_size))
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
            extra = {k: v for k, v in s.items() if k not in ("name", "path", "layer")}
            self.sfm = build_sfm(
                s.name,
                path=s.get("path"),
                layer=s.get("layer"),
                device=utils.get_device(cfg.get("device", "cpu")),
                dtype=resolve_dtype(cfg.dtype, cfg.get("device", "cpu"), allowed=EXTRACT_DTYPES),
                **extra,
            )
            log.info(
                f"SFM {s.name}: dim {self.sfm.dim}, layer {self.sfm.layer}/{self.sfm.num_layers}, "
                f"{self.sfm.frame_rate:g} frames/s, averaged by {cfg.average_frames}"
            )

    def run(self) -> None:
        cfg = self.cfg
        k_avg = int(cfg.average_frames)
        frame_shift = k_avg / self.sfm.frame_rate if self.sfm else None
        feature_type = cfg.get("feature_type") or f"{cfg.sfm.name}_layer{cfg.sfm.get('layer')}_avg{k_avg}"
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
                int(cfg.batch_size),
                float(cfg.max_duration),
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
                    "sfm": OmegaConf.to_container(cfg.sfm, resolve=True),
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


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    check_recipe_config(cfg, "speechmapper_extract")  # a misspelt or unknown setting stops here, before anything loads
    recipe = ExtractRecipe(cfg)
    recipe.setup()
    recipe.run()
    recipe.cleanup()


if __name__ == "__main__":
    from speechmapper_tune.errors import run_recipe

    # an error prints its message first, in one line (SPEECHMAPPER_DEBUG=1: and the traceback)
    sys.exit(run_recipe("speechmapper_extract", resolve_config_argv, recipe_main))
