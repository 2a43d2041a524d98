"""fp32 against bf16 on this machine's CPU, side by side in one run: what ``dtype: auto`` decides from.

    .venv/bin/python bench/dtype.py [--threads 1,2] [--repeats 5]

Times SmolLM2-135M's matrix shapes (a 512-row prefill block and an 8-row decode step through the
576x1536 MLP projection) as ``torch.matmul`` with either weight layout and as ``F.linear`` (what
``nn.Linear``, so every LLM layer, runs), best of ``--repeats``, and prints what ``resolve_dtype("auto")``
picks here. On CPUs without native bf16 (AVX2-only) torch emulates bf16, at a cost that depends on the layout.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F

from speechmapper_tune.dtypes import machine_summary, native_bf16, resolve_dtype

SHAPES = {"prefill [512x576]@[576x1536]": 512, "decode [8x576]@[576x1536]": 8}


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: kernel selection, allocation
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2", help="torch thread counts to time (default 1,2)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"Machine: {machine_summary()}")
    print(f"dtype auto picks: {resolve_dtype('auto', 'cpu')} (native bf16: {native_bf16('cpu')})\n")
    print("| threads | shape | op | fp32 ms | bf16 ms | bf16 / fp32 |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name, rows in SHAPES.items():
            x32, w32 = torch.randn(rows, 576, generator=g), torch.randn(1536, 576, generator=g)
            # (name, weight as stored, op): a plain [in, out] weight, and nn.Linear's [out, in] one
            ops = (
                ("matmul, B stored [576x1536]", w32.t().contiguous(), lambda x, w: x @ w),
                ("matmul, B stored [1536x576]", w32, lambda x, w: x @ w.t()),
                ("F.linear", w32, F.linear),
            )
            for op, w32_, fn in ops:
                x16, w16_ = x32.bfloat16(), w32_.bfloat16()
                fp32 = best_seconds(partial(fn, x32, w32_), args.repeats)
                bf16 = best_seconds(partial(fn, x16, w16_), args.repeats)
                print(f"| {threads} | {name} | {op} | {fp32 * 1e3:.2f} | {bf16 * 1e3:.2f} | {bf16 / fp32:.1f}x |")


if __name__ == "__main__":
    main()
