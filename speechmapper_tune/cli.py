"""`speechmapper`: a trained projector on your own audio, and the recipes to train your own.

    speechmapper transcribe talk.flac interview.mp3          # text, one line per file
    speechmapper ask --instruction "Who is speaking?" talk.wav
    speechmapper list                                         # shipped projectors and what each is for
    speechmapper cp speechmapper_adapt my_adapt.py            # then, in that folder: tune run my_adapt.py --config ...
    speechmapper cp smollm2_135M/stage2_asr_full ./my.yaml

Audio: any file soundfile reads (WAV, FLAC, OGG, MP3), any sample rate or channel count, any
length (long recordings are cut at pauses and the texts joined). A file that cannot be read gets
a one-line error naming it; the others are still transcribed, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import List, Optional

DEFAULT_TRANSCRIBE = "smollm2_135m_whisper_base_stage2_asr_lora"  # the best shipped ASR projector
DEFAULT_ASK = "smollm2_135m_whisper_base_stage2"  # the one trained task-agnostic (sigma 0.9), for other instructions
RECIPES = ("speechmapper_corpus", "speechmapper_extract", "speechmapper_pretrain", "speechmapper_adapt",
           "speechmapper_generate", "speechmapper_eval", "speechmapper_eet")


def _error(message: str) -> None:
    print(f"speechmapper: error: {message}", file=sys.stderr)


def describe(meta: dict) -> str:
    """What a projector is for, from what its checkpoint records."""
    llm = meta.get("llm", {}).get("name", "?")
    feats = (meta.get("features") or {}).get("feature_type", "?")
    if meta.get("stage") == 1:
        use = "stage 1 only: read zero-shot by the LLM (paper's repeat prompt); a start for stage 2"
    else:
        sigma = meta.get("sigma")
        use = "ASR specialist (sigma 0)" if sigma == 0 else f"trained task-agnostic (sigma {sigma})"
        if meta.get("lora"):
            use += f", LoRA r{meta['lora']['rank']} on the LLM"
    return f"{use}; {llm}, {feats} features, step {meta.get('step')}"


def cmd_list(_args) -> int:
    from speechmapper_tune import pretrained
    from speechmapper_tune.checkpoint.projector_io import read_projector_meta

    for name in pretrained.available():
        mark = " (transcribe default)" if name == DEFAULT_TRANSCRIBE else " (ask default)" if name == DEFAULT_ASK else ""
        print(f"{name}{mark}\n    {describe(read_projector_meta(pretrained.shipped_projector(name)))}")
    return 0


def cmd_cp(args) -> int:
    """Copy a recipe (a top-level module) or a packaged config to DEST, as `tune cp` does."""
    from speechmapper_tune.configs import available_configs, resolve_config

    if args.name in RECIPES:
        spec = importlib.util.find_spec(args.name)
        source = Path(spec.origin)
        suffix = ".py"
    elif args.name.removesuffix(".yaml") in available_configs():
        source, suffix = resolve_config(args.name.removesuffix(".yaml")), ".yaml"
    else:
        _error(f"{args.name!r} is neither a recipe ({', '.join(RECIPES)}) nor a packaged config "
               f"({', '.join(available_configs())})")
        return 2
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / (source.name if suffix == ".py" else Path(args.name).name + ".yaml")
    if dest.exists() and not args.force:
        _error(f"{dest} exists; pass --force to overwrite it")
        return 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    print(f"Copied {source} to {dest}")
    return 0


def _load(args, default: str):
    import torch

    from speechmapper_tune.models.speech_lm import SpeechLM

    if args.threads:
        torch.set_num_threads(args.threads)
    llm = {"dtype": args.dtype, **({"checkpoint": args.llm} if args.llm else {})}
    return SpeechLM.from_checkpoint(args.projector or default, llm=llm, device=args.device,
                                    on_warning=lambda m: print(f"speechmapper: warning: {m}", file=sys.stderr))


def cmd_run(args, instruction: Optional[str]) -> int:
    from tqdm import tqdm

    from speechmapper_tune.audio import AudioError, read_audio

    try:
        lm = _load(args, DEFAULT_ASK if instruction is not None else DEFAULT_TRANSCRIBE)
    except (FileNotFoundError, ValueError) as e:
        _error(str(e))
        return 2
    files, waves, failed = [], [], 0
    for f in args.files:  # a bad file gets its one-line error; the others still run
        try:
            waves.append(read_audio(f))
            files.append(f)
        except AudioError as e:
            _error(str(e))
            failed += 1
    bar = tqdm(desc="speechmapper", unit="segment", disable=args.quiet or not waves, file=sys.stderr, delay=0.5)
    texts = lm.answer_recordings(waves, instruction, args.max_segment_seconds, progress=bar, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens)
    bar.close()
    for f, wave, text in zip(files, waves, texts):
        if args.format == "jsonl":
            row = {"file": str(f), "text": text, "seconds": round(wave.size / 16000, 3)}
            print(json.dumps({**row, **({"instruction": instruction} if instruction is not None else {})}, ensure_ascii=False))
        else:
            print(f"{f}\t{text}" if len(args.files) > 1 else text)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="speechmapper", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def audio_command(name: str, help_: str, default: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("files", nargs="+", help="audio files (wav, flac, ogg, mp3; any rate, channels, length)")
        p.add_argument("--projector", help=f"a shipped projector name or a checkpoint folder (default {default})")
        p.add_argument("--llm", help="the LLM's local folder (default: as the projector records; SmolLM2 is found offline)")
        p.add_argument("--format", choices=("text", "jsonl"), default="text",
                       help="text: one line per file (FILE<TAB>TEXT when several); jsonl: one JSON object per file")
        p.add_argument("--batch-size", type=int, default=8, help="segments decoded together (default 8)")
        p.add_argument("--max-segment-seconds", type=float, default=10.0,
                       help="longer recordings are cut at pauses into pieces of at most this many seconds (default 10, "
                            "the length of the shipped projectors' training utterances)")
        p.add_argument("--max-new-tokens", type=int, default=150, help="per segment (default 150, as the paper)")
        p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
        p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="the LLM's dtype (default bf16)")
        p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        return p

    audio_command("transcribe", "transcribe recordings with a trained projector", DEFAULT_TRANSCRIBE)
    ask = audio_command("ask", "answer an instruction about each recording", DEFAULT_ASK)
    ask.add_argument("--instruction", required=True, help='e.g. "What is the speaker talking about?"')
    sub.add_parser("list", help="the projectors shipped with the package, and what each is for")
    cp = sub.add_parser("cp", help="copy a recipe or config to DEST, to run or edit in your own torchtune workflow")
    cp.add_argument("name", help=f"a recipe ({', '.join(RECIPES)}) or a packaged config (e.g. smollm2_135M/stage2_asr_full)")
    cp.add_argument("dest", help="a file or folder")
    cp.add_argument("--force", action="store_true", help="overwrite DEST")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "list":
        return cmd_list(args)
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
