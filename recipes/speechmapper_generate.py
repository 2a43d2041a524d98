"""Generate from speech with a SpeechMapper projector and a frozen LLM (batched greedy, KV cache).

    tune run speechmapper_generate --config smollm2_135M/generate \
        projector_checkpoint=runs/smollm2_135M/stage2_asr_ce_mse/checkpoints/step_300 \
        manifest=runs/features/whisper_base/test/cuts.jsonl.gz output_dir=runs/gen/stage2_test
    tune run speechmapper_generate --config smollm2_135M/generate prompt=null stop_at_newline=True ...  # stage 1: zero-shot
    tune run speechmapper_generate --config smollm2_135M/generate span_source=transcript ...  # text topline
    tune run speechmapper_generate --config smollm2_135M/generate span_source=asr ...         # ASR + LLM cascade

``manifest`` is a feature manifest (``speechmapper_extract``'s ``cuts.jsonl.gz``) or an audio
manifest (a lhotse CutSet, JSON lines ``{"id", "audio", "text"}`` or a LibriSpeech folder): for
audio, features are made first, into ``${output_dir}/features``, with the speech encoder the
projector checkpoint records. Items without a transcript are generated too (``reference`` null:
eval scores only the items that have one).

Writes ``${output_dir}/generations.jsonl`` (``id``, ``task``, ``prompt``, ``hypothesis``,
``reference``, ``flags``, ``stopped_by``, ``span_vectors``), appending batch by batch: a rerun
skips the ids already there, and only resumes when ``generation_settings.json`` (projector
weights' hash, LLM, prompt, decoding) matches (``overwrite=True`` starts over).
``not_generated.jsonl`` lists every manifest item that was not generated, with the reason.
Stuck decodes (a token or n-gram repeated up to the length limit, paper B.2) are flagged per
item; the optional guard stops them early.

``tune run --nproc_per_node N speechmapper_generate ...`` splits the items (and an audio manifest's
feature chunks) between the N processes; each writes its own part files and rank 0 merges them
into the same ``generations.jsonl`` (in manifest order) and ``not_generated.jsonl`` one process writes.

``runs``: a list of overrides, each one generation run of the settings above with those values (e.g.
``{projector_checkpoint: ..., manifest: ..., output_dir: ...}``). They run one after another in this
process, which loads the frozen LLM once for all of them (projectors with LoRA adapters load their own);
every run's settings are checked before the first starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torchtune import config, training, utils
from tqdm import tqdm

from speechmapper_tune.checkpoint.projector_io import LORA_WEIGHTS, WEIGHTS, lora_weights_file
from speechmapper_tune.config_schema import (
    MISSING,
    LLMSettings,
    PromptSettings,
    StuckGuardSettings,
    at_least,
    load_settings,
    settings,
)
from speechmapper_tune.configs import resolve_config_argv, resolve_path_setting
from speechmapper_tune.corpus import load_audio_manifest
from speechmapper_tune.data.extract import chunk_done, chunked, extract_chunk, merge_chunks
from speechmapper_tune.data.generation_data import (
    GENERATIONS,
    NOT_GENERATED,
    SPAN_SOURCES,
    FasterWhisperTranscriber,
    append_rows,
    done_ids,
    file_sha256,
    merge_parts,
    part_file,
    read_rows,
    start_run,
    write_not_generated,
)
from speechmapper_tune.data.manifest import SkipCounter, load_feature_items
from speechmapper_tune.data.sampler import ShuffledBatchSampler
from speechmapper_tune.data.stage2 import (
    PromptParts,
    PromptTemplate,
    Stage2Collator,
    Stage2Dataset,
    prepare_asr_examples,
    prepare_instruction_examples,
)
from speechmapper_tune.dtypes import COMPUTE_DTYPES, dtype_name, resolve_dtype
from speechmapper_tune.generation import StuckGuard
from speechmapper_tune.models.speech_lm import SpeechLM

log = utils.get_logger("INFO")


@settings
class CascadeSettings:
    model_dir: Any = None  # span_source=asr: the faster-whisper model folder (or a _component_ returning one)
    compute_type: str = "int8"


@settings
class LengthCap:
    """An answer's token budget: ``tokens_per_second * duration + extra`` (with max_new_tokens above it)."""

    tokens_per_second: float = MISSING
    extra: float = MISSING


@settings
class GenerateSettings:
    """Every setting speechmapper_generate reads (see the configs in configs/*/generate.yaml)."""

    output_dir: str = MISSING
    manifest: str = MISSING  # a feature manifest (speechmapper_extract) or an audio one
    span_source: str = MISSING  # projector, transcript (the text topline) or asr (the cascade)
    projector_checkpoint: Any = None  # a folder or a shipped name (span_source=projector)
    device: str = "cpu"
    seed: int = 0
    llm: LLMSettings = field(default_factory=LLMSettings)  # unset: what the projector records
    prompt: Optional[PromptSettings] = None  # default: the checkpoint's training prompt
    cascade: Optional[CascadeSettings] = None  # span_source=asr
    trim_pad_vectors: Optional[bool] = None  # default: as trained
    batch_size: int = at_least(1)
    max_new_tokens: int = at_least(1)
    max_seq_len: Optional[int] = None  # default: the LLM's
    stop_at_newline: bool = False
    length_cap: Optional[LengthCap] = None
    stuck_guard: Optional[StuckGuardSettings] = None  # off unless set (the paper has none)
    max_duration: float = 30.0  # seconds: longer audio is not generated
    overwrite: bool = False  # start over instead of resuming the rows of the same settings
    restart_if_changed: bool = False  # start over where the rows were made with other settings, instead of an error
    max_items: Optional[int] = None
    instructions: Any = None  # JSON lines of instruction rows; none: ASR with the prompt
    task: str = "asr"
    runs: Optional[List[Dict[str, Any]]] = None  # one run per entry: these settings with its overrides


def _check_trained_prompt(trained, template: PromptTemplate, cfg: DictConfig) -> None:
    """Warn when the prompt differs from the one the stage-2 checkpoint was trained with (a silent WER loss)."""
    if not trained or cfg.get("instructions") or cfg.get("task", "asr") != "asr":
        return
    diff = {
        k: (trained.get(k), getattr(template, k))
        for k in ("system", "user", "instruction", "assistant_prefix")
        if k in trained and (trained.get(k) or None) != (getattr(template, k) or None)
    }
    if diff:
        log.warning(
            f"{cfg.projector_checkpoint} was trained with another prompt: "
            + "; ".join(f"prompt.{k}={t!r} in training, {g!r} here" for k, (t, g) in diff.items())
        )


class GenerateRecipe:
    def __init__(self, cfg: DictConfig, llm_cache: Optional[dict] = None):
        self.cfg = cfg = load_settings(cfg, GenerateSettings, "speechmapper_generate")  # as given, or defaulted
        self.llm_cache = llm_cache  # shared by the runs of one process: the frozen LLM loads once
        self.output_dir = Path(cfg.output_dir)
        self.device = utils.get_device(cfg.device)  # cuda: this process's LOCAL_RANK device
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("gloo")  # only barriers: every rank generates its own items
        if cfg.span_source not in SPAN_SOURCES:
            raise ValueError(f"span_source={cfg.span_source!r}: expected one of {SPAN_SOURCES}")

    def setup(self) -> None:
        cfg = self.cfg
        training.set_seed(seed=cfg.seed)
        if cfg.llm.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"llm.dtype={cfg.llm.dtype!r}: expected one of {list(COMPUTE_DTYPES)}")
        if cfg.span_source == "projector" and not cfg.projector_checkpoint:
            raise ValueError("span_source=projector needs projector_checkpoint=<stage-1 or stage-2 checkpoint folder>")
        cuts = load_audio_manifest(cfg.manifest)
        first = next(iter(cuts), None)
        has_features = first is not None and first.features is not None
        if not has_features and cfg.span_source != "projector":
            raise ValueError(
                f"span_source={cfg.span_source} reads a feature manifest (speechmapper_extract's cuts.jsonl.gz); "
                f"manifest={cfg.manifest} has no features"
            )
        llm = {
            **OmegaConf.to_container(cfg.llm, resolve=True),
            "checkpoint": resolve_path_setting(cfg.llm.checkpoint),
            "tokenizer": resolve_path_setting(cfg.llm.tokenizer),
        }
        # the projector is checked against this LLM, and its LoRA adapters found, before the LLM loads
        self.model = SpeechLM.from_checkpoint(
            cfg.projector_checkpoint,
            llm=llm,
            prompt=_plain(cfg.prompt),
            device=self.device,
            trim_pad_vectors=cfg.trim_pad_vectors,
            stop_at_newline=cfg.stop_at_newline,
            on_warning=log.warning,
            llm_cache=self.llm_cache,
        )
        self.projector, self.chat, self.template = self.model.projector, self.model.chat, self.model.template
        meta = self.model.meta
        if meta.get("lora"):  # the adapters trained with this projector belong to the LLM it feeds
            log.info(
                f"LoRA adapters (rank {meta['lora']['rank']}) loaded from {lora_weights_file(self.model.checkpoint)}"
            )
        _check_trained_prompt(meta.get("prompt") if cfg.span_source == "projector" else None, self.template, cfg)
        self.llm = self.model.llm
        self.pad_id = self.model.pad_id
        self.prompt_text = self._prompt_text(None)
        if self.rank == 0:  # the settings check, overwrite, and the parts a killed multi-process run left
            changed = start_run(self.output_dir, self._settings(), cfg.overwrite, cfg.restart_if_changed)
            if changed:
                log.info(f"{self.output_dir}: made with other settings ({'; '.join(changed)}): generating again")
            merge_parts(self.output_dir)
        self._barrier()
        self.out_path = self.output_dir / GENERATIONS
        self.skipped = SkipCounter()
        manifest = cfg.manifest if has_features else self._extract_features(cuts)
        # a user's own audio has no transcript: it is generated all the same, and eval leaves it unscored
        items = load_feature_items(manifest, self.skipped, require_transcript=False)
        if cfg.span_source == "transcript":  # the text topline needs the text
            for it in [it for it in items if not it.text]:
                self.skipped.add("no transcript (the text topline reads it)", it.id)
            items = [it for it in items if it.text]
        out_len = self.projector.output_length if self.projector else (lambda n: n)
        max_len = (cfg.max_seq_len if cfg.max_seq_len is not None else int(self.llm.max_seq_len)) - cfg.max_new_tokens
        if cfg.instructions:
            examples = prepare_instruction_examples(
                cfg.instructions,
                {it.id: it for it in items},
                self.chat,
                self.template,
                out_len,
                max_len,
                self.skipped,
                cfg.task,
                generation=True,
            )
        else:
            examples = prepare_asr_examples(
                items, self.chat, self.template, out_len, max_len, self.skipped, generation=True
            )
        if cfg.max_items:
            examples = examples[: cfg.max_items]
        if self.rank == 0:
            write_not_generated(self.output_dir / NOT_GENERATED, self.skipped.items)
        done = done_ids(
            self.out_path
        )  # every rank sees the same file: rank 0 merged and repaired it before the barrier
        self.order = [e.id for e in examples]
        self.by_id = {e.id: e for e in examples}
        self.examples = [e for e in examples if e.id not in done][self.rank :: self.world_size]
        one = self.world_size == 1  # one process appends to the outputs themselves
        self.rows_path = self.out_path if one else part_file(self.output_dir, GENERATIONS, self.rank)
        self.missing_path = (
            self.output_dir / NOT_GENERATED if one else part_file(self.output_dir, NOT_GENERATED, self.rank)
        )
        share = f"; rank {self.rank} of {self.world_size} generates {len(self.examples)}" if not one else ""
        log.info(
            f"{len(examples)} items ({len(done)} already generated{share}); not generated {self.skipped.total()} "
            f"({self.skipped.summary()}), listed in {self.output_dir / NOT_GENERATED}"
        )
        self.transcriber = None
        if cfg.span_source == "asr":
            self.cuts = {c.id: c for c in cuts}
            self.transcriber = FasterWhisperTranscriber(
                resolve_path_setting(cfg.cascade.model_dir), cfg.cascade.compute_type
            )
        guard = _guard_settings(cfg.stuck_guard)
        self.guard = StuckGuard(**guard) if guard is not None else None

    def _prompt_text(self, instruction) -> str:
        """The prompt as the LLM reads it, ``<speech>`` for the span; ``instruction``: an instruction row's own."""
        return (
            self.chat.render_text(self.template.messages(instruction), add_generation_prompt=True)
            + self.template.assistant_prefix
        )

    def _settings(self) -> dict:
        """What makes this run's rows: a rerun resumes them only when all of it is the same."""
        cfg, model = self.cfg, self.model
        projector = None
        if model.checkpoint is not None:
            lora = Path(model.checkpoint) / LORA_WEIGHTS
            projector = {
                "step": model.meta.get("step"),  # the weights, not where they are: a copied folder resumes
                "weights_sha256": file_sha256(Path(model.checkpoint) / WEIGHTS),
                "lora_sha256": file_sha256(lora) if model.meta.get("lora") and lora.is_file() else None,
            }
        return {
            "manifest": str(Path(cfg.manifest).resolve()),
            "span_source": cfg.span_source,
            "projector": projector,
            "llm": {
                "name": model.llm_meta["name"],
                "fingerprint": model.llm_meta["fingerprint"],
                "dtype": dtype_name(resolve_dtype(cfg.llm.dtype, self.device, setting="llm.dtype")),
            },
            "cascade": str(resolve_path_setting(cfg.cascade.model_dir)) if cfg.span_source == "asr" else None,
            "prompt": self.prompt_text,
            "instructions": str(cfg.instructions or "") or None,
            "task": cfg.task,
            "decoding": {
                "max_new_tokens": cfg.max_new_tokens,
                "max_seq_len": cfg.max_seq_len,
                "stop_at_newline": model.stop_at_newline,
                "trim_pad_vectors": model.trim_pad_vectors,
                "length_cap": _plain(cfg.length_cap),
                "stuck_guard": _guard_settings(cfg.stuck_guard),
            },
        }

    def _extract_features(self, cuts) -> Path:
        """Features of an audio manifest, made with the speech encoder the checkpoint records (as
        speechmapper_extract does: same chunks, resume and failure list), in ``output_dir/features``."""
        cfg, feats = self.cfg, self.model.features
        if not feats or "sfm" not in feats:
            raise ValueError(
                f"manifest={cfg.manifest} has no features, and {self.model.checkpoint} does not record which "
                "speech encoder made its training features: run speechmapper_extract on it first"
            )
        # one folder per feature setting: another checkpoint's encoder never reuses these
        key = hashlib.sha256(json.dumps(feats, sort_keys=True).encode()).hexdigest()[:12]
        out = self.output_dir / "features" / f"{feats.get('feature_type', 'features')}-{key}"
        chunks = chunked(list(cuts), 500)
        todo = [k for k in range(len(chunks)) if k % self.world_size == self.rank and not chunk_done(out, k)]
        if todo:
            sfm, k_avg = self.model.sfm(), int(feats.get("average_frames", 1))
            pbar = tqdm(total=sum(len(chunks[k]) for k in todo), desc="features", unit="utt", dynamic_ncols=True)
            for k in todo:
                extract_chunk(
                    chunks[k],
                    lambda waves: [f.float().cpu().numpy() for f in sfm.encode(waves)],
                    out,
                    k,
                    feats.get("feature_type", "features"),
                    k_avg / sfm.frame_rate,
                    k_avg,
                    int(cfg.batch_size),
                    cfg.max_duration,
                    on_item=lambda _: pbar.update(1),
                )
            pbar.close()
        self._barrier()
        if self.rank == 0:
            merge_chunks(out, len(chunks))
        self._barrier()
        manifest = out / "cuts.jsonl.gz"  # what merge_chunks wrote
        for row in read_rows(out / "failures.jsonl"):
            self.skipped.add(row["reason"], row["id"])
        return manifest

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def run(self) -> None:
        if self.examples:
            self._generate()
        else:
            log.info(
                f"Nothing to generate{f' on rank {self.rank}' if self.world_size > 1 else ''}: {self.out_path} is complete"
            )
        self._barrier()
        if self.world_size > 1 and self.rank == 0:
            log.info(
                f"Merged {merge_parts(self.output_dir, self.order)} rows of {self.world_size} processes into {self.out_path}"
            )

    @torch.no_grad()
    def _generate(self) -> None:
        cfg = self.cfg
        loader = DataLoader(
            Stage2Dataset(self.examples),
            batch_sampler=ShuffledBatchSampler(len(self.examples), int(cfg.batch_size), shuffle=False),
            collate_fn=Stage2Collator(self.projector.output_length if self.projector else (lambda n: n), self.pad_id),
        )
        cap = cfg.length_cap
        pbar = tqdm(
            total=len(self.examples),
            desc=f"generate[{cfg.span_source}]" + (f"[{self.rank}]" if self.world_size > 1 else ""),
            unit="utt",
            dynamic_ncols=True,
        )
        t0, n_tokens, n_stuck = time.perf_counter(), 0, 0
        exs = {e.id: e for e in self.examples}
        for batch in loader:
            if batch.get("skipped"):
                self.skipped.record_batch(batch, log)
                append_rows(self.missing_path, [{"id": i, "reason": r} for i, r in batch["skipped"]])
            if not batch["ids"]:
                continue
            spans = self._spans(batch)
            parts = [PromptParts(p, q) for p, q in zip(batch["prefix"], batch["suffix"])]
            caps = None
            if cap:  # a length cap from the audio duration (tokens per second + a constant)
                caps = [int(cap.tokens_per_second * exs[i].item.duration + cap.extra) for i in batch["ids"]]
            results = self.model.generate(
                spans,
                parts,
                max_new_tokens=cfg.max_new_tokens,
                max_new_tokens_per_item=caps,
                stuck_guard=self.guard,
            )
            rows = []
            for item_id, res, span, resp, meta in zip(batch["ids"], results, spans, batch["response"], batch["meta"]):
                n_tokens += len(res.ids)
                n_stuck += int(res.stuck)
                # ASR: the normalized transcript as stored (a decode of its tokens could differ); else the answer
                reference = (
                    self.chat.decode(resp[:-1], skip_special_tokens=True).strip()
                    if cfg.instructions
                    else exs[item_id].item.text
                )
                rows.append(
                    {
                        "id": item_id,
                        "task": batch["tasks"][0] if cfg.instructions else "asr",
                        "prompt": self._prompt_text(meta["instruction"]) if "instruction" in meta else self.prompt_text,
                        "hypothesis": self.model.answer_text(res.ids),
                        "reference": reference or None,  # no transcript: generated, not scored
                        "flags": list(res.flags),
                        "stopped_by": res.stopped_by,
                        "span_vectors": int(span.shape[0]),
                        "span_source": cfg.span_source,
                        **meta,
                    }
                )
            append_rows(self.rows_path, rows)
            pbar.update(len(rows))
            pbar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - t0, 1e-9):.1f}", stuck=n_stuck)
        pbar.close()
        wall = time.perf_counter() - t0
        log.info(
            f"Generated {n_tokens} tokens in {wall:.0f} s ({n_tokens / max(wall, 1e-9):.1f} tokens/s); "
            f"{n_stuck} stuck decodes flagged; skipped {self.skipped.total()}; wrote {self.rows_path}"
        )

    def _spans(self, batch):
        src = self.cfg.span_source
        if src == "projector":
            pred, _, n = self.model.project(batch["features"], batch["lengths"])
            return [pred[b, : int(n[b])] for b in range(pred.shape[0])]
        if src == "transcript" and self.cfg.instructions:  # the source transcript, not the answer (a translation)
            texts = [self.by_id[i].item.text for i in batch["ids"]]
        elif src == "transcript":
            texts = [self.chat.decode(r[:-1], skip_special_tokens=True) for r in batch["response"]]
        else:
            from speechmapper_tune.data.extract import load_cut_audio

            # an instruction row's id is not its cut's (several rows ask about one cut): the cut is the example's item
            texts = [
                self.transcriber(load_cut_audio(self.cuts[self.by_id[i].item.id], max_duration=600.0))
                for i in batch["ids"]
            ]
        return [self.model.text_span(t) for t in texts]


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _guard_settings(node) -> Optional[dict]:
    """The stuck guard's settings as given (unset keys: StuckGuard's defaults); None: no guard."""
    return None if node is None else {k: v for k, v in _plain(node).items() if v is not None}


def run_configs(cfg: DictConfig) -> List[DictConfig]:
    """The runs ``cfg`` asks for: itself, or one per entry of ``runs`` (the rest of ``cfg`` with its overrides)."""
    runs = cfg.get("runs")
    if not runs:
        return [cfg]
    base = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "runs"])
    configs = []
    for i, override in enumerate(runs):
        if not isinstance(override, DictConfig):
            raise ValueError(f"runs[{i}]: expected a mapping of settings, got {override!r}")
        configs.append(OmegaConf.merge(base, override))
    return configs


SCHEMA = GenerateSettings  # this recipe's schema (tests load every packaged config through it)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    configs = run_configs(cfg)
    # a misspelt or unknown setting in any run stops here, before anything loads
    configs = [load_settings(run_cfg, GenerateSettings, "speechmapper_generate") for run_cfg in configs]
    llm_cache: dict = {}
    for i, run_cfg in enumerate(configs):
        if len(configs) > 1:
            log.info(f"Run {i + 1} of {len(configs)}: {run_cfg.output_dir}")
        recipe = GenerateRecipe(run_cfg, llm_cache)
        recipe.setup()
        recipe.run()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    from speechmapper_tune.errors import run_recipe

    # an error prints its message first, in one line (SPEECHMAPPER_DEBUG=1: and the traceback)
    sys.exit(run_recipe("speechmapper_generate", resolve_config_argv, recipe_main))
