"""The one home of dtype names: ``auto`` picks bf16 only where the hardware computes it natively.

On CPUs without native bf16 (AVX2-only: AMD Zen 2/3, many Intel client parts) torch emulates bf16
matrix products, 2-8x slower than fp32 through ``nn.Linear`` and up to ~60x for other layouts
(``bench/dtype.py``, BENCHMARKS.md), so ``auto`` means fp32 there.
"""

from __future__ import annotations

import functools
import sys
from typing import Iterable, Optional, Union

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO = "auto"
# Names a setting may take where it picks the dtype an LLM or a projector computes in.
COMPUTE_DTYPES = (AUTO, "fp32", "bf16")


@functools.lru_cache(maxsize=None)
def native_bf16(device_type: str = "cpu") -> bool:
    """Whether ``device_type`` computes bf16 matrix products natively (torch's own capability query)."""
    if device_type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device_type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return True  # other accelerators (mps, xpu) run bf16 in hardware or refuse it themselves


def _cpu_kind() -> str:
    return f"{torch.backends.cpu.get_cpu_capability()} CPU"


@functools.lru_cache(maxsize=None)
def _say_once(level: str, message: str) -> None:
    """One line on stderr, once per process: recipes, the CLI and scripts all show it the same way."""
    print(f"speechmapper: {level}: {message}", file=sys.stderr, flush=True)


def resolve_dtype(
    name: Optional[str],
    device: Union[str, torch.device] = "cpu",
    *,
    setting: str = "dtype",
    allowed: Iterable[str] = COMPUTE_DTYPES,
) -> torch.dtype:
    """The torch dtype for the setting value ``name`` on ``device``; ``None`` means ``auto``.

    ``auto``: bf16 on CUDA and on CPUs with native bf16, fp32 elsewhere; the choice is logged once with
    its reason. An explicit ``bf16`` on a CPU that emulates it runs, with a one-line warning.
    """
    name = AUTO if name is None else str(name)
    allowed = tuple(allowed)
    if name not in allowed:
        raise ValueError(f"{setting}={name!r}: expected one of {list(allowed)}")
    device_type = torch.device(device).type
    if name == AUTO:
        native = native_bf16(device_type)
        where = "CUDA" if device_type == "cuda" else _cpu_kind() if device_type == "cpu" else device_type
        reason = (
            "computes bf16 natively" if native else "has no native bf16 (torch would emulate it, several times slower)"
        )
        chosen = "bf16" if native else "fp32"
        _say_once("info", f"{setting}=auto -> {chosen}: this {where} {reason}")
        return DTYPES[chosen]
    if name == "bf16" and device_type == "cpu" and not native_bf16("cpu"):
        _say_once(
            "warning",
            f"{setting}=bf16 on this {_cpu_kind()}, which has no native bf16: torch emulates it, "
            "expect matrix products 2-60x slower than fp32 (use auto or fp32)",
        )
    return DTYPES[name]


def autocast_dtype(
    name: Optional[str], device: Union[str, torch.device] = "cpu", *, setting: str = "dtype"
) -> Optional[torch.dtype]:
    """The autocast dtype for a training setting: ``None`` (no autocast) where it resolves to fp32."""
    dtype = resolve_dtype(name, device, setting=setting)
    return None if dtype == torch.float32 else dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The setting name of a torch dtype (``torch.bfloat16`` -> ``bf16``), as runs record it."""
    return next(k for k, v in DTYPES.items() if v == dtype)


def machine_summary() -> str:
    """What a benchmark ran on, for its header: CPU model and capability, native bf16, torch threads."""
    import os
    import platform

    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    cuda = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
        f"{'yes' if native_bf16('cpu') else 'no (emulated)'}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads{cuda}"
    )
