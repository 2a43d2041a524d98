"""SpeechMapper stage 1: pretrain the projector against the LLM's embedding table only.

    tune run speechmapper_pretrain --config tiny/stage1
    tune run speechmapper_pretrain --config smollm2_135M/stage1 output_dir=runs/s1 max_steps=5000
    tune run --nproc_per_node 2 speechmapper_pretrain --config tiny/stage1
    tune run speechmapper_pretrain --config llama3_1_8B/stage1 llm.checkpoint=/path/Llama-3.1-8B-Instruct dry_run=True

No LLM forward ever runs: only the token-embedding tensor is read from the LLM checkpoint
(paper section 2.2). Loss Eq. 2 in fp32; the projector may run under bf16 autocast.
``loss`` (Eq. 2) is logged; ``objective`` is what is backpropagated (equal unless the config
turns on ``loss.weighting: balanced``, ``loss.classifier_weight`` or ``loss.ctc_weight``). Optional
``data.augment`` masks training features (never validation ones); optional ``data.target_text: written``
embeds the transcript as written instead of normalized (train and validation targets).
Copy this file next to your own torchtune recipes to adapt it; it reads top to bottom:
setup -> train (with validate and save_checkpoint) -> cleanup.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torchtune import config, training, utils
from tqdm import tqdm

from speechmapper_tune.checkpoint.atomic import MetricsFile
from speechmapper_tune.checkpoint.embedding_table import embedding_shape, load_embedding_table
from speechmapper_tune.checkpoint.projector_io import (
    CheckpointManager,
    embedding_fingerprint,
    load_checked_projector,
    read_projector_meta,
)
from speechmapper_tune.config_schema import (
    MISSING,
    AugmentSettings,
    TrainingSettings,
    at_least,
    load_settings,
    settings,
)
from speechmapper_tune.configs import resolve_config_argv, resolve_path_setting
from speechmapper_tune.data.extract import features_record
from speechmapper_tune.data.loader import TrainLoader
from speechmapper_tune.data.manifest import SkipCounter, load_feature_items
from speechmapper_tune.data.sampler import LengthCappedBatchSampler
from speechmapper_tune.data.stage1 import (
    Stage1Collator,
    Stage1Dataset,
    count_tokens,
    lookup_targets,
    prepare_stage1_examples,
    sample_subset,
)
from speechmapper_tune.data.text_tokenizer import load_text_tokenizer
from speechmapper_tune.dtypes import autocast_dtype
from speechmapper_tune.losses import nearest_token_ids, norm_ratio, position_masks
from speechmapper_tune.models.projector import count_parameters
from speechmapper_tune.training import (
    BestValidation,
    all_reduce_mean,
    gather_rng,
    gradient_sync,
    micro_batches,
    restore_training_state,
    training_state,
)

log = utils.get_logger("INFO")
LOSS_KEYS = ("loss", "objective", "mse", "mse_word", "mse_pad", "cosine")
# validation token accuracy split by how often the target token occurs in the training targets:
# val_token_acc_seen_{lo}_{hi} (hi None: and more) and the share of dev word tokens in each bucket
SEEN_BUCKETS = ((0, 9), (10, 49), (50, 499), (500, None))


@settings
class EmbeddingTableSettings:
    """The LLM whose token-embedding table is the target (no LLM forward runs in stage 1)."""

    checkpoint: Any = MISSING  # a folder, or a _component_ returning one
    pad_id: int = MISSING  # the pad target, and CTC's blank
    name: Optional[str] = None  # recorded with the projector, for stage 2 and generation
    chat_format: Optional[str] = None
    tokenizer: Any = None  # default: the checkpoint folder
    embedding_key: Optional[str] = None  # default: found in the checkpoint


@settings
class PretrainData:
    train_manifest: str = MISSING
    val_manifest: Optional[str] = None
    max_val_items: Optional[int] = None  # a fixed random subset of the validation set
    max_tokens_per_batch: int = at_least(1)
    num_workers: int = at_least(0, 0)
    target_text: Optional[str] = None  # normalized (default) or written
    augment: Optional[AugmentSettings] = None  # training features only


@settings
class PretrainSettings(TrainingSettings):
    """Every setting speechmapper_pretrain reads (see the configs in configs/*/stage1*.yaml)."""

    dtype: str = "fp32"  # the projector's autocast: fp32, bf16 or auto; the loss always runs in fp32
    dry_run: bool = False  # build the projector, print its size and stop
    llm: EmbeddingTableSettings = field(default_factory=EmbeddingTableSettings)
    init_projector: Any = None  # warm start from another stage-1 projector (a folder or a _component_)
    data: PretrainData = field(default_factory=PretrainData)


class PretrainRecipe:
    """Stage-1 pretraining of the SpeechMapper projector (single device or DDP)."""

    def __init__(self, cfg: DictConfig):
        # a misspelt or unknown setting stops here, before anything loads; then every default is filled in
        self.cfg = cfg = load_settings(cfg, PretrainSettings, "speechmapper_pretrain")
        self.output_dir = Path(cfg.output_dir)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_main = self.rank == 0
        self.device = utils.get_device(cfg.device)
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        # auto: bf16 autocast only where the device computes bf16 natively; the loss always runs in fp32
        self.autocast_dtype = autocast_dtype(cfg.dtype, self.device)
        self.max_steps = cfg.max_steps
        self.grad_accum = cfg.gradient_accumulation_steps
        self.step = 0
        self.skipped = SkipCounter()
        if not cfg.resume and not cfg.dry_run:
            CheckpointManager(
                self.output_dir
            ).refuse_existing_run()  # before any work: a new run must not mix with an old one

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        training.set_seed(seed=cfg.seed)
        if cfg.prepare is not None:  # e.g. write the tiny synthetic set before reading it
            if self.is_main:
                config.instantiate(cfg.prepare)
            self._barrier()
        self.loss_fn = config.instantiate(cfg.loss)  # validates alpha before anything heavy
        self.llm_checkpoint = resolve_path_setting(cfg.llm.checkpoint)
        self.llm_tokenizer = resolve_path_setting(cfg.llm.tokenizer) or self.llm_checkpoint
        vocab, llm_dim = embedding_shape(self.llm_checkpoint, cfg.llm.embedding_key)
        pad_id = cfg.llm.pad_id
        if not 0 <= pad_id < vocab:
            raise ValueError(f"llm.pad_id={pad_id} is outside the vocabulary of {self.llm_checkpoint} (size {vocab})")
        self.model = config.instantiate(cfg.model)
        if self.model.output_dim != llm_dim:
            raise ValueError(
                f"model.output_dim={self.model.output_dim} but the embedding table of {self.llm_checkpoint} "
                f"has dim {llm_dim}: set model.output_dim={llm_dim}"
            )
        n_params = count_parameters(self.model)
        log.info(f"Projector: {n_params / 1e6:.2f}M parameters; LLM embedding table {vocab} x {llm_dim}")
        if cfg.dry_run:
            print(json.dumps({"dry_run": True, "parameters": n_params, "vocab_size": vocab, "llm_dim": llm_dim}))
            return

        self.embedding = load_embedding_table(self.llm_checkpoint, cfg.llm.embedding_key).to(self.device)
        # for the classifier and CTC terms and val_classifier_ce; the pad id is CTC's blank
        self.loss_fn.set_embedding(self.embedding, blank_id=pad_id)
        # classifier_ce and ctc are metrics only when they train: a full-vocabulary matmul per step
        optional = {"classifier_ce": self.loss_fn.classifier_weight, "ctc": self.loss_fn.ctc_weight}
        self.loss_keys = LOSS_KEYS + tuple(k for k, weight in optional.items() if weight > 0)
        self.pad_id = pad_id
        self.llm_meta = {
            "name": cfg.llm.name,
            "chat_format": cfg.llm.chat_format,
            "checkpoint": str(self.llm_checkpoint),
            "vocab_size": vocab,
            "dim": llm_dim,
            "pad_id": pad_id,
            "fingerprint": embedding_fingerprint(self.embedding.cpu()),
        }
        tokenizer = load_text_tokenizer(self.llm_tokenizer)
        self.train_loader, _ = self._setup_data(cfg.data.train_manifest, tokenizer, shuffle=True)
        # how often each token occurs in the training targets, for the split validation accuracy
        self.train_token_counts = torch.bincount(
            torch.tensor([t for e in self.train_loader.dataset.examples for t in e.token_ids], dtype=torch.long),
            minlength=vocab,
        )[:vocab].to(self.device)
        self.val_loader = None
        if cfg.data.val_manifest:
            self.val_loader, _ = self._setup_data(cfg.data.val_manifest, tokenizer, shuffle=False, split="val")
        log.info(f"Skipped at setup: {self.skipped.total()} ({self.skipped.summary()})")

        if cfg.init_projector and not (cfg.resume and self.checkpoints_exist()):
            self._init_from(resolve_path_setting(cfg.init_projector))
        self.model.to(self.device)
        self.optimizer = config.instantiate(cfg.optimizer, self.model.parameters())
        self.scheduler = config.instantiate(cfg.lr_scheduler, self.optimizer)
        self.checkpoints = CheckpointManager(self.output_dir, cfg.keep_last_n_checkpoints)
        self.best = BestValidation(**cfg.best_checkpoint).check(self.val_loader is not None, cfg.val_every_n_steps)
        torch.manual_seed(cfg.seed + 1000 * self.rank)  # per-rank dropout stream
        if cfg.resume:
            self._resume()  # restores the RNG state saved with the checkpoint
        if self.world_size > 1:
            self.model = DistributedDataParallel(self.model)
        self.loggers = [config.instantiate(c) for c in cfg.metric_loggers] if self.is_main else []
        self._open_metrics_file()

    def checkpoints_exist(self) -> bool:
        return CheckpointManager(self.output_dir, 1).latest() is not None

    def _init_from(self, folder) -> None:
        """Warm start: another stage-1 projector's weights (same architecture, same LLM), a fresh optimizer and schedule."""
        saved = read_projector_meta(folder)["projector"]
        ours = json.loads(json.dumps(self.model.config.to_dict()))  # tuples as the saved JSON has them
        if saved != ours:
            diff = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
            raise ValueError(
                f"init_projector={folder}: its architecture differs from model in {diff}; "
                f"set the model settings to the checkpoint's ({ {k: saved.get(k) for k in diff} })"
            )
        source, _ = load_checked_projector(folder, self.embedding)
        self.model.load_state_dict(source.state_dict())
        log.info(f"Initialized the projector from {folder} (fresh optimizer and LR schedule)")

    def _setup_data(self, manifest: str, tokenizer, shuffle: bool, split: str = "train"):
        cfg = self.cfg.data
        items = load_feature_items(manifest, self.skipped)
        feat_dim = items[0].num_features
        if feat_dim != self.model.input_dim:
            raise ValueError(f"{manifest} has {feat_dim}-dim features but model.input_dim={self.model.input_dim}")
        out_len = self.model.output_length
        max_tokens = cfg.max_tokens_per_batch
        target_text = cfg.target_text or "normalized"
        examples = prepare_stage1_examples(items, tokenizer.encode, out_len, max_tokens, self.skipped, target_text)
        if target_text == "written":  # a manifest without written forms would silently train on normalized text
            differ = sum(e.item.written not in ("", e.item.text) for e in examples)
            log.info(
                f"{split}: written-form targets; {differ} of {len(examples)} differ from the normalized transcript"
            )
        if split == "val" and cfg.max_val_items:
            examples = [examples[i] for i in sample_subset(len(examples), cfg.max_val_items, 0)]
        if not examples:
            raise ValueError(f"{manifest}: no trainable item left (skipped: {self.skipped.summary()})")
        hours = sum(e.item.duration for e in examples) / 3600
        log.info(f"{split}: {len(examples)} utterances, {hours:.2f} h, from {manifest}")
        rank, world = (self.rank, self.world_size) if split == "train" else (0, 1)
        sampler = LengthCappedBatchSampler(
            [e.out_length for e in examples],
            max_tokens,
            shuffle=shuffle,
            seed=int(self.cfg.seed),
            rank=rank,
            world_size=world,
        )
        if split == "train" and len(sampler) == 0:
            raise ValueError(f"{manifest}: fewer batches than ranks ({world}); add data or lower max_tokens_per_batch")
        augment = cfg.augment if split == "train" else None  # validation never sees masked features
        loader = DataLoader(
            Stage1Dataset(examples, augment=augment, seed=int(self.cfg.seed)),
            batch_sampler=sampler,
            collate_fn=Stage1Collator(out_len, self.pad_id),
            num_workers=cfg.num_workers,
            generator=torch.Generator().manual_seed(
                int(self.cfg.seed)
            ),  # keeps the global RNG (dropout) exact on resume
        )
        if split == "train":  # an epoch in which no item loads is an error, not an endless loop
            loader = TrainLoader(loader, manifest, self.skipped)
        return loader, sampler

    def _resume(self) -> None:
        folder = self.checkpoints.latest()
        if folder is None:
            log.info(f"resume=True but no checkpoint in {self.checkpoints.root}: starting from scratch")
            return
        model, _ = load_checked_projector(folder, self.embedding)  # the same checks as every recipe
        self.model.load_state_dict(model.state_dict())
        state = self.checkpoints.load_state(folder)
        self.step = restore_training_state(
            state,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            train_loader=self.train_loader,
            rank=self.rank,
        )
        self.best.load_state_dict(state.get("best"))
        data = self.train_loader.state_dict()
        log.info(f"Resumed from {folder} at step {self.step} (epoch {data['epoch']}, batch {data['consumed']})")

    def _open_metrics_file(self) -> None:
        self.metrics = None
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.metrics = MetricsFile(self.output_dir / "metrics.jsonl", resumed_step=self.step)

    # ------------------------------------------------------------------ train
    def _forward(self, batch: Dict[str, Any], model) -> Dict[str, torch.Tensor]:
        feats = batch["features"].to(self.device)
        lengths = batch["lengths"].to(self.device)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            pred, out_lengths = model(feats, lengths)
        target_ids = batch["target_ids"].to(self.device)
        target = lookup_targets(self.embedding, target_ids)
        num_words = batch["num_words"].to(self.device)
        out = self.loss_fn(pred.float(), target, out_lengths, num_words, target_ids)
        out.update(pred=pred, target=target, target_ids=target_ids, out_lengths=out_lengths, num_words=num_words)
        return out

    def train(self) -> None:
        cfg = self.cfg
        if cfg.dry_run:
            return
        if (
            self.step and self.step >= self.max_steps
        ):  # resumed a finished run: validating and saving again would repeat them
            log.info(f"Already at step {self.step} (max_steps={self.max_steps}): nothing to do")
            return
        if self.best.stopped_at is not None:  # resumed a run that stopped early: it stays stopped
            log.info(f"Stopped early at step {self.best.stopped_at} (best {self.best.describe()}): nothing to do")
            return
        log_every, val_every, save_every = (
            cfg[k] or 0 for k in ("log_every_n_steps", "val_every_n_steps", "save_every_n_steps")
        )
        clip = cfg.clip_grad_norm
        batches = self.train_loader.batches()
        validated_at = None
        if cfg.validate_at_start and self.step == 0:  # the starting point's figures (e.g. of init_projector)
            self._log(self.validate())
            validated_at = 0
        pbar = tqdm(
            total=self.max_steps, initial=self.step, disable=not self.is_main, desc="stage 1", dynamic_ncols=True
        )
        t0, vectors = time.perf_counter(), 0
        self.model.train()
        while self.step < self.max_steps:
            sums = {k: 0.0 for k in self.loss_keys}
            for batch, last in micro_batches(batches, self.grad_accum, self.skipped, log, self.world_size, self.device):
                with gradient_sync(self.model, last):
                    out = self._forward(batch, self.model)
                    (out["objective"] / self.grad_accum).backward()
                for k in self.loss_keys:
                    sums[k] += float(out[k].detach())
                vectors += count_tokens(batch)[0]
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(clip) if clip else float("inf"))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            pbar.update(1)
            metrics = all_reduce_mean({k: v / self.grad_accum for k, v in sums.items()}, self.world_size, self.device)
            pbar.set_postfix(loss=f"{metrics['loss']:.1f}", cos=f"{metrics['cosine']:.3f}")
            if log_every and (self.step % log_every == 0 or self.step == 1):
                elapsed = time.perf_counter() - t0
                metrics.update(
                    lr=self.optimizer.param_groups[0]["lr"],
                    grad_norm=float(grad_norm),
                    vectors_per_second=vectors * self.world_size / max(elapsed, 1e-9),
                    epoch=self.train_loader.epoch,
                    skipped=self.skipped.total(),
                )
                self._log(metrics)
                t0, vectors = time.perf_counter(), 0
            due = save_every and self.step % save_every == 0 and self.step < self.max_steps
            if val_every and self.step % val_every == 0 and self.step < self.max_steps:
                if self.best.save_or_stop(self.step, self._validate(), due, self.save_checkpoint):
                    log.info(f"No better {self.best.metric} in {self.best.since} validations: stopped early")
                    break
            elif due:
                self.save_checkpoint()
        pbar.close()
        if self.best.stopped_at is None:  # (a run that stopped early validated and saved at its last step)
            best = self._validate() if validated_at != self.step else False  # max_steps=0 + validate_at_start: once
            self.save_checkpoint(best=best)
        log.info(f"Done: {self.step} steps; skipped items: {self.skipped.total()} ({self.skipped.summary()})")

    def _validate(self) -> bool:
        """One validation, logged; True when it is the best so far by ``best_checkpoint.metric``."""
        metrics = self.validate()
        self._log(metrics)
        return self.best.update(self.step, metrics)

    @torch.no_grad()
    def validate(self) -> Dict[str, float]:
        if self.val_loader is None:
            return {}
        model = getattr(self.model, "module", self.model)
        model.eval()
        self.loss_fn.eval()  # a sampled classifier (loss.classifier_negatives) scores the whole table here
        sums: Dict[str, float] = {}
        weight = 0.0
        seen_hits, seen_total = [0] * len(SEEN_BUCKETS), [0] * len(SEEN_BUCKETS)
        for batch in self.val_loader:
            self.skipped.record_batch(batch, log)
            if not batch["ids"]:
                continue
            out = self._forward(batch, model)
            word, pad = position_masks(out["out_lengths"], out["num_words"], out["pred"].shape[1])
            words_only = word & (torch.arange(word.shape[1], device=word.device)[None] < out["num_words"][:, None])
            vals = {k: float(out[k]) for k in self.loss_keys}
            if "classifier_ce" not in vals:  # a diagnostic even when the classifier does not train
                vals["classifier_ce"] = float(
                    self.loss_fn.classifier_ce(out["pred"], out["target_ids"], out["out_lengths"], out["num_words"])
                )
            ids = out["target_ids"][words_only]
            hit = nearest_token_ids(out["pred"][words_only], self.embedding) == ids  # nearest_token_accuracy, per token
            vals["token_acc"] = float(hit.float().mean()) if hit.numel() else 0.0
            seen = self.train_token_counts[ids]
            for b, (lo, hi) in enumerate(SEEN_BUCKETS):
                in_bucket = (seen >= lo) & (seen <= hi if hi is not None else True)
                seen_hits[b] += int((hit & in_bucket).sum())
                seen_total[b] += int(in_bucket.sum())
            vals["norm_ratio"] = float(norm_ratio(out["pred"], out["target"], words_only))
            w = float(count_tokens(batch)[0])
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + v * w
            weight += w
        model.train()
        self.loss_fn.train()
        out = {f"val_{k}": v / max(weight, 1e-9) for k, v in sums.items()}
        for (lo, hi), hits, total in zip(SEEN_BUCKETS, seen_hits, seen_total):
            name = f"seen_{lo}_{hi}" if hi is not None else f"seen_{lo}_plus"
            if total:  # no dev token in this bucket: no figure
                out[f"val_token_acc_{name}"] = hits / total
            out[f"val_token_share_{name}"] = total / max(sum(seen_total), 1)
        return out

    def save_checkpoint(self, best: bool = False) -> None:
        rng = gather_rng(self.world_size)
        if self.is_main:
            state = training_state(
                step=self.step,
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler,
                train_loader=self.train_loader,
                rng=rng,
                config=OmegaConf.to_container(self.cfg, resolve=True),
                best=self.best,
            )
            meta = {
                "stage": 1,
                "llm": self.llm_meta,
                "recipe": "speechmapper_pretrain",
                "features": features_record(self.cfg.data.train_manifest),
            }
            folder = self.checkpoints.save(self.step, self.model, meta, state, best=best)
            log.info(f"Saved checkpoint {folder}" + (f" (best: {self.best.describe()})" if best else ""))
        self._barrier()

    # ------------------------------------------------------------------ helpers
    def _log(self, metrics: Dict[str, float]) -> None:
        if not metrics or not self.is_main:
            return
        for lg in self.loggers:
            lg.log_dict(metrics, step=self.step)
        self.metrics.append(self.step, metrics)

    def _barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()

    def cleanup(self) -> None:
        for lg in getattr(self, "loggers", []):
            lg.close()
        if dist.is_initialized():
            dist.destroy_process_group()


SCHEMA = PretrainSettings  # this recipe's schema (tests load every packaged config through it)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = PretrainRecipe(cfg)  # checks the settings first
    recipe.setup()
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    from speechmapper_tune.errors import run_recipe

    # an error prints its message first, in one line (SPEECHMAPPER_DEBUG=1: and the traceback)
    sys.exit(run_recipe("speechmapper_pretrain", resolve_config_argv, recipe_main))
