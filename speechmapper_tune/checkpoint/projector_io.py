"""One checkpoint format for the projector, used by every recipe, and the recipe-state files.

A checkpoint is a folder:

    projector.safetensors   the projector's weights (fp32 by default; fp16 when shipped)
    projector_config.json   {"projector": ProjectorConfig, "llm": {...}, "stage": 1, "step": N, ...}
    recipe_state.pt         optimizer, scheduler, sampler, step, RNG (absent from shipped ones)

``projector_config.json`` alone rebuilds the model (``build_projector_from_config``) and names
the LLM embedding space it was trained for (vocab size, dim, a fingerprint of the table), so a
later stage can refuse a projector built for another LLM before loading that LLM.

Checkpoint folders are written as ``.tmp-step_N`` and renamed to ``step_N``; the ``latest``
file is rewritten atomically last. A killed job leaves the previous good checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from speechmapper_tune.checkpoint.atomic import atomic_write_json, atomic_write_text
from speechmapper_tune.models.projector import SpeechMapperProjector, build_projector_from_config

WEIGHTS = "projector.safetensors"
CONFIG = "projector_config.json"
STATE = "recipe_state.pt"
LORA_WEIGHTS = "lora_adapters.safetensors"  # beside the projector when stage 2 trained LoRA adapters on the LLM


def embedding_fingerprint(embedding: torch.Tensor) -> str:
    """A short hash of an embedding table, to recognise the LLM: a strided sample of 64 rows at bf16
    precision, so an fp32 table and its bf16 copy (a bf16 checkpoint, a GPU-side copy) hash alike."""
    return _hash_rows(embedding, torch.bfloat16)


def fingerprint_matches(saved: Optional[str], embedding: torch.Tensor) -> bool:
    """Whether a checkpoint's recorded fingerprint (None: none recorded) fits ``embedding``. Checkpoints
    written before the bf16-precision hash carry the hash at the table's own precision: also accepted."""
    return not saved or saved in (embedding_fingerprint(embedding), _hash_rows(embedding, None))


def _hash_rows(embedding: torch.Tensor, dtype: Optional[torch.dtype]) -> str:
    rows = embedding[:: max(1, embedding.shape[0] // 64)][:64].detach().cpu()
    rows = (rows.to(dtype) if dtype is not None else rows).float().contiguous()
    return hashlib.sha256(rows.numpy().round(5).tobytes()).hexdigest()[:16]


def save_projector(folder: str | Path, model: nn.Module, meta: Dict[str, Any], dtype: Optional[torch.dtype] = None) -> None:
    """Write weights and config into ``folder`` (the caller makes the folder write atomic)."""
    model = getattr(model, "module", model)  # unwrap DDP
    if not isinstance(model, SpeechMapperProjector):
        raise TypeError(f"expected a SpeechMapperProjector, got {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
    atomic_write_json(folder / CONFIG, {"projector": model.config.to_dict(), **meta})


def lora_weights_file(folder: str | Path) -> Path:
    """The LoRA adapter file of a checkpoint whose config names LoRA; a clear error when it is missing."""
    file = Path(folder) / LORA_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(f"{folder} was trained with LoRA adapters but has no {LORA_WEIGHTS}")
    return file


def read_projector_meta(folder: str | Path) -> Dict[str, Any]:
    file = Path(folder) / CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"projector checkpoint {folder}: {CONFIG} not found")
    return json.loads(file.read_text(encoding="utf-8"))


def load_projector(folder: str | Path, device: str | torch.device = "cpu") -> Tuple[SpeechMapperProjector, Dict[str, Any]]:
    """Rebuild a projector from its config and load its weights (in fp32)."""
    folder = Path(folder)
    meta = read_projector_meta(folder)
    model = build_projector_from_config(meta["projector"])
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"projector checkpoint {folder}: {WEIGHTS} not found")
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    model.load_state_dict(state)
    return model.to(device), meta


def check_projector_fits(meta: Dict[str, Any], embedding: torch.Tensor, where: str | Path) -> None:
    """The one compatibility check of a projector checkpoint against an LLM's embedding table (its
    output width and the table's fingerprint), made before the LLM itself is loaded."""
    out_dim, llm_dim = meta["projector"]["output_dim"], int(embedding.shape[1])
    if out_dim != llm_dim:
        raise ValueError(f"projector checkpoint {where} outputs {out_dim}-dim vectors but the LLM's embeddings are {llm_dim}-dim")
    if not fingerprint_matches(meta.get("llm", {}).get("fingerprint"), embedding):
        raise ValueError(f"projector checkpoint {where} was trained for another LLM "
                         f"({meta.get('llm', {}).get('checkpoint')}): the embedding tables differ")


def load_checked_projector(folder: str | Path, embedding: torch.Tensor,
                           device: str | torch.device = "cpu") -> Tuple[SpeechMapperProjector, Dict[str, Any]]:
    """``load_projector`` after ``check_projector_fits`` (every recipe and the SpeechLM load this way)."""
    check_projector_fits(read_projector_meta(folder), embedding, folder)
    return load_projector(folder, device)


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """``{output_dir}/checkpoints/step_N`` folders, a ``latest`` pointer, and pruning."""

    def __init__(self, output_dir: str | Path, keep_last: int = 2):
        self.root = Path(output_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(
        self,
        step: int,
        model: nn.Module,
        meta: Dict[str, Any],
        recipe_state: Optional[Dict[str, Any]],
        extra_weights: Optional[Dict[str, Dict[str, torch.Tensor]]] = None,
    ) -> Path:
        """Write ``step_N``; ``extra_weights`` maps file names (e.g. LoRA adapters) to state dicts."""
        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp-step_{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_projector(tmp, model, {**meta, "step": step})
        for name, sd in (extra_weights or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp / name), metadata={"format": "pt"})
        if recipe_state is not None:
            torch.save(recipe_state, tmp / STATE)
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(self.root / "latest", final.name + "\n")
        self._prune(keep=final)
        return final

    def latest(self) -> Optional[Path]:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        folder = self.root / pointer.read_text().strip()
        return folder if (folder / CONFIG).is_file() else None

    def load_state(self, folder: Path) -> Dict[str, Any]:
        file = folder / STATE
        if not file.is_file():
            raise FileNotFoundError(f"cannot resume: {file} not found")
        return torch.load(file, map_location="cpu", weights_only=False)

    def _prune(self, keep: Path) -> None:
        steps = sorted((p for p in self.root.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
        for p in steps[: max(0, len(steps) - self.keep_last)]:
            if p != keep:
                shutil.rmtree(p, ignore_errors=True)
