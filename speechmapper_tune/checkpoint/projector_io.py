"""One checkpoint format for the projector, used by every recipe, and the recipe-state files.

A checkpoint is a folder:

    projector.safetensors   the projector's weights (fp32 by default; fp16 when shipped)
    projector_config.json   {"projector": ProjectorConfig, QueryProjectorConfig or LightAdapterConfig, "llm": {...}, "stage": 1, "step": N, ...}
    recipe_state.pt         optimizer, scheduler, sampler, step, RNG (absent from shipped ones), as plain
                            data: read with ``torch.load(weights_only=True)``, so it cannot run code

``projector_config.json`` alone rebuilds the model (``build_projector_from_config``) and names
the LLM embedding space it was trained for (vocab size, dim, a fingerprint of the table), so a
later stage can refuse a projector built for another LLM before loading that LLM.

Checkpoint folders are written as ``.tmp-step_N`` and renamed to ``step_N``; the ``latest``
file is rewritten atomically after that, and older folders are pruned last. The folder ``latest``
names is never deleted, so a killed job leaves ``latest`` on a complete checkpoint; should the
pointer still be missing or broken, ``latest()`` falls back to the newest complete ``step_N``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from speechmapper_tune.checkpoint.atomic import atomic_write_json, atomic_write_text
from speechmapper_tune.models.light_adapter import LightAdapter
from speechmapper_tune.models.projector import SpeechMapperProjector, build_projector_from_config
from speechmapper_tune.models.query_projector import QueryProjector

WEIGHTS = "projector.safetensors"
CONFIG = "projector_config.json"
STATE = "recipe_state.pt"
LORA_WEIGHTS = "lora_adapters.safetensors"  # beside the projector when stage 2 trained LoRA adapters on the LLM
log = logging.getLogger(__name__)


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


def save_projector(
    folder: str | Path, model: nn.Module, meta: Dict[str, Any], dtype: Optional[torch.dtype] = None
) -> None:
    """Write weights and config into ``folder`` (the caller makes the folder write atomic)."""
    model = getattr(model, "module", model)  # unwrap DDP
    if not isinstance(model, (SpeechMapperProjector, QueryProjector, LightAdapter)):
        raise TypeError(f"expected a SpeechMapperProjector, QueryProjector or LightAdapter, got {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous() for k, v in model.state_dict().items()
    }
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
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"cannot read {file} (truncated or corrupt?): {err}") from err


def load_weights(file: str | Path) -> Dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``, with an error that names the file when it is truncated or corrupt."""
    try:
        return load_file(str(file))
    except SafetensorError as err:
        raise ValueError(f"cannot read {file} (truncated or corrupt?): {err}") from err


def load_projector(
    folder: str | Path, device: str | torch.device = "cpu"
) -> Tuple[SpeechMapperProjector, Dict[str, Any]]:
    """Rebuild a projector from its config and load its weights (in fp32)."""
    folder = Path(folder)
    meta = read_projector_meta(folder)
    model = build_projector_from_config(meta["projector"])
    weights = folder / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"projector checkpoint {folder}: {WEIGHTS} not found")
    state = {k: v.float() for k, v in load_weights(weights).items()}
    model.load_state_dict(state)
    return model.to(device), meta


def check_projector_fits(meta: Dict[str, Any], embedding: torch.Tensor, where: str | Path) -> None:
    """The one compatibility check of a projector checkpoint against an LLM's embedding table (its
    output width and the table's fingerprint), made before the LLM itself is loaded."""
    out_dim, llm_dim = meta["projector"]["output_dim"], int(embedding.shape[1])
    if out_dim != llm_dim:
        raise ValueError(
            f"projector checkpoint {where} outputs {out_dim}-dim vectors but the LLM's embeddings are {llm_dim}-dim"
        )
    llm = meta.get("llm") or {}
    if not llm.get("fingerprint"):  # nothing to check against: the LLM may be the wrong one
        log.warning(
            f"projector checkpoint {where} records no fingerprint of its LLM's embedding table, so it cannot "
            f"be checked against this LLM ({llm.get('checkpoint') or 'LLM not recorded'}); it is used as is"
        )
    elif not fingerprint_matches(llm["fingerprint"], embedding):
        raise ValueError(
            f"projector checkpoint {where} was trained for another LLM "
            f"({llm.get('checkpoint')}): the embedding tables differ"
        )


def load_checked_projector(
    folder: str | Path, embedding: torch.Tensor, device: str | torch.device = "cpu"
) -> Tuple[SpeechMapperProjector, Dict[str, Any]]:
    """``load_projector`` after ``check_projector_fits`` (every recipe and the SpeechLM load this way)."""
    check_projector_fits(read_projector_meta(folder), embedding, folder)
    return load_projector(folder, device)


def rng_state() -> Dict[str, Any]:
    """Every RNG's state as plain data (tensors, numbers, tuples): numpy's key array becomes a tensor."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_recipe_state(file: str | Path) -> Dict[str, Any]:
    """Read a ``recipe_state.pt`` as plain data (``weights_only=True``): a file that holds anything else
    is refused with an error naming it, never unpickled, since unpickling can run code."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        what = [l for l in str(err).splitlines() if "Unsupported" in l] or [str(err)]  # torch's which-object line
        raise ValueError(
            f"{file} holds Python objects, not only plain data (tensors, numbers, strings, lists, dicts), so it is not "
            f"loaded: unpickling it could run code. Files written before recipe state was stored as plain data hold "
            f"numpy RNG state; start a new run in a new output_dir (the checkpoint's weights still load, e.g. as a "
            f"stage-2 projector_checkpoint). ({what[0].strip()})"
        ) from err
    except Exception as err:  # truncated or not a torch file at all
        raise ValueError(f"cannot read {file} (truncated or corrupt?): {err}") from err


class CheckpointManager:
    """``{output_dir}/checkpoints/step_N`` folders, a ``latest`` pointer, a ``best`` pointer (the step of the best
    validation, kept by pruning), and pruning."""

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
        best: bool = False,
    ) -> Path:
        """Write ``step_N``; ``extra_weights`` maps file names (e.g. LoRA adapters) to state dicts; ``best``: it is
        also the best validation's checkpoint (``best`` names it, and pruning keeps it).

        Saving the step ``latest`` already names keeps that checkpoint as it is: replacing it would mean
        deleting the one complete copy first, and a run resumed at that step has trained nothing since.
        """
        final = self.root / f"step_{step}"
        current = self._resolve()[0]
        if current is not None and current.resolve() == final.resolve():
            log.warning(f"{final} is already the latest checkpoint: kept as it is, not written again")
            if best:
                atomic_write_text(self.root / "best", final.name + "\n")
            return final
        tmp = self.root / f".tmp-step_{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_projector(tmp, model, {**meta, "step": step})
        for name, sd in (extra_weights or {}).items():
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(tmp / name), metadata={"format": "pt"}
            )
        if recipe_state is not None:
            torch.save(recipe_state, tmp / STATE)
        for f in tmp.iterdir():  # data on disk before the rename makes it visible
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # a leftover that ``latest`` does not name (checked above): an earlier try at this step
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        if best:  # before ``latest``: a stop in between leaves a best that exists
            atomic_write_text(self.root / "best", final.name + "\n")
        atomic_write_text(self.root / "latest", final.name + "\n")
        self._prune(keep=final)
        return final

    def best(self) -> Optional[Path]:
        """The best validation's checkpoint (``best_checkpoint.metric``), or None when none was marked."""
        pointer = self.root / "best"
        folder = self.root / pointer.read_text().strip() if pointer.is_file() else None
        return folder if folder is not None and is_complete(folder) else None

    def latest(self) -> Optional[Path]:
        """The checkpoint to resume from: the one ``latest`` names, or, when that pointer is missing or names
        an incomplete folder, the newest complete ``step_N`` (with a warning); None when there is none."""
        folder, broken = self._resolve()
        if broken:
            found = (
                f"resuming from the newest complete checkpoint, {folder}" if folder else "no complete checkpoint found"
            )
            log.warning(f"{broken}: {found}")
        return folder

    def load_state(self, folder: Path) -> Dict[str, Any]:
        file = folder / STATE
        if not file.is_file():
            raise FileNotFoundError(f"cannot resume: {file} not found")
        return load_recipe_state(file)

    def refuse_existing_run(self) -> None:
        """For a run started with ``resume=False``: an output_dir that holds another run's checkpoints
        would get fresh metrics beside the old checkpoints, and a later resume would mix the two runs."""
        found = self._steps()
        if found:
            raise FileExistsError(
                f"{self.root} holds the checkpoints of an earlier run ({', '.join(p.name for p in found)}) and resume "
                f"is off: pass resume=True to continue that run, or choose a new output_dir to start a new one "
                f"(or delete {self.root} to start over in this one)"
            )

    def _resolve(self) -> Tuple[Optional[Path], Optional[str]]:
        """(checkpoint to resume from, what is wrong with the ``latest`` pointer or None when it is fine)."""
        pointer = self.root / "latest"
        if pointer.is_file():
            folder = self.root / pointer.read_text().strip()
            if is_complete(folder):
                return folder, None
            broken = f"{pointer} names {folder.name}, which is missing or incomplete"
        elif self._steps():
            broken = f"{pointer} is missing"
        else:
            return None, None  # a new run: nothing saved yet
        complete = [p for p in self._steps() if is_complete(p)]
        return (complete[-1] if complete else None), broken

    def _steps(self) -> list:
        """``step_N`` folders, oldest first."""
        steps = [p for p in self.root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
        return sorted(steps, key=lambda p: int(p.name[5:]))

    def _prune(self, keep: Path) -> None:
        steps, best = self._steps(), self.root / "best"
        kept = {keep, self.root / best.read_text().strip()} if best.is_file() else {keep}
        for p in steps[: max(0, len(steps) - self.keep_last)]:
            if p not in kept:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".tmp-step_*"):  # left by saves killed half-way
            shutil.rmtree(p, ignore_errors=True)


def is_complete(folder: Path) -> bool:
    """Whether a run's checkpoint folder holds everything a resume reads: weights, config, recipe state
    (and the LoRA adapters its config names)."""
    if not all((folder / name).is_file() for name in (WEIGHTS, CONFIG, STATE)):
        return False
    try:
        meta = read_projector_meta(folder)
    except ValueError:
        return False
    return not meta.get("lora") or (folder / LORA_WEIGHTS).is_file()


def _fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
