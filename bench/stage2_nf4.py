"""Stage 2 with the frozen LLM in bf16 against NF4 (``llm.quantize=nf4``): the validation CE over the same steps.

    .venv/bin/python bench/stage2_nf4.py [--steps 100] [--device cpu] [--out runs/nf4]

Two real ``tune run speechmapper_adapt`` runs of ``smollm2_135M/stage2_asr_ce_mse`` (sigma 0.9, the task-agnostic
setting) from the shipped stage-1 projector, identical but for ``llm.quantize``: same seed, same batches,
same Whisper-base features of the TTS corpus, validation on the dev voices at step 0 and at the end.
Prints a markdown table: seconds per step (training command wall time / steps, setup and validation
included), dev CE and MSE first -> last. Every run resumes (``resume=True``).
Needs the corpus and the trimmed-window features (``smollm2_135M/stage1_full``'s comment has the commands).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from compare_adapters import FEATURES, STAGE1, tune  # the sibling bench: same features, same runner

VARIANTS = {"bf16": [], "nf4": ["llm.quantize=nf4"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="runs/nf4")
    a = ap.parse_args()
    from speechmapper_tune import pretrained

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, extra in VARIANTS.items():
        run = out / name
        run.mkdir(exist_ok=True)
        wall = tune(
            [
                "speechmapper_adapt",
                "--config",
                "smollm2_135M/stage2_asr_ce_mse",
                *extra,
                f"output_dir={run}",
                f"device={a.device}",
                f"max_steps={a.steps}",
                f"val_every_n_steps={a.steps}",
                f"save_every_n_steps={a.steps}",
                "validate_at_start=True",
                "resume=True",
                f"projector_checkpoint={pretrained.shipped_projector(STAGE1)}",
                f"data.train.manifest={FEATURES}/train/cuts.jsonl.gz",
                f"data.val.manifest={FEATURES}/dev/cuts.jsonl.gz",
            ],
            run / "train.log",
        )
        val = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"val_ce"' in l]
        rows.append(
            {
                "llm": name,
                "s_per_step": wall / a.steps,
                "val_ce": (val[0]["val_ce"], val[-1]["val_ce"]),
                "val_mse": (val[0]["val_mse"], val[-1]["val_mse"]),
            }
        )
        (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{a.steps} steps each, smollm2_135M/stage2_asr_ce_mse, device {a.device}\n")
    print("| frozen LLM | s/step | dev CE (step 0 -> last) | dev MSE (step 0 -> last) |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['llm']} | {r['s_per_step']:.2f} | {r['val_ce'][0]:.3f} -> {r['val_ce'][1]:.3f} | "
            f"{r['val_mse'][0]:.4f} -> {r['val_mse'][1]:.4f} |"
        )


if __name__ == "__main__":
    main()
