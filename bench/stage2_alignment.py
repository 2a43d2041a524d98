"""Task-agnostic stage 2 on dev: the paper's sigma-mix against behaviour alignment, at equal steps.

    .venv/bin/python bench/stage2_alignment.py                        # everything not done yet, then the table
    .venv/bin/python bench/stage2_alignment.py --steps 200 --train-items 1600 --out runs/alignment
    .venv/bin/python bench/stage2_alignment.py --items 150 --rows self --candidate kl_600=<run>/checkpoints/step_600
    .venv/bin/python bench/stage2_alignment.py --split test --items 150 --no-train   # the report, once
    .venv/bin/python bench/stage2_alignment.py --report               # the table from what exists
    .venv/bin/python bench/stage2_alignment.py --features runs/features/tts_en_large --systems sigma_mix,kl \
        --decode shipped,sigma_mix,kl --rows self,zeroshot --items 150   # two systems from another stage 1's data

From the shipped stage-1 projector (``--stage1``), four stage-2 runs of ``speechmapper_adapt`` with the same
steps, batch and learning rate, each validated on dev:

* ``sigma_mix``: ``smollm2_135M/stage2_asr_ce_mse`` (Eq. 3, sigma 0.9, on ASR transcripts);
* ``self_ce``: ``smollm2_135M/stage2_self_ce`` (CE on the LLM's own answers to self-generated instructions);
* ``kl``: the same rows, ``loss.kl_ratio=1`` (KL from the LLM reading the transcript, temperature 2);
* ``kl_mse``: KL + the stage-1 MSE (``loss.sigma=0.9``, ``weighting=balanced``).

The instruction rows come first (``speechmapper_instructions``: ``instructions/self_train`` on the first
``--train-items`` training utterances, ``instructions/self_heldout`` on the first ``--items`` utterances of
``--split`` (dev, or test for the report), with the shuffled-transcript answers that give chance agreement).
Then one ``speechmapper_generate`` process (the LLM loads once) decodes, on the same utterances, for each
trained system, each ``--candidate NAME=CHECKPOINT`` (e.g. a longer run's later checkpoints), stage 1 alone,
the shipped task-agnostic projector (``--shipped``, the one to beat) and the Whisper-base cascade
(``--rows`` picks which of these decodes run):
the held-out instructions (the agreement metric), ASR with the paper's zero-shot prompt (WER; decoded as `make demo`
does, with a length cap from the audio duration), the first-word
probe (an instruction in neither pool) and English -> French ST (the target-language share; on ``--st-manifest``,
the demo corpus's sentences of the split, read by the same held-out voices: tts_en's have no reference
translations). ``--split test`` trains nothing (choices are made on dev).
``speechmapper_eval`` scores them; the table (``<out>/summary_<split>_<items>.md``) adds each run's wall time and
its dev curves (``<out>/<system>/metrics.jsonl``). Every phase resumes: rerun after a stop.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
TUNE = str(Path(sys.executable).with_name("tune"))
ROW_KINDS = ("self", "zeroshot", "probe", "st")
DEMO_DECODING = ["length_cap.tokens_per_second=4.0", "length_cap.extra=4"]  # as make demo: no runaway decode
PROBE = "What is the first word of the Speech content? Answer with that word only."
SYSTEMS = {  # name: (config, overrides)
    "sigma_mix": ("smollm2_135M/stage2_asr_ce_mse", []),
    "self_ce": ("smollm2_135M/stage2_self_ce", []),
    "kl": ("smollm2_135M/stage2_self_ce", ["loss.kl_ratio=1.0", "loss.kl_temperature=2.0"]),
    "kl_mse": (
        "smollm2_135M/stage2_self_ce",
        ["loss.kl_ratio=1.0", "loss.kl_temperature=2.0", "loss.sigma=0.9", "loss.weighting=balanced"],
    ),
}


def run(cmd: List[str], log: Path) -> float:
    """``tune run ...`` with its output in ``log``; wall seconds. A failure stops the bench, naming the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[alignment] {' '.join(cmd[:4])} ... (log {log})", flush=True)
    with open(log, "a") as f:
        code = subprocess.call([TUNE, "run", *cmd], stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if code:
        raise SystemExit(f"[alignment] failed ({code}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - t0


def _timings(out: Path) -> Dict[str, float]:
    path = out / "timings.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _add_timing(out: Path, key: str, seconds: float) -> None:
    t = _timings(out)
    t[key] = t.get(key, 0.0) + seconds
    tmp = out / "timings.json.tmp"
    tmp.write_text(json.dumps(t, indent=1))
    os.replace(tmp, out / "timings.json")


def _tag(args) -> str:
    return f"{args.split}_{args.items}"


def rows(args, out: Path) -> Dict[str, Path]:
    """Instruction rows: self-generated training answers, held-out ones on the split, the split's ST rows."""
    from speechmapper_tune.corpus import translations_file

    made = {"train": out / "rows" / "train", "held": out / "rows" / _tag(args), "st": out / "rows" / f"st_{args.split}"}
    jobs = {
        "train": [
            "speechmapper_instructions",
            "--config",
            "instructions/self_train",
            f"max_items={args.train_items}",
            f"manifest={args.features}/train/cuts.jsonl.gz",
            "answer.llm.dtype=fp32",
        ],
        "held": [
            "speechmapper_instructions",
            "--config",
            "instructions/self_heldout",
            f"max_items={args.items}",
            f"manifest={args.features}/{args.split}/cuts.jsonl.gz",
            "answer.llm.dtype=fp32",
        ],
        "st": [
            "speechmapper_instructions",
            "--config",
            "instructions/st",
            f"translations={translations_file('tts_en_fr')}",
            f"manifest={args.st_manifest}",
        ],
    }
    if args.split == "test":
        del jobs["train"], made["train"]  # nothing trains on a test run
    if "st" not in args.rows or not Path(args.st_manifest).is_file():
        if "st" in args.rows:
            print(f"[alignment] no {args.st_manifest} (make demo writes it): no ST row", flush=True)
        del jobs["st"], made["st"]
    for name, cmd in jobs.items():
        if not (made[name] / "instructions.jsonl").is_file():
            key = name if name == "train" else f"{name}_{_tag(args)}"
            _add_timing(out, f"rows_{key}", run([*cmd, f"output_dir={made[name]}"], out / "logs" / f"rows_{key}.log"))
    return made


def train(args, out: Path, made: Dict[str, Path]) -> None:
    if args.split != "dev" or not args.train:
        return
    for name in args.systems:
        config, overrides = SYSTEMS[name]
        folder = out / name
        if (folder / "checkpoints" / f"step_{args.steps}").is_dir():
            continue
        data = (
            [
                f"data.train.manifest={args.features}/train/cuts.jsonl.gz",
                f"data.val.manifest={args.features}/dev/cuts.jsonl.gz",
            ]
            if name == "sigma_mix"
            else [
                f"data.train.manifest={args.features}/train/cuts.jsonl.gz",
                f"data.train.instructions={made['train'] / 'instructions.jsonl'}",
                f"data.val.manifest={args.features}/dev/cuts.jsonl.gz",
                f"data.val.instructions={made['held'] / 'instructions.jsonl'}",
            ]
        )
        cmd = [
            "speechmapper_adapt",
            "--config",
            config,
            f"projector_checkpoint={args.stage1}",
            f"output_dir={folder}",
            "llm.dtype=fp32",
            f"max_steps={args.steps}",
            f"val_every_n_steps={args.val_every}",
            f"save_every_n_steps={args.val_every}",
            "keep_last_n_checkpoints=100",  # every validated checkpoint stays a --candidate
            f"data.val.max_items={args.items}",
            f"resume={(folder / 'checkpoints').is_dir()}",
            *data,
            *overrides,
        ]
        _add_timing(out, f"train_{name}", run(cmd, out / "logs" / f"train_{name}.log"))


def generate(args, out: Path, made: Dict[str, Path]) -> Dict[str, str]:
    """Every decode in one speechmapper_generate process; {row name: generations file}."""
    from omegaconf import OmegaConf

    from speechmapper_tune.configs import resolve_config
    from speechmapper_tune.models.speech_lm import ZERO_SHOT_PROMPT

    ckpts = {"stage1": args.stage1, "shipped": args.shipped, **_trained(args, out), **args.candidates}
    dev = f"manifest={args.features}/{args.split}/cuts.jsonl.gz"
    items = f"max_items={args.items}"
    jobs = {}
    for name, ckpt in [*ckpts.items(), ("cascade", args.stage1)]:
        if args.decode and name not in args.decode:
            continue
        source = ["span_source=asr"] if name == "cascade" else []
        common = [f"projector_checkpoint={ckpt}", dev, *source]
        jobs[f"{name}_self"] = [
            *common,
            "task=self",
            'prompt.instruction=""',
            "max_new_tokens=48",
            "batch_size=16",
            f"instructions={made['held'] / 'instructions.jsonl'}",
        ]
        jobs[f"{name}_zeroshot"] = [
            *common,
            items,
            "stop_at_newline=True",
            *DEMO_DECODING,
        ]  # + the zero-shot prompt, below
        jobs[f"{name}_probe"] = [
            *common,
            items,
            f"prompt.instruction={PROBE}",
            "max_new_tokens=8",
            "stop_at_newline=True",
        ]
        if "st" not in made:
            continue
        jobs[f"{name}_st"] = [
            *common,
            f"manifest={args.st_manifest}",  # replaces dev's: the sentences with reference translations
            items,
            "task=st",
            'prompt.instruction=""',
            "max_new_tokens=64",
            "stop_at_newline=True",
            f"instructions={made['st'] / 'instructions.jsonl'}",
        ]
    jobs = {row: o for row, o in jobs.items() if row.rsplit("_", 1)[1] in args.rows}
    base = OmegaConf.load(resolve_config("smollm2_135M/generate"))
    configs, gens = [], {}
    for row, overrides in jobs.items():
        folder = out / "generations" / _tag(args) / row
        gens[row] = str(folder / "generations.jsonl")
        cfg = OmegaConf.merge(base, OmegaConf.from_dotlist([*overrides, f"output_dir={folder}", "llm.dtype=fp32"]))
        if row.endswith("_zeroshot"):  # the paper's zero-shot prompt (table 11) for every system, not its own
            cfg.prompt = dict(ZERO_SHOT_PROMPT)
        configs.append(cfg)
    plan = out / "generations" / _tag(args) / "plan.yaml"
    plan.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create({"runs": configs}), plan)
    log = out / "logs" / f"generate_{_tag(args)}.log"
    _add_timing(out, f"generate_{_tag(args)}", run(["speechmapper_generate", "--config", str(plan)], log))
    return gens


def _trained(args, out: Path) -> Dict[str, str]:
    """The trained systems' last checkpoints; none on a test run (choices are made on dev: name the chosen ones
    with ``--candidate``)."""
    if args.split != "dev":
        return {}
    ckpts = {n: out / n / "checkpoints" / f"step_{args.steps}" for n in args.systems}
    return {n: str(c) for n, c in ckpts.items() if args.train or c.is_dir()}


def evaluate(args, out: Path, gens: Dict[str, str]) -> None:
    scored = {k: v for k, v in gens.items() if not k.endswith("_probe")}
    spec = "{" + ", ".join(f"{k}: {v}" for k, v in scored.items()) + "}"
    _add_timing(
        out,
        f"eval_{_tag(args)}",
        run(
            [
                "speechmapper_eval",
                "--config",
                "eval/default",
                f"output_dir={out / 'eval' / _tag(args)}",
                f"generations={spec}",
            ],
            out / "logs" / f"eval_{_tag(args)}.log",
        ),
    )


def report(args, out: Path) -> str:
    from speechmapper_tune.demo import _probe

    results_file = out / "eval" / _tag(args) / "results.json"
    res = {r["name"]: r for r in json.loads(results_file.read_text())} if results_file.is_file() else {}
    timings = _timings(out)
    lines = [
        f"{args.split.capitalize()}, {args.items} utterances (held-out voices); every system from `{args.stage1}`, "
        f"{args.steps} steps (candidates: their own), batch 8, LR 5e-4, SmolLM2-135M-Instruct frozen, fp32.",
        "",
        "| system | steps | wall min | val CE first -> last | val KL first -> last | zero-shot WER (stuck) "
        "| agreement chrF / exact % (chance) | first word % (baseline) | ST fr share % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ["stage1", "shipped", *_trained(args, out), *args.candidates, "cascade"]:
        m = out / name / "metrics.jsonl"
        ce = kl = "-"
        steps = {"stage1": "0", "cascade": "0", "shipped": "(shipped)"}.get(name, "-")
        if name in args.candidates:
            steps = Path(args.candidates[name]).name.removeprefix("step_")
        if m.is_file():
            val = [json.loads(l) for l in m.read_text().splitlines() if '"val_' in l]
            if val:
                steps = str(max(v["step"] for v in val))
                ce = f"{val[0].get('val_ce', float('nan')):.2f} -> {val[-1].get('val_ce', float('nan')):.2f}"
                if "val_kl" in val[0]:
                    kl = f"{val[0]['val_kl']:.2f} -> {val[-1]['val_kl']:.2f}"
        wall = timings.get(f"train_{name}")
        z, s, st = res.get(f"{name}_zeroshot", {}), res.get(f"{name}_self", {}), res.get(f"{name}_st", {})
        wer = f"{z['wer']:.1f} ({z.get('stuck', 0)})" if "wer" in z else "-"
        agree = (
            f"{s['agreement_chrf']:.1f} / {s['agreement_exact']:.1f} ({s.get('chance_chrf', float('nan')):.1f} / "
            f"{s.get('chance_exact', float('nan')):.1f})"
            if "agreement_chrf" in s
            else "-"
        )
        probe_file = out / "generations" / _tag(args) / f"{name}_probe" / "generations.jsonl"
        probe = "-"
        if probe_file.is_file():
            p = _probe(probe_file)
            probe = f"{p['first_word_accuracy']:.0f} ({p['majority_baseline']:.0f})"
        share = (st.get("by_language") or {}).get("fr", {}).get("target_share")
        lines.append(
            f"| {name} | {steps} | {'-' if wall is None else f'{wall / 60:.0f}'} | {ce} | {kl} | {wer} | {agree} | "
            f"{probe} | {'-' if share is None else f'{share:.0f}'} |"
        )
    rows_t = ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items() if not k.startswith("train_"))
    lines += ["", f"Other phases: {rows_t or '-'}."]
    text = "\n".join(lines) + "\n"
    (out / f"summary_{_tag(args)}.md").write_text(text)
    plot_curves(out)
    return text


def plot_curves(out: Path) -> None:
    """``<out>/curves.png``: each run's dev validation (CE, KL, MSE) against steps, every run folder in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("val_ce", "val_kl", "val_mse")
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6))
    runs = [
        *SYSTEMS,
        *sorted(p.name for p in out.iterdir() if p.name not in SYSTEMS and (p / "metrics.jsonl").is_file()),
    ]
    for name in runs:  # the compared systems, then any other run in <out> (e.g. one continued for longer)
        m = out / name / "metrics.jsonl"
        if not m.is_file():
            continue
        val = [json.loads(line) for line in m.read_text().splitlines() if '"val_' in line]
        for ax, key in zip(axes, keys):
            pts = [(v["step"], v[key]) for v in val if key in v]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
    for ax, key in zip(axes, keys):
        ax.set_title(f"dev {key[4:].upper()}")
        ax.set_yscale("log" if key == "val_mse" else "linear")  # CE alone lets the MSE grow 400x
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/alignment")
    parser.add_argument("--stage1", default="smollm2_135m_whisper_base_stage1")
    parser.add_argument("--shipped", default="smollm2_135m_whisper_base_stage2", help="the task-agnostic one shipped")
    parser.add_argument(
        "--features", default="runs/features/whisper_base_trimmed", help="features folder with train/ and the split's"
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"stage-2 runs to train, of {','.join(SYSTEMS)}")
    parser.add_argument(
        "--decode", default="", help="decode only these systems (e.g. shipped,kl,kl_200); default every one"
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--val-every", type=int, default=50)
    parser.add_argument("--train-items", type=int, default=1600)
    parser.add_argument("--split", choices=("dev", "test"), default="dev", help="test: for the report, once")
    parser.add_argument("--items", type=int, default=50, help="the split's first N utterances")
    parser.add_argument("--rows", default=",".join(ROW_KINDS), help=f"decodes to run, of {','.join(ROW_KINDS)}")
    parser.add_argument(
        "--candidate", action="append", default=[], metavar="NAME=CHECKPOINT", help="another checkpoint (repeatable)"
    )
    parser.add_argument("--no-train", dest="train", action="store_false", help="decode what exists, train nothing")
    parser.add_argument(
        "--st-manifest",
        default=None,
        help="ST source: features of sentences with reference translations (tts_en_fr: the demo corpus's; "
        "default demo_out/features/<split>/cuts.jsonl.gz)",
    )
    parser.add_argument("--report", action="store_true", help="only the table, from what exists")
    args = parser.parse_args()
    out = (REPO / args.out).resolve()
    args.st_manifest = str((REPO / (args.st_manifest or f"demo_out/features/{args.split}/cuts.jsonl.gz")).resolve())
    args.rows = [r for r in args.rows.split(",") if r]
    if set(args.rows) - set(ROW_KINDS):
        parser.error(f"--rows: unknown {sorted(set(args.rows) - set(ROW_KINDS))}; choose from {ROW_KINDS}")
    args.systems = [n for n in args.systems.split(",") if n]
    if set(args.systems) - set(SYSTEMS):
        parser.error(f"--systems: unknown {sorted(set(args.systems) - set(SYSTEMS))}; choose from {tuple(SYSTEMS)}")
    args.decode = {n for n in args.decode.split(",") if n}
    args.candidates = {}
    for spec in args.candidate:
        name, sep, ckpt = spec.partition("=")
        if not sep or not name or name in ("stage1", "shipped", "cascade", *SYSTEMS):
            parser.error(f"--candidate {spec!r}: NAME=CHECKPOINT with a new name")
        if not Path(ckpt).is_dir():
            parser.error(f"--candidate {spec!r}: no checkpoint folder {ckpt}")
        args.candidates[name] = str(Path(ckpt).resolve())
    out.mkdir(parents=True, exist_ok=True)
    if not args.report:
        made = rows(args, out)
        train(args, out, made)
        evaluate(args, out, generate(args, out, made))
    print(report(args, out))


if __name__ == "__main__":
    main()
