"""Memory per rank of one stage-2 step on a Llama-3.1-8B-shaped LLM, 1 process vs N under FSDP2.

    python bench/stage2_memory.py                     # 1 layer, bf16, 1 and 2 ranks (gloo, CPU)
    python bench/stage2_memory.py --projector small --quantize nf4   # the layer weights in NF4

The LLM is ``LLAMA3_1_8B`` of ``speechmapper_tune/models/llms.py`` (width 4096, GQA 32/8, FFN 14336,
vocabulary 128256, untied LM head, Llama-3.1 RoPE) with ``--layers`` of its 32 layers (the machine's
RAM decides), random bf16 weights, frozen as ``load_llm`` leaves it; the paper's projector
(``speechmapper_paper``, 279M, 1024-dim features; ``--projector small``: 21.7M) trains, LoRA too
with ``--lora``. Under N ranks the
SpeechLM is sharded by ``SpeechLM.shard`` as the recipe shards it (each LLM layer, then the root).

One step as the recipe takes it: forward (``SpeechLM.forward`` + ``Stage2Loss``), backward, global-norm
clipping, AdamW step, on a batch of 12 items (the paper's) of 300 feature frames, a 20-token prompt
prefix, 10-token suffix and 24-token response. Per rank it reports, in bytes:

- ``params_frozen`` / ``params_trainable``: the parameter storage the rank holds after sharding
  (a DTensor's local shard, a plain tensor whole); ``buffers``: what FSDP does not shard (the fp32
  embedding table SpeechLM keeps for MSE targets, RoPE caches);
- ``grads`` after backward, ``optimizer`` (AdamW's two moments and step) after the step;
- ``rss_step_peak``: the process's peak resident set during the step (VmHWM, reset just before
  it by writing 5 to /proc/self/clear_refs); ``rss_before_step``; ``rss_setup_peak``: the peak
  while building and sharding (each rank builds the full LLM before it is sharded).

Results are printed as JSON lines and a markdown table.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

PROMPT_PREFIX, PROMPT_SUFFIX, RESPONSE, FRAMES, BATCH = 20, 10, 24, 300, 12


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _local_bytes(t: torch.Tensor) -> int:
    """Storage a rank holds for ``t``: a DTensor's local shard; an NF4 tensor's packed codes and scales
    (it reports the bf16 shape and dtype it dequantizes to)."""
    from torch.distributed.tensor import DTensor
    from torchao.dtypes.nf4tensor import NF4Tensor

    t = t.to_local() if isinstance(t, DTensor) else t
    if isinstance(t, NF4Tensor):
        return sum(
            getattr(t, a).numel() * getattr(t, a).element_size()
            for a in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")
        )
    return t.numel() * t.element_size()


def _build(layers: int, lora: bool, projector: str, quantize: bool, world: int):
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    from speechmapper_tune.models import llms
    from speechmapper_tune.models.projector import speechmapper_paper, speechmapper_small
    from speechmapper_tune.models.speech_lm import SpeechLM

    builders = {"paper": speechmapper_paper, "small": speechmapper_small}
    hp = dataclasses.replace(llms.LLAMA3_1_8B, num_layers=layers)
    cfg = (
        llms.LoraConfig.from_dict({"rank": 8, "alpha": 16, "dropout": 0.0, "attn_modules": ["q_proj", "v_proj"]})
        if lora
        else None
    )
    from torchtune.training import set_default_dtype

    with set_default_dtype(torch.bfloat16), torch.device("meta"):
        llm = llms._build(hp, cfg)
    llm.to_empty(device="cpu")  # bf16 storage, filled in place: no second copy of the weights
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in llm.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    if cfg is not None:
        llms._init_lora_adapters(llm, torch.device("cpu"))  # fp32 adapters, as load_llm makes them
    llms._reinit_rope(llm, torch.device("cpu"))
    llms._fp32_norm_scales(llm)
    llm.requires_grad_(False)
    if cfg is not None:
        set_trainable_params(llm, get_adapter_params(llm))
    embedding = llm.tok_embeddings.weight.detach().float().clone()  # SpeechLM's fp32 table (MSE targets)
    chat = SimpleNamespace(eos_id=1)  # SpeechLM.forward reads only the right-padding id
    model = SpeechLM(llm, chat, None, pad_id=0, embedding=embedding, projector=builders[projector](1024, hp.embed_dim))
    if quantize:
        model.quantize_("nf4", world)  # the recipe's llm.quantize=nf4
    model.projector.train()
    return model


def _batch(model, vocab: int):
    from speechmapper_tune.losses import build_stage1_target_ids

    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(2, vocab, (n,), generator=g).tolist()  # noqa: E731
    out_len = int(model.projector.output_length(FRAMES))
    targets = [ids(min(RESPONSE, out_len)) for _ in range(BATCH)]
    return {
        "features": torch.randn(BATCH, FRAMES, 1024, generator=g),
        "lengths": torch.full((BATCH,), FRAMES),
        "target_ids": build_stage1_target_ids(targets, [out_len] * BATCH, 0),
        "num_words": torch.tensor([len(t) for t in targets]),
        "has_mse": torch.ones(BATCH, dtype=torch.bool),
        "prefix": [ids(PROMPT_PREFIX) for _ in range(BATCH)],
        "suffix": [ids(PROMPT_SUFFIX) for _ in range(BATCH)],
        "response": targets,
    }


def worker(args) -> None:
    import torch.distributed as dist

    from speechmapper_tune.data.stage1 import lookup_targets
    from speechmapper_tune.losses import Stage2Loss

    torch.manual_seed(0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    model = _build(args.layers, args.lora, args.projector, args.quantize == "nf4", world)
    if world > 1:
        dist.init_process_group("gloo")
        model.shard()  # the recipe's sharding, as it runs
    setup_peak = _status("VmHWM")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    loss_fn = Stage2Loss(sigma=0.9)
    batch = _batch(model, model.embedding.shape[0])
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS shows what is held
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS")
    t0 = time.perf_counter()
    out = model(batch)
    target = lookup_targets(model.embedding, batch["target_ids"])
    losses = loss_fn(
        out["logits"], out["labels"], out["pred"], target, out["out_lengths"], batch["num_words"], batch["has_mse"]
    )
    losses["objective"].backward()
    grads = sum(_local_bytes(p.grad) for p in trainable if p.grad is not None)
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    seconds = time.perf_counter() - t0
    step_peak = _status("VmHWM")
    opt_bytes = sum(_local_bytes(v) for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v))
    row = {
        "ranks": world,
        "rank": rank,
        "layers": args.layers,
        "projector": args.projector,
        "lora": args.lora,
        "dtype": args.quantize or "bf16",
        "params_frozen": sum(_local_bytes(p) for p in model.parameters() if not p.requires_grad),
        "params_trainable": sum(_local_bytes(p) for p in trainable),
        "buffers": sum(_local_bytes(b) for b in model.buffers()),
        "grads": grads,
        "optimizer": opt_bytes,
        "rss_setup_peak": setup_peak,
        "rss_before_step": before,
        "rss_step_peak": step_peak,
        "step_seconds": round(seconds, 2),
        "loss": float(losses["loss"].detach()),
    }
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        json.dump(row, f)
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1, help="LLM layers of Llama-3.1-8B's 32 (RAM permitting)")
    ap.add_argument("--lora", action="store_true", help="LoRA rank 8 on q_proj/v_proj, trained with the projector")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--quantize", choices=["nf4"], default=None, help="the recipe's llm.quantize=nf4")
    ap.add_argument(
        "--projector",
        choices=["paper", "small"],
        default="paper",
        help="paper: 279M (1024 -> 4096, A.1); small: the embedded default's blocks (21.7M) at the same widths in/out",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="/tmp/stage2_memory", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    rows = []
    for n in args.ranks:
        out = f"{args.out}.{n}"
        cmd = (
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), __file__]
            if n > 1
            else [sys.executable, __file__]
        )
        flags = ["--worker", "--layers", str(args.layers), "--projector", args.projector, "--out", out]
        flags += (["--lora"] if args.lora else []) + (["--quantize", args.quantize] if args.quantize else [])
        subprocess.run(
            cmd + flags, check=True, env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
        )
        for r in range(n):
            with open(f"{out}.rank{r}.json") as f:
                rows.append(json.load(f))
            print(json.dumps(rows[-1]))
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    keys = [
        "params_frozen",
        "params_trainable",
        "buffers",
        "grads",
        "optimizer",
        "rss_before_step",
        "rss_step_peak",
        "rss_setup_peak",
    ]
    print("\n| ranks | rank | " + " | ".join(k + " GiB" for k in keys) + " | step s | loss |")
    print("|" + "---|" * (len(keys) + 4))
    for r in rows:
        print(
            f"| {r['ranks']} | {r['rank']} | "
            + " | ".join(gib(r[k]) for k in keys)
            + f" | {r['step_seconds']} | {r['loss']:.1f} |"
        )


if __name__ == "__main__":
    main()
