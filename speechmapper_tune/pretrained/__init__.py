"""Projectors shipped inside the package, and the tool that exports them from a training run.

A shipped projector is an ordinary checkpoint folder (``checkpoint/projector_io.py``) without
recipe state, its weights stored in fp16 to keep the wheel small, plus the provenance a user
needs to reproduce it:

    speechmapper_tune/pretrained/<name>/
        projector.safetensors   fp16 weights (loaded back in fp32)
        projector_config.json   the projector and LLM description the recipes check
        metrics.jsonl           the training curve of the run that produced it
        PROVENANCE.md           the exact commands and data settings, and what it was measured to do
                                (in one line, ``shipped.summary`` of the config: what ``speechmapper list`` says)
        lora_adapters.safetensors   fp16 LoRA adapters, only when stage 2 trained them

Use one anywhere a checkpoint folder is expected::

    tune run speechmapper_generate --config smollm2_135M/generate \\
        projector_checkpoint=$(python -m speechmapper_tune.pretrained path smollm2_135m_whisper_base_stage2)

Export one from a finished run (what produced the shipped ones)::

    python -m speechmapper_tune.pretrained export runs/.../checkpoints/step_N NAME --provenance notes.md \\
        --summary "what it does and does not do, measured"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path
from typing import List, Optional

import torch
from safetensors.torch import load_file, save_file

from speechmapper_tune.checkpoint.projector_io import CONFIG, LORA_WEIGHTS, WEIGHTS, load_projector, lora_weights_file, save_projector

ROOT = Path(__file__).resolve().parent
PROVENANCE = "PROVENANCE.md"
METRICS = "metrics.jsonl"


def available() -> List[str]:
    """Names of the projectors shipped with this installation."""
    return sorted(p.name for p in ROOT.iterdir() if (p / CONFIG).is_file() and (p / WEIGHTS).is_file())


def shipped_projector(name: str) -> str:
    """Folder of the shipped projector ``name`` (usable as ``projector_checkpoint``)."""
    folder = ROOT / name
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"no shipped projector named {name!r}; available: {available() or 'none'}")
    return str(folder)


def export_projector(checkpoint: str | Path, name: str, provenance: Optional[str | Path] = None,
                     metrics: Optional[str | Path] = None, root: Path = ROOT, summary: Optional[str] = None) -> Path:
    """Write checkpoint ``checkpoint`` as shipped projector ``name`` (fp16, no recipe state), atomically.
    ``summary``: one line on what it does and does not do, measured (``speechmapper list`` prints it)."""
    checkpoint = Path(checkpoint)
    model, meta = load_projector(checkpoint)
    meta = {k: v for k, v in meta.items() if k != "projector"}
    meta["shipped"] = {"from": str(checkpoint), "dtype": "fp16", **({"summary": summary} if summary else {})}
    metrics = Path(metrics) if metrics else _run_metrics(checkpoint)
    final, tmp, old = root / name, root / f".{name}.tmp", root / f".{name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    lora = lora_weights_file(checkpoint) if meta.get("lora") else None
    save_projector(tmp, model, meta, dtype=torch.float16)
    if lora is not None:  # the adapters belong with the projector: generation loads both
        adapters = load_file(str(lora))
        save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in adapters.items()},
                  str(tmp / LORA_WEIGHTS), metadata={"format": "pt"})
    if metrics is not None and metrics.is_file():
        shutil.copyfile(metrics, tmp / METRICS)
    if provenance is not None:
        shutil.copyfile(provenance, tmp / PROVENANCE)
    # folder swap: a killed export leaves the previous shipped folder (or its .old copy) intact
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _run_metrics(checkpoint: Path) -> Optional[Path]:
    """``<output_dir>/metrics.jsonl`` of the run a ``<output_dir>/checkpoints/step_N`` folder belongs to."""
    candidate = checkpoint.parent.parent / METRICS
    return candidate if candidate.is_file() else None


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m speechmapper_tune.pretrained", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the shipped projectors")
    p = sub.add_parser("path", help="print the folder of a shipped projector")
    p.add_argument("name")
    e = sub.add_parser("export", help="ship a training checkpoint as fp16 weights + config + provenance")
    e.add_argument("checkpoint", help="a checkpoint folder, e.g. runs/x/checkpoints/step_N")
    e.add_argument("name", help="the shipped name (a folder under speechmapper_tune/pretrained/)")
    e.add_argument("--provenance", help="a Markdown file: commands and data settings that produced it")
    e.add_argument("--metrics", help="metrics.jsonl to ship (default: the run's own)")
    e.add_argument("--summary", help="one line: what it does and does not do, measured (speechmapper list)")
    a = ap.parse_args(argv)
    if a.cmd == "list":
        for n in available():
            print(n, json.loads((ROOT / n / CONFIG).read_text()).get("step"))
    elif a.cmd == "path":
        print(shipped_projector(a.name))
    else:
        print(export_projector(a.checkpoint, a.name, a.provenance, a.metrics, summary=a.summary))


if __name__ == "__main__":
    main()
