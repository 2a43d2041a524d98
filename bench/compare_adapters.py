"""SpeechMapper against its siblings on the embedded default: same data, same steps, same held-out voices.

    .venv/bin/python bench/compare_adapters.py [--steps 500] [--device cpu] [--out runs/compare] [--sa-labels FILE]

Systems (every one a real ``tune run speechmapper_adapt``, CE only (sigma 0), batch 8, constant LR 5e-4,
the same prompt, the same Whisper-base features of the TTS corpus; validation on the dev voices):

- ``speechmapper``: the shipped stage-1 projector (``smollm2_135m_whisper_base_stage1``) + stage 2, frozen LLM;
- ``sparqle``: the query adapter from scratch, frozen LLM (``smollm2_135M/stage2_sparqle``);
- ``speechllm``: the light adapter from scratch + LoRA + the classifier regularizer (``stage2_speechllm``);
- ``speechllm_noreg``: the same without the regularizer (``loss.regularizer_weight=0``).

Then greedy ASR on the test voices (scored once, for the report) with ``smollm2_135M/generate``
(no answer prefix, as trained; newline stop; length cap 4 tokens/s + 4) and ``speechmapper_eval``.
With ``--sa-labels`` (sentiment rows for the test features, from ``speechmapper_annotate --config
smollm2_135M/annotate_sa``: SmolLM2's labels of the transcripts, SLUE's three classes), each system also
answers the sentiment instruction, unseen in its training, and gets SLUE's macro F1 against those labels.
Prints a markdown table: trainable parameters (projector + LoRA), seconds per step (training command wall
time / steps trained by this call: setup and validation included), dev CE first -> last validation, test
WER / CER (and SA F1). Every run resumes (``resume=True``), so a stopped comparison continues where it was,
and a larger ``--steps`` trains on from the last checkpoint (the LR is constant: the same as one longer run).
Needs the corpus and the trimmed-window features (``smollm2_135M/stage1_full``'s comment has the commands).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from safetensors import safe_open

FEATURES = "runs/features/whisper_base_trimmed"
STAGE1 = "smollm2_135m_whisper_base_stage1"
SYSTEMS = {
    "speechmapper": ["--config", "smollm2_135M/stage2_asr_ce_mse", "loss.sigma=0.0", "loss.weighting=paper"],
    "sparqle": ["--config", "smollm2_135M/stage2_sparqle"],
    "speechllm": ["--config", "smollm2_135M/stage2_speechllm"],
    "speechllm_noreg": ["--config", "smollm2_135M/stage2_speechllm", "loss.regularizer_weight=0"],
}


def tune(args, log: Path) -> float:
    tune_bin = str(Path(sys.executable).parent / "tune")
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(
            [tune_bin, "run", *args], stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_MININTERVAL": "30"}
        )
    if proc.returncode != 0:
        raise SystemExit(f"tune run {' '.join(args[:3])} failed (exit {proc.returncode}): see {log}")
    return time.perf_counter() - t


def trainable_parameters(ckpt: Path) -> int:
    n = 0
    for name in ("projector.safetensors", "lora_adapters.safetensors"):
        if (ckpt / name).is_file():
            with safe_open(str(ckpt / name), "pt") as f:
                n += sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    return n


def _step(run: Path) -> int:
    """The step of a run's latest checkpoint (0: none yet)."""
    pointer = run / "checkpoints" / "latest"
    return int(pointer.read_text().strip()[5:]) if pointer.is_file() else 0


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {list(SYSTEMS)}")
    ap.add_argument(
        "--sa-labels", default=None, help="sentiment instruction rows for the test features (speechmapper_annotate)"
    )
    a = ap.parse_args()
    from speechmapper_tune import pretrained

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stage1 = pretrained.shipped_projector(STAGE1)
    rows = []
    for name in a.systems.split(","):
        run = out / name
        run.mkdir(exist_ok=True)
        args = [
            "speechmapper_adapt",
            *SYSTEMS[name],
            f"output_dir={run}",
            f"device={a.device}",
            f"max_steps={a.steps}",
            f"val_every_n_steps={a.steps}",
            f"save_every_n_steps={a.steps}",
            "validate_at_start=True",
            "resume=True",
            f"data.train.manifest={FEATURES}/train/cuts.jsonl.gz",
            f"data.val.manifest={FEATURES}/dev/cuts.jsonl.gz",
        ]
        if name == "speechmapper":
            args.append(f"projector_checkpoint={stage1}")
        start = _step(run)
        wall = tune(args, run / "train.log")
        ckpt = run / "checkpoints" / f"step_{a.steps}"
        val = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"val_ce"' in l]
        gen = run / f"test_generation_step{a.steps}"
        common = [
            f"projector_checkpoint={ckpt}",
            f"manifest={FEATURES}/test/cuts.jsonl.gz",
            f"device={a.device}",
            'prompt.assistant_prefix=""',
            "stop_at_newline=True",
        ]
        tune(
            [
                "speechmapper_generate",
                "--config",
                "smollm2_135M/generate",
                *common,
                f"output_dir={gen}",
                "length_cap.tokens_per_second=4.0",
                "length_cap.extra=4",
            ],
            run / "generate.log",
        )
        gens = {name: gen / "generations.jsonl"}
        if a.sa_labels:
            tune(
                [
                    "speechmapper_generate",
                    "--config",
                    "smollm2_135M/generate",
                    *common,
                    f"output_dir={gen}_sa",
                    f"instructions={a.sa_labels}",
                    "task=sa",
                    "max_new_tokens=4",
                ],
                run / "generate_sa.log",
            )
            gens[f"{name}_sa"] = Path(f"{gen}_sa") / "generations.jsonl"
        tune(
            [
                "speechmapper_eval",
                "--config",
                "eval/default",
                f"output_dir={gen}/eval",
                "generations={" + ", ".join(f"{k}: {v}" for k, v in gens.items()) + "}",
            ],
            run / "eval.log",
        )
        scores = {r["task"]: r for r in json.loads((gen / "eval" / "results.json").read_text())}
        score = scores["asr"]
        rows.append(
            {
                "system": name,
                "trainable": trainable_parameters(ckpt),
                "s_per_step": wall / (a.steps - start) if a.steps > start else None,
                "steps": a.steps,
                "val_ce": (val[0]["val_ce"], val[-1]["val_ce"]),
                "wer": score["wer"],
                "cer": score.get("cer"),
                "n": score["n"],
                "sa_f1": scores.get("sa", {}).get("f1"),
                "sa_n": scores.get("sa", {}).get("n"),
            }
        )
        (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{a.steps} steps each, batch 8, device {a.device}\n")
    print(
        "| system | trainable params | s/step | dev CE (step 0 -> last) | test WER | test CER | n | test SA macro F1 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        step_s = "-" if r["s_per_step"] is None else f"{r['s_per_step']:.2f}"
        sa = "-" if r["sa_f1"] is None else f"{r['sa_f1']:.1f} ({r['sa_n']})"
        print(
            f"| {r['system']} | {r['trainable'] / 1e6:.2f}M | {step_s} | {r['val_ce'][0]:.2f} -> "
            f"{r['val_ce'][1]:.2f} | {r['wer']:.1f} | {r['cer']:.1f} | {r['n']} | {sa} |"
        )


if __name__ == "__main__":
    main()
