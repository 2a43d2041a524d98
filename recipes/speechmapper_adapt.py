"""SpeechMapper stage 2: adapt a pretrained projector to a frozen LLM by instruction tuning.

    tune run speechmapper_adapt --config tiny/stage2
    tune run speechmapper_adapt --config smollm2_135M/stage2_asr_ce_mse projector_checkpoint=runs/smollm2_135M/stage1/checkpoints/step_600
    tune run speechmapper_adapt --config llama3_1_8B/stage2_asr_ce_mse llm.checkpoint=/models/Llama-3.1-8B-Instruct ...

Loss (paper Eq. 3, the ``loss`` component ``speechmapper_tune.losses.Stage2Loss``):
``(1 - sigma) * CE + sigma * L_MSE``; CE on the response tokens only, L_MSE the stage-1 Eq. 1
between the projector output and the transcript's embeddings. sigma=0.9 keeps the projector in
the embedding space (task-agnostic); sigma=0 gives a task specialist. The LLM is frozen
(``requires_grad=False``, no optimizer state): only the projector (and optional LoRA adapters)
trains. The LLM input is built by ``SpeechLM.forward``, the same builder generation uses.
Reads top to bottom: setup -> train (validate, save_checkpoint) -> cleanup.

Options beyond the paper (defaults are the paper's): ``loss.weighting=balanced``
mixes the relative gradients of CE and MSE (the logged ``loss`` stays Eq. 3); ``loss.kl_ratio``
aligns the LLM's behaviour on speech with its behaviour on the transcript (a KL term against the
same frozen LLM reading the transcript, run as a teacher inside the forward; ``Stage2Loss``);
``data.train.augment`` masks training features; ``validate_at_start`` logs the starting
projector's validation losses at step 0.

Under ``tune run --nproc_per_node N`` (gloo on CPU, nccl on GPU) the whole SpeechLM is sharded
with FSDP2 as torchtune's distributed recipes do (``SpeechLM.shard``: each LLM layer, the
projector, the embeddings and an untied LM head, then the root), so every rank holds 1/N of the
frozen weights and of the projector, LoRA and optimizer state. Each rank reads every N-th
batch of ``batch_size``, gradients are averaged across ranks (FSDP's reduce-scatter) and clipped
by their global norm: N ranks x gradient_accumulation_steps A equal one process with N*A, step
for step. Checkpoints hold full tensors (gathered, written by rank 0) in the one-process format.
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader
from torchtune import config, training, utils
from tqdm import tqdm

from speechmapper_tune.checkpoint.atomic import MetricsFile
from speechmapper_tune.checkpoint.projector_io import (
    LORA_WEIGHTS,
    CheckpointManager,
    load_projector,
    lora_weights_file,
)
from speechmapper_tune.config_schema import (
    MISSING,
    AugmentSettings,
    Component,
    LLMSettings,
    LoraSettings,
    PromptSettings,
    TrainingSettings,
    at_least,
    load_settings,
    settings,
)
from speechmapper_tune.configs import resolve_config_argv, resolve_path_setting
from speechmapper_tune.data.extract import features_record
from speechmapper_tune.data.loader import TrainLoader
from speechmapper_tune.data.manifest import SkipCounter, load_feature_items
from speechmapper_tune.data.sampler import ShuffledBatchSampler
from speechmapper_tune.data.stage1 import lookup_targets, sample_subset
from speechmapper_tune.data.stage2 import (
    PromptTemplate,
    Stage2Collator,
    Stage2Dataset,
    prepare_asr_examples,
    prepare_instruction_examples,
)
from speechmapper_tune.dtypes import COMPUTE_DTYPES
from speechmapper_tune.models.llms import load_lora_adapters, lora_state_dict
from speechmapper_tune.models.projector import build_projector_from_config, count_parameters
from speechmapper_tune.models.sharding import full_optimizer_state, full_state_dict, full_tensor, shard_optimizer_state
from speechmapper_tune.models.speech_lm import SpeechLM
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
LOSS_KEYS = ("loss", "ce", "mse")
_CHECKPOINT_WRAPPED = "_checkpoint_wrapped_module."  # the name torch's activation-checkpoint wrapper adds


@settings
class AdaptLLM(LLMSettings):
    quantize: Optional[str] = None  # e.g. nf4: the frozen LLM's weights quantized after loading


@settings
class AdaptData:
    manifest: str = MISSING  # features (speechmapper_extract)
    instructions: Any = None  # JSON lines of instruction rows; none: ASR on the transcripts
    task: str = "instruction"  # how the instruction rows read (instruction, st, sqa, self)
    asr_mix_ratio: float = 0.0  # ASR samples mixed into the instruction data (section 4.2), as a share of it
    num_workers: int = at_least(0, 0)
    target_text: str = "normalized"  # or written: the transcript as written


@settings
class AdaptTrainData(AdaptData):
    augment: Optional[AugmentSettings] = None  # validation never sees masked features: no data.val.augment


@settings
class AdaptValData(AdaptData):
    max_items: Optional[int] = None  # a fixed random subset


@settings
class AdaptDataSettings:
    train: AdaptTrainData = field(default_factory=AdaptTrainData)
    val: Optional[AdaptValData] = None


@settings
class AdaptSettings(TrainingSettings):
    """Every setting speechmapper_adapt reads (see the configs in configs/*/stage2*.yaml)."""

    llm: AdaptLLM = field(default_factory=AdaptLLM)
    projector_checkpoint: Any = None  # a stage-1 (or stage-2) checkpoint folder, or a _component_ returning one
    from_scratch: bool = False  # no projector_checkpoint: an ablation without stage 1
    prompt: PromptSettings = field(default_factory=PromptSettings)
    asr_prompt: Optional[PromptSettings] = None  # for the ASR samples of data.train.asr_mix_ratio
    lora: Optional[LoraSettings] = None  # LoRA adapters on the frozen LLM, trained with the projector
    validate_at_start: bool = True  # the starting projector's validation at step 0: the run's baseline
    lr_scheduler: Component = field(  # section 3: a constant learning rate
        default_factory=lambda: {"_component_": "speechmapper_tune.schedules.constant_schedule"}
    )
    trim_pad_vectors: bool = False  # the paper keeps the projector's trailing pad vectors
    batch_size: int = at_least(1)
    max_seq_len: Optional[int] = None  # default: the LLM's
    enable_activation_checkpointing: bool = False
    data: AdaptDataSettings = field(default_factory=AdaptDataSettings)


class AdaptRecipe:
    """Stage-2 adaptation of the SpeechMapper projector on a frozen torchtune LLM."""

    def __init__(self, cfg: DictConfig):
        # a misspelt or unknown setting stops here, before anything loads; then every default is filled in
        self.cfg = cfg = load_settings(cfg, AdaptSettings, "speechmapper_adapt")
        self.output_dir = Path(cfg.output_dir)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_main = self.rank == 0
        self.device = utils.get_device(cfg.device)
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        if cfg.llm.dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"llm.dtype={cfg.llm.dtype!r}: expected one of {list(COMPUTE_DTYPES)} (the loss is always fp32)"
            )
        self.loss_fn = config.instantiate(cfg.loss)  # Stage2Loss: validates sigma, alpha, weighting
        self.max_steps = cfg.max_steps
        self.grad_accum = cfg.gradient_accumulation_steps
        self.step = 0
        self.resume_from = None  # the checkpoint folder resume=True continues from
        self.skipped = SkipCounter()
        if not cfg.resume:
            CheckpointManager(
                self.output_dir
            ).refuse_existing_run()  # before any work: a new run must not mix with an old one

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        training.set_seed(seed=cfg.seed)
        if cfg.prepare is not None:
            if self.is_main:
                config.instantiate(cfg.prepare)
            self._barrier()
        # SpeechLM checks the projector against this LLM's embedding table before the LLM is loaded
        self.model = self._build_model()
        self.projector, self.llm, self.chat = self.model.projector, self.model.llm, self.model.chat
        self.pad_id, self.embedding, self.template = self.model.pad_id, self.model.embedding, self.model.template
        self.quantize = cfg.llm.quantize
        if self.quantize is not None:
            n = self.model.quantize_(self.quantize, self.world_size)  # refuses any method but nf4
            log.info(f"NF4: {n} frozen LLM weights quantized (4-bit NormalFloat, torchao)")
        self.loss_keys = LOSS_KEYS
        if float(getattr(self.loss_fn, "regularizer_weight", 0.0)) > 0:  # the classifier regularizer reads the table
            self.loss_fn.set_embedding(self.embedding, blank_id=self.pad_id)
            self.loss_keys = (*LOSS_KEYS, "regularizer")
        self.needs_teacher = bool(
            getattr(self.loss_fn, "needs_teacher", False)
        )  # loss.kl_ratio > 0: behaviour alignment
        if self.needs_teacher:
            self.loss_keys = (*self.loss_keys, "kl")
        self.lora_params = [p for p in self.llm.parameters() if p.requires_grad]  # empty unless LoRA is on
        assert bool(self.lora_params) == (cfg.lora is not None), "the LLM must be frozen except for LoRA adapters"
        if cfg.resume:
            self.resume_from = self._resume_weights()  # into the full modules, before they are sharded
        if cfg.enable_activation_checkpointing:
            from torchtune.modules import TransformerSelfAttentionLayer

            training.set_activation_checkpointing(self.llm, auto_wrap_policy={TransformerSelfAttentionLayer})
        # the features the projector reads, recorded so `speechmapper transcribe` can rebuild them from audio
        self.features = features_record(cfg.data.train.manifest) or self.model.features
        self.train_loader, _ = self._setup_data(cfg.data.train, shuffle=True)
        self.val_loader = self._setup_data(cfg.data.val, shuffle=False)[0] if cfg.data.val is not None else None
        log.info(f"Skipped at setup: {self.skipped.total()} ({self.skipped.summary()})")

        self.projector.train()
        n_proj, n_lora, n_llm = (
            count_parameters(self.projector),
            sum(p.numel() for p in self.lora_params),
            count_parameters(self.llm),
        )
        if self.world_size > 1:
            self._shard()
        else:
            self.projector.to(self.device)
        self.optimizer = config.instantiate(cfg.optimizer, [*self.projector.parameters(), *self.lora_params])
        self.scheduler = config.instantiate(cfg.lr_scheduler, self.optimizer)
        self.checkpoints = CheckpointManager(self.output_dir, cfg.keep_last_n_checkpoints)
        self.best = BestValidation(**cfg.best_checkpoint).check(self.val_loader is not None, cfg.val_every_n_steps)
        torch.manual_seed(cfg.seed + 1000 * self.rank)
        if self.resume_from is not None:
            self._resume_state(self.resume_from)
        self.loggers = [config.instantiate(c) for c in cfg.metric_loggers] if self.is_main else []
        self._open_metrics_file()
        log.info(
            f"Trainable: projector {n_proj:,} + LoRA {n_lora:,} parameters; "
            f"LLM frozen ({n_llm / 1e6:.1f}M, no optimizer state)"
        )

    def _shard(self) -> None:
        """Shard the SpeechLM (``SpeechLM.shard``) and take the sharded parameters' handles."""
        self.model.shard(self.device)
        self.projector, self.llm = (
            self.model.projector,
            self.model.llm,
        )  # the same modules, parameters now DTensor shards
        self.lora_params = [p for p in self.llm.parameters() if p.requires_grad]
        self.embedding = self.model.embedding  # the root unit moved this buffer (and the LLM's) to the device
        if "regularizer" in self.loss_keys:
            self.loss_fn.set_embedding(self.embedding, blank_id=self.pad_id)
        log.info(f"FSDP: the SpeechLM sharded over {self.world_size} ranks ({len(self.llm.layers)} LLM layers + root)")

    def _build_model(self) -> SpeechLM:
        cfg = self.cfg
        path = cfg.projector_checkpoint
        llm = {
            **OmegaConf.to_container(cfg.llm, resolve=True),
            "checkpoint": resolve_path_setting(cfg.llm.checkpoint),
            "tokenizer": resolve_path_setting(cfg.llm.tokenizer),
        }
        llm.pop("quantize", None)  # applied by setup, after loading
        lora = OmegaConf.to_container(cfg.lora, resolve=True) if cfg.lora is not None else None
        prompt = OmegaConf.to_container(cfg.prompt, resolve=True)
        # N processes: built in host memory, and fully_shard moves each unit to the device as it shards it, so a
        # device holds its shards plus one whole layer at a time: an LLM bigger than one device still loads
        load_device = torch.device("cpu") if self.world_size > 1 else self.device
        common = dict(
            llm=llm,
            prompt=prompt,
            lora=lora,
            device=load_device,
            trim_pad_vectors=cfg.trim_pad_vectors,
            on_warning=log.warning,
        )
        if path:  # a LoRA-trained stage-2 checkpoint goes on with its adapters when lora is set
            model = SpeechLM.from_checkpoint(path, **common)
            meta = model.meta
            log.info(f"Projector from {path} (stage {meta.get('stage')}, step {meta.get('step')})")
            if meta.get("lora") and lora:
                log.info(f"LoRA adapters from {lora_weights_file(model.checkpoint)}")
            self.init_meta = {"from": str(path), "stage": meta.get("stage"), "step": meta.get("step")}
            return model
        if not cfg.from_scratch:
            raise ValueError(
                "set projector_checkpoint=<stage-1 checkpoint folder>, or from_scratch=True for an ablation"
            )
        projector = config.instantiate(cfg.model)
        model = SpeechLM.from_checkpoint(None, projector=projector, **common)
        log.info("Projector from scratch (ablation: no stage 1)")
        self.init_meta = {"from": None}
        return model

    def _setup_data(self, dcfg: DictConfig, shuffle: bool):
        proj = self.projector
        items = load_feature_items(dcfg.manifest, self.skipped)
        if items[0].num_features != proj.input_dim:
            raise ValueError(
                f"{dcfg.manifest} has {items[0].num_features}-dim features but the projector takes {proj.input_dim}"
            )
        max_len = self.cfg.max_seq_len if self.cfg.max_seq_len is not None else int(self.llm.max_seq_len)
        examples = []
        if dcfg.instructions:
            by_id = {it.id: it for it in items}
            examples = prepare_instruction_examples(
                dcfg.instructions,
                by_id,
                self.chat,
                self.template,
                proj.output_length,
                max_len,
                self.skipped,
                dcfg.task,
            )
            n_asr = int(round(len(examples) * dcfg.asr_mix_ratio))
            if n_asr:  # section 4.2: ASR samples mixed in to stabilise short task-specific IT
                asr_template = PromptTemplate(**OmegaConf.to_container(self.cfg.asr_prompt, resolve=True))
                asr = prepare_asr_examples(
                    items,
                    self.chat,
                    asr_template,
                    proj.output_length,
                    max_len,
                    self.skipped,
                    target_text=dcfg.target_text,
                )
                rng = random.Random(int(self.cfg.seed))
                examples += [asr[rng.randrange(len(asr))] for _ in range(n_asr)]
        else:
            examples = prepare_asr_examples(
                items,
                self.chat,
                self.template,
                proj.output_length,
                max_len,
                self.skipped,
                target_text=dcfg.target_text,
            )
        if not shuffle and dcfg.max_items:
            examples = [examples[i] for i in sample_subset(len(examples), dcfg.max_items, 0)]
        if not examples:
            raise ValueError(f"{dcfg.manifest}: no usable example (skipped: {self.skipped.summary()})")
        rank, world = (self.rank, self.world_size) if shuffle else (0, 1)
        sampler = ShuffledBatchSampler(
            len(examples),
            int(self.cfg.batch_size),
            shuffle=shuffle,
            seed=int(self.cfg.seed),
            rank=rank,
            world_size=world,
        )
        if shuffle and len(sampler) == 0:
            raise ValueError(
                f"{dcfg.manifest}: {len(examples)} examples make no full batch of {self.cfg.batch_size} per rank"
            )
        log.info(f"{'train' if shuffle else 'val'}: {len(examples)} examples from {dcfg.manifest}")
        augment = dcfg.augment if shuffle else None  # validation never sees masked features
        loader = DataLoader(
            Stage2Dataset(examples, augment=augment, seed=int(self.cfg.seed)),
            batch_sampler=sampler,
            collate_fn=Stage2Collator(proj.output_length, self.pad_id),
            num_workers=dcfg.num_workers,
            generator=torch.Generator().manual_seed(int(self.cfg.seed)),
        )
        if shuffle:  # an epoch in which no item loads is an error, not an endless loop
            loader = TrainLoader(loader, dcfg.manifest, self.skipped)
        return loader, sampler

    def _resume_weights(self):
        folder = CheckpointManager(self.output_dir).latest()
        if folder is None:
            log.info(
                f"resume=True but no checkpoint in {self.output_dir / 'checkpoints'}: starting from the initial projector"
            )
            return None
        model, _ = load_projector(folder)
        self.projector.load_state_dict(model.state_dict())
        if self.lora_params:
            load_lora_adapters(self.llm, folder)
        return folder

    def _resume_state(self, folder: Path) -> None:
        state = self.checkpoints.load_state(folder)
        self.step = restore_training_state(
            state,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            train_loader=self.train_loader,
            rank=self.rank,
            # the file holds full tensors: each rank keeps the shard of its parameters
            optimizer_state=(lambda full: shard_optimizer_state(self.optimizer, full)) if self.world_size > 1 else None,
        )
        self.best.load_state_dict(state.get("best"))
        log.info(f"Resumed from {folder} at step {self.step}")

    def _open_metrics_file(self) -> None:
        self.metrics = None
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.metrics = MetricsFile(self.output_dir / "metrics.jsonl", resumed_step=self.step)

    # ------------------------------------------------------------------ train
    def _forward(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        # SpeechLM: prompt | speech | suffix | response, logits at the labels (and the transcript-fed teacher's)
        out = self.model(batch, teacher=self.needs_teacher)
        target = lookup_targets(self.embedding, batch["target_ids"].to(self.device))
        teacher = {k: out[k] for k in ("teacher_logits", "teacher_rows") if k in out}
        losses = self.loss_fn(
            out["logits"],
            out["labels"],
            out["pred"],
            target,
            out["out_lengths"],
            batch["num_words"].to(self.device),
            batch["has_mse"].to(self.device),
            batch["target_ids"].to(self.device),
            **teacher,
        )
        return {**losses, "tokens": out["tokens"], "speech_vectors": out["speech_vectors"]}

    def train(self) -> None:
        cfg = self.cfg
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
        pbar = tqdm(
            total=self.max_steps, initial=self.step, disable=not self.is_main, desc="stage 2", dynamic_ncols=True
        )
        validated_at = None
        if cfg.validate_at_start and self.step == 0:
            self._log(self.validate())  # the stage-1 projector's baseline, so "val CE falls" is measurable
            validated_at = 0
        t0, tokens = time.perf_counter(), 0
        while self.step < self.max_steps:
            sums = {k: 0.0 for k in self.loss_keys}
            for batch, last in micro_batches(batches, self.grad_accum, self.skipped, log, self.world_size, self.device):
                # under FSDP, gradients reduce-scattered once per step, after the last micro-batch
                with gradient_sync(self.model, last):
                    out = self._forward(batch)
                    (out["objective"] / self.grad_accum).backward()
                for k in self.loss_keys:
                    sums[k] += float(out[k].detach())
                tokens += out["tokens"] + out["speech_vectors"]
            trainable = [*self.projector.parameters(), *self.lora_params]
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, float(clip) if clip else float("inf"))
            if isinstance(grad_norm, DTensor):  # the norm over every rank's shards: the global one clipped by
                grad_norm = grad_norm.full_tensor()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            pbar.update(1)
            metrics = all_reduce_mean({k: v / self.grad_accum for k, v in sums.items()}, self.world_size, self.device)
            pbar.set_postfix(ce=f"{metrics['ce']:.3f}", mse=f"{metrics['mse']:.0f}")
            if log_every and (self.step % log_every == 0 or self.step == 1):
                elapsed = time.perf_counter() - t0
                metrics.update(
                    lr=self.optimizer.param_groups[0]["lr"],
                    grad_norm=float(grad_norm),
                    tokens_per_second=tokens * self.world_size / max(elapsed, 1e-9),
                    epoch=self.train_loader.epoch,
                    skipped=self.skipped.total(),
                )
                self._log(metrics)
                t0, tokens = time.perf_counter(), 0
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
        projector = self.projector
        projector.eval()
        sums, weight = {k: 0.0 for k in self.loss_keys}, 0
        for batch in self.val_loader:  # every rank reads the whole (small) validation set: FSDP needs them all
            self.skipped.record_batch(batch, log)
            if not batch["ids"]:
                continue
            out = self._forward(batch)
            for k in self.loss_keys:
                sums[k] += float(out[k]) * len(batch["ids"])
            weight += len(batch["ids"])
        projector.train()
        return {f"val_{k}": v / max(weight, 1) for k, v in sums.items()}

    def save_checkpoint(self, best: bool = False) -> None:
        rng = gather_rng(self.world_size)
        # every rank takes part in gathering the full tensors; rank 0 writes them
        projector = self._full_projector() if self.world_size > 1 else self.projector
        optimizer = full_optimizer_state(self.optimizer) if self.world_size > 1 else self.optimizer.state_dict()
        lora = self._full_lora_state() if self.lora_params else None
        if self.is_main:
            state = training_state(
                step=self.step,
                optimizer=optimizer,
                scheduler=self.scheduler,
                train_loader=self.train_loader,
                rng=rng,
                config=OmegaConf.to_container(self.cfg, resolve=True),
                best=self.best,
            )
            meta = {
                "stage": 2,
                "llm": self.model.llm_meta,
                "recipe": "speechmapper_adapt",
                "init": self.init_meta,
                "sigma": self.loss_fn.sigma,
                "trim_pad_vectors": self.model.trim_pad_vectors,
                **(
                    {"kl_ratio": self.loss_fn.kl_ratio, "kl_temperature": self.loss_fn.kl_temperature}
                    if self.needs_teacher
                    else {}
                ),
                "prompt": OmegaConf.to_container(self.cfg.prompt, resolve=True),  # generation uses it by default
                "features": self.features,
            }
            if (
                self.quantize
            ):  # generation loads the LLM unquantized; the record says what the projector trained against
                meta["llm_quantize"] = self.quantize
            extra = {LORA_WEIGHTS: lora} if self.lora_params else None
            meta["lora"] = OmegaConf.to_container(self.cfg.lora, resolve=True) if self.lora_params else None
            folder = self.checkpoints.save(self.step, projector, meta, state, extra_weights=extra, best=best)
            log.info(f"Saved checkpoint {folder}" + (f" (best: {self.best.describe()})" if best else ""))
        self._barrier()

    # ------------------------------------------------------------------ helpers
    def _log(self, metrics: Dict[str, float]) -> None:
        if not metrics or not self.is_main:
            return
        for lg in self.loggers:
            lg.log_dict(metrics, step=self.step)
        self.metrics.append(self.step, metrics)

    def _full_projector(self) -> torch.nn.Module:
        """An unsharded CPU copy of the projector (collective: every rank calls it)."""
        full = build_projector_from_config(self.projector.config)
        full.load_state_dict(full_state_dict(self.projector))
        return full

    def _full_lora_state(self) -> Dict[str, torch.Tensor]:
        """The adapters' full tensors, named as in a model without activation-checkpoint wrappers (so any
        run, and generation, loads them)."""
        return {k.replace(_CHECKPOINT_WRAPPED, ""): full_tensor(v).cpu() for k, v in lora_state_dict(self.llm).items()}

    def _barrier(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()

    def cleanup(self) -> None:
        for lg in getattr(self, "loggers", []):
            lg.close()
        if dist.is_initialized():
            dist.destroy_process_group()


SCHEMA = AdaptSettings  # this recipe's schema (tests load every packaged config through it)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = AdaptRecipe(cfg)  # checks the settings first
    recipe.setup()
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    from speechmapper_tune.errors import run_recipe

    # an error prints its message first, in one line (SPEECHMAPPER_DEBUG=1: and the traceback)
    sys.exit(run_recipe("speechmapper_adapt", resolve_config_argv, recipe_main))
