"""`speechmapper`: a trained projector on your own audio, and the recipes to train your own.

    speechmapper transcribe talk.flac interview.mp3          # text, one line per file
    speechmapper transcribe recordings/ --format jsonl       # a folder: the audio files directly in it
    cat talk.wav | speechmapper transcribe -                 # audio from stdin
    speechmapper ask --instruction "Who is speaking?" talk.wav
    speechmapper list                                         # shipped projectors and what each is for
    speechmapper ls                                           # the recipes and packaged configs
    speechmapper cp speechmapper_adapt my_adapt.py            # then, in that folder: tune run my_adapt.py --config ...
    speechmapper cp smollm2_135M/stage2_asr_full ./my.yaml

Audio: any file soundfile reads (WAV, FLAC, OGG, MP3), any sample rate or channel count, any
length. A voice-activity detector (Silero VAD) finds the speech; long recordings are cut at its
pauses and the texts joined; audio without speech gives an empty text and a one-line notice.
Every input is read and checked before the model loads: a file that cannot be read gets a
one-line error naming it, the others are still transcribed, and the exit status is 1.
Details: docs/transcribe.md.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

DEFAULT_TRANSCRIBE = "smollm2_135m_whisper_base_stage2_asr_lora"  # the best shipped ASR projector
DEFAULT_ASK = "smollm2_135m_whisper_base_stage2"  # the task-agnostic one (behaviour alignment), for other instructions
RECIPES = (
    "speechmapper_corpus",
    "speechmapper_extract",
    "speechmapper_pretrain",
    "speechmapper_adapt",
    "speechmapper_generate",
    "speechmapper_eval",
    "speechmapper_eet",
    "speechmapper_annotate",
    "speechmapper_instructions",
)
DEVICE_NAME = re.compile(r"^(cpu|cuda|mps|xpu)(:\d+)?$")


def _error(message: str) -> None:
    print(f"speechmapper: error: {message}", file=sys.stderr)


def _notice(message: str) -> None:
    print(f"speechmapper: {message}", file=sys.stderr)


def describe(meta: dict) -> str:
    """What a projector is for, from what its checkpoint records; a shipped one adds what it was measured to do."""
    llm = meta.get("llm", {}).get("name", "?")
    feats = (meta.get("features") or {}).get("feature_type", "?")
    if meta.get("stage") == 1:
        use = "stage 1 only: read zero-shot by the LLM (paper's repeat prompt); a start for stage 2"
    else:
        sigma, kl = meta.get("sigma"), meta.get("kl_ratio") or 0.0
        if kl:
            use = f"task-agnostic by behaviour alignment (KL to the LLM reading the transcript, ratio {kl:g}"
            use += f", sigma {sigma:g})" if sigma else ")"
        else:
            use = "ASR specialist (sigma 0)" if sigma == 0 else f"trained task-agnostic (sigma {sigma})"
        if meta.get("lora"):
            use += f", LoRA r{meta['lora']['rank']} on the LLM"
    text = f"{use}; {llm}, {feats} features, step {meta.get('step')}"
    summary = (meta.get("shipped") or {}).get("summary")
    return f"{text}\n    {summary}" if summary else text


def cmd_list(_args) -> int:
    from speechmapper_tune import pretrained
    from speechmapper_tune.checkpoint.projector_io import read_projector_meta

    for name in pretrained.available():
        mark = (
            " (transcribe default)" if name == DEFAULT_TRANSCRIBE else " (ask default)" if name == DEFAULT_ASK else ""
        )
        print(f"{name}{mark}\n    {describe(read_projector_meta(pretrained.shipped_projector(name)))}")
    return 0


def recipe_summary(name: str) -> str:
    """The first line of a recipe's module docstring, read without importing it (recipes import torch)."""
    spec = importlib.util.find_spec(name)
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) if spec and spec.origin else None
    return (doc or "").strip().splitlines()[0] if doc else ""


def config_recipe(config: str) -> str:
    """The recipe a packaged config is for, from its folder or name (as each config's header says)."""
    folder, _, base = config.rpartition("/")
    for prefix, recipe in (
        ("corpus", "corpus"),
        ("features", "extract"),
        ("eval", "eval"),
        ("instructions", "instructions"),
    ):
        if folder == prefix:
            return f"speechmapper_{recipe}"
    for prefix, recipe in (
        ("stage1", "pretrain"),
        ("stage2", "adapt"),
        ("generate", "generate"),
        ("eet", "eet"),
        ("annotate", "annotate"),
    ):
        if base.startswith(prefix):
            return f"speechmapper_{recipe}"
    return ""


def cmd_ls(_args) -> int:
    """Each recipe, what it does and its packaged configs, as `tune ls` lists torchtune's own."""
    import textwrap

    from speechmapper_tune.configs import available_configs

    configs = available_configs()
    by_recipe = {name: [c for c in configs if config_recipe(c) == name] for name in RECIPES}
    others = [c for c in configs if not config_recipe(c)]
    for name in RECIPES:
        print(f"{name:<27} {recipe_summary(name)}")
        print(
            textwrap.fill(
                "  ".join(by_recipe[name]) or "(no packaged config)",
                110,
                initial_indent="    ",
                subsequent_indent="    ",
                break_on_hyphens=False,
            )
        )
    if others:
        print(
            "other configs\n" + textwrap.fill("  ".join(others), 110, initial_indent="    ", subsequent_indent="    ")
        )
    print(
        "\nrun:  tune run RECIPE --config CONFIG [key=value ...]      copy to edit:  speechmapper cp RECIPE|CONFIG DEST"
    )
    return 0


def cmd_cp(args) -> int:
    """Copy a recipe (a top-level module) or a packaged config to DEST, as `tune cp` does."""
    from speechmapper_tune.configs import available_configs, resolve_config

    if args.name.removesuffix(".py") in RECIPES:
        spec = importlib.util.find_spec(args.name.removesuffix(".py"))
        source = Path(spec.origin)
        suffix = ".py"
    elif args.name.removesuffix(".yaml") in available_configs():
        source, suffix = resolve_config(args.name.removesuffix(".yaml")), ".yaml"
    else:
        _error(
            f"{args.name!r} is neither a recipe ({', '.join(RECIPES)}) nor a packaged config "
            "(`speechmapper ls` lists them)"
        )
        return 2
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / (source.name if suffix == ".py" else Path(args.name.removesuffix(".yaml")).name + ".yaml")
    if dest.exists() and not args.force:
        _error(f"{dest} exists; pass --force to overwrite it")
        return 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    print(f"Copied {source} to {dest}")
    return 0


# ---------------------------------------------------------------------- inputs, read before the model loads
@dataclass
class Input:
    """One input as the user named it (a folder gives one per audio file in it) and what became of it."""

    name: str
    wave: object = None  # float32 mono 16 kHz, once read
    error: Optional[str] = None
    segments: List[Tuple[int, int]] = field(default_factory=list)
    text: Optional[str] = None


def read_inputs(names: List[str], stdin=None) -> List[Input]:
    """Every input read and checked (files, folders, ``-`` for stdin): errors recorded, not raised."""
    from speechmapper_tune.audio import AudioError, audio_files_in, read_audio, read_audio_bytes

    out: List[Input] = []
    for name in names:
        path = Path(name)
        if name == "-":
            if any(i.name == "-" for i in out):
                out.append(Input(name, error="-: stdin can be read once only"))
                continue
            stream = stdin if stdin is not None else sys.stdin.buffer
            try:
                out.append(Input(name, read_audio_bytes(stream.read(), "-")))
            except AudioError as e:
                out.append(Input(name, error=str(e)))
            continue
        if path.is_dir():
            files = audio_files_in(path)
            if not files:
                out.append(
                    Input(
                        name,
                        error=f"{name}: a folder without audio files (a folder means the audio files "
                        "directly in it: .wav, .flac, .ogg, .mp3, ...)",
                    )
                )
            names_in = [str(f) for f in files]
        else:
            names_in = [name]
        for f in names_in:
            try:
                out.append(
                    Input(f, read_audio(f, on_warning=lambda m: print(f"speechmapper: warning: {m}", file=sys.stderr)))
                )
            except AudioError as e:
                out.append(Input(f, error=str(e)))
            except OSError as e:  # a file we may not read (permissions) is a user's error too
                out.append(Input(f, error=f"{f}: cannot be read ({e.strerror or e})"))
    return out


# ---------------------------------------------------------------------- the model, checked before it loads
class SetupError(Exception):
    """A setting that cannot work (device, projector); the message says which and why."""


def check_device(name: str) -> None:
    """``name`` is a device torch has here: ``cuda`` on a CPU-only torch is named as such."""
    import torch

    kind, _, index = name.partition(":")
    if kind == "cpu":
        return
    backend = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None), "xpu": getattr(torch, "xpu", None)}[
        kind
    ]
    if backend is None or not backend.is_available():
        why = (
            "this torch is a CPU-only build"
            if kind == "cuda" and torch.version.cuda is None
            else f"torch {torch.__version__} sees no {kind} device here"
        )
        raise SetupError(f"--device {name}: {why}; use --device cpu")
    if index and kind in ("cuda", "xpu") and int(index) >= backend.device_count():
        raise SetupError(
            f"--device {name}: there are {backend.device_count()} {kind} device(s) (0..{backend.device_count() - 1})"
        )


def check_projector(name: str) -> None:
    """The projector exists and records how its input features are made (speech encoder, layer, averaging)."""
    from speechmapper_tune.checkpoint.projector_io import read_projector_meta
    from speechmapper_tune.models.speech_lm import resolve_projector

    try:
        folder = resolve_projector(name)
        meta = read_projector_meta(folder)
    except (FileNotFoundError, ValueError) as e:
        raise SetupError(str(e)) from e
    if not isinstance(meta.get("features"), dict) or not meta["features"].get("sfm"):
        raise SetupError(
            f"{folder}: this projector checkpoint does not record how its input features were made "
            "(speech encoder, layer, frame averaging), so audio cannot be turned into them. Use a "
            "checkpoint trained on features from speechmapper_extract (they record it), or extract "
            "features with the same settings and run speechmapper_generate"
        )


def _load(args, default: str):
    import torch

    from speechmapper_tune.models.speech_lm import SpeechLM

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = {"dtype": args.dtype, **({"checkpoint": args.llm} if args.llm else {})}
    return SpeechLM.from_checkpoint(
        args.projector or default,
        llm=llm,
        device=args.device,
        on_warning=lambda m: print(f"speechmapper: warning: {m}", file=sys.stderr),
    )


def cmd_run(args, instruction: Optional[str]) -> int:
    from speechmapper_tune.audio import segment_recording

    inputs = read_inputs(args.files)
    for i in inputs:
        if i.error:
            _error(i.error)  # each bad input named once, as soon as it is known
        else:
            i.segments = segment_recording(i.wave, args.max_segment_seconds, vad=args.vad == "on")
            if not i.segments:
                i.text = ""
                _notice(
                    f"{i.name}: no speech found ({'Silero VAD' if args.vad == 'on' else 'silent or under 0.3 s'}); "
                    "its text is empty"
                )
    todo = [i for i in inputs if i.segments]
    if todo:
        default = DEFAULT_ASK if instruction is not None else DEFAULT_TRANSCRIBE
        try:
            check_device(args.device)
            check_projector(args.projector or default)
            lm = _load(args, default)
        except (SetupError, FileNotFoundError, ValueError) as e:
            _error(str(e))
            return 2
        from tqdm import tqdm

        flat = [i.wave[a:b] for i in todo for a, b in i.segments]
        bar = tqdm(desc="speechmapper", unit="segment", total=len(flat), disable=args.quiet, file=sys.stderr, delay=0.5)
        texts = lm.answer_waves(
            flat, instruction, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, on_batch=bar.update
        )
        bar.close()
        k = 0
        for i in todo:
            i.text = " ".join(t for t in texts[k : k + len(i.segments)] if t)
            k += len(i.segments)
    several = len(inputs) > 1
    for i in inputs:
        if args.format == "jsonl":
            read = i.wave is not None
            row = {
                "file": i.name,
                "text": i.text,
                "seconds": round(i.wave.size / 16000, 3) if read else None,
                "speech_seconds": round(sum(b - a for a, b in i.segments) / 16000, 3) if read else None,
                "segments": len(i.segments) if read else None,
                "error": i.error,
            }
            print(
                json.dumps(
                    {**row, **({"instruction": instruction} if instruction is not None else {})}, ensure_ascii=False
                )
            )
        elif i.error is None:
            print(f"{i.name}\t{i.text}" if several else i.text)
    return 1 if any(i.error for i in inputs) else 0


def _device_name(name: str) -> str:
    """argparse's check of --device's spelling (whether torch has it is checked before the model loads)."""
    if not DEVICE_NAME.match(name):
        raise argparse.ArgumentTypeError(f"{name!r} is not a device name: use cpu, cuda, cuda:N or mps")
    return name


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="speechmapper", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    def audio_command(name: str, help_: str, default: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument(
            "files",
            nargs="+",
            help="audio files (wav, flac, ogg, mp3; any rate, channels, length), folders "
            "(the audio files directly in them) or - (audio on stdin)",
        )
        p.add_argument("--projector", help=f"a shipped projector name or a checkpoint folder (default {default})")
        p.add_argument(
            "--llm", help="the LLM's local folder (default: as the projector records; SmolLM2 is found offline)"
        )
        p.add_argument(
            "--format",
            choices=("text", "jsonl"),
            default="text",
            help="text: one line per file (FILE<TAB>TEXT when several); jsonl: one JSON object per input, "
            "failures included (their error field set)",
        )
        p.add_argument("--batch-size", type=int, default=8, help="segments decoded together (default 8)")
        p.add_argument(
            "--max-segment-seconds",
            type=float,
            default=10.0,
            help="speech is cut at pauses into pieces of at most this many seconds (default 10, "
            "the length of the shipped projectors' training utterances)",
        )
        p.add_argument(
            "--vad",
            choices=("on", "off"),
            default="on",
            help="on: transcribe the speech Silero VAD finds, cut at its pauses; audio without speech gives "
            "an empty text (default). off: the whole recording, cut at its quietest points (clean, "
            "pre-cut audio)",
        )
        p.add_argument("--max-new-tokens", type=int, default=150, help="per segment (default 150, as the paper)")
        p.add_argument("--device", default="cpu", type=_device_name, help="cpu, cuda, cuda:N or mps (default cpu)")
        p.add_argument(
            "--dtype",
            choices=("auto", "bf16", "fp32"),
            default="auto",
            help="the LLM's dtype (default auto: bf16 on CUDA and on CPUs that compute it natively, else fp32)",
        )
        p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        return p

    audio_command("transcribe", "transcribe recordings with a trained projector", DEFAULT_TRANSCRIBE)
    ask = audio_command("ask", "answer an instruction about each recording", DEFAULT_ASK)
    ask.add_argument("--instruction", required=True, help='e.g. "What is the speaker talking about?"')
    sub.add_parser("list", help="the projectors shipped with the package, and what each is for")
    sub.add_parser("ls", help="the recipes and packaged configs (what `tune ls` lists for torchtune's own)")
    cp = sub.add_parser("cp", help="copy a recipe or config to DEST, to run or edit in your own torchtune workflow")
    cp.add_argument(
        "name", help=f"a recipe ({', '.join(RECIPES)}) or a packaged config (e.g. smollm2_135M/stage2_asr_full)"
    )
    cp.add_argument("dest", help="a file or folder")
    cp.add_argument("--force", action="store_true", help="overwrite DEST")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `speechmapper ls | head`: the reader left, nothing to report
        sys.stderr.close()
        return 0


def _main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "list":
        return cmd_list(args)
    if args.cmd == "ls":
        return cmd_ls(args)
    if args.cmd == "cp":
        return cmd_cp(args)
    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            build_parser().error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_segment_seconds <= 2.0 or args.max_segment_seconds > 30.0:
        build_parser().error("--max-segment-seconds must be in (2, 30]: Whisper's window is 30 s")
    return cmd_run(args, args.instruction if args.cmd == "ask" else None)


if __name__ == "__main__":
    sys.exit(main())
