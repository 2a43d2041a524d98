"""Stage-1 benchmarks: training throughput and peak memory, and why stage 1 ignores LLM depth.

    .venv/bin/python bench/stage1.py                # all, prints markdown tables
    .venv/bin/python bench/stage1.py --only train   # throughput only
    .venv/bin/python bench/stage1.py --device cuda  # on a GPU machine (adds the paper preset)

Each measurement runs in a fresh subprocess so that peak RSS (ru_maxrss) is its own.

1. Throughput: projector forward + Eq.-2 loss + backward + AdamW step on batches of
   ``max_tokens`` (1024) output vectors with real-length variety, for the tiny / small /
   (GPU) paper presets, fp32 and bf16 autocast. Reported in output vectors per second.
2. Embedding-table loading from a Llama-3.1-8B-shaped checkpoint (embedding 128256 x 4096,
   decoder layers of the real shapes) with 2, 8 and 32 layers. The decoder tensors are
   sparse-file holes (no disk), the embedding is real data. Ours reads only the embedding;
   the alternative a user would write, transformers ``from_pretrained`` then
   ``get_input_embeddings()``, materialises every layer (only run up to 8 layers here).
3. A stage-1 training step with the Llama-8B-shaped table next to the same step with
   SmolLM2's table (49152 x 576), same projector body.
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA8B = dict(vocab=128256, dim=4096, ffn=14336, heads=32, kv_heads=8)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_child(args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- children
def child_train(preset: str, dtype: str, device: str, max_tokens: int, steps: int, table: str) -> dict:
    import torch

    from speechmapper_tune.data.stage1 import lookup_targets
    from speechmapper_tune.losses import Stage1Loss, build_stage1_target_ids
    from speechmapper_tune.models import projector as P

    torch.manual_seed(0)
    vocab, dim = {"smollm2": (49152, 576), "llama8b": (LLAMA8B["vocab"], LLAMA8B["dim"]), "tiny": (42, 32)}[table]
    builders = {
        "tiny": lambda: P.speechmapper_tiny(input_dim=16, output_dim=dim),
        "small": lambda: P.speechmapper_small(input_dim=512, output_dim=dim),
        "paper": lambda: P.speechmapper_paper(input_dim=1024, output_dim=dim),
    }
    model = builders[preset]().to(device)
    emb = torch.randn(vocab, dim, device=device) * 0.02
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = Stage1Loss()
    in_dim = model.input_dim
    # batches of 1024 output vectors: e.g. 16 utterances of ~64 vectors (~10 s of speech)
    per_utt = 64
    n_utt = max(1, max_tokens // per_utt)
    lengths = torch.full((n_utt,), per_utt * 4, dtype=torch.long)
    feats = torch.randn(n_utt, per_utt * 4, in_dim, device=device)
    tokens = [list(range(5, 5 + per_utt // 2))] * n_utt
    out_lengths = [model.output_length(int(n)) for n in lengths]
    target = lookup_targets(emb, build_stage1_target_ids(tokens, out_lengths, 1).to(device))
    nw = torch.full((n_utt,), per_utt // 2, device=device)
    lengths = lengths.to(device)
    ac = torch.bfloat16 if dtype == "bf16" else None

    def step():
        with torch.autocast(torch.device(device).type, dtype=ac, enabled=ac is not None):
            pred, ol = model(feats, lengths)
        loss = loss_fn(pred.float(), target, ol, nw)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    res = {
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_s": dt,
        "vectors_per_s": sum(out_lengths) / dt,
        "peak_rss_MB": _rss_mb(),
    }
    if device == "cuda":
        res["peak_gpu_MB"] = torch.cuda.max_memory_allocated() / 2**20
    return res


def _sparse_llama_checkpoint(folder: Path, layers: int) -> None:
    """HF-named Llama-3.1-8B-shaped safetensors: real bf16 embedding data, layers as holes."""
    import numpy as np

    v, d, f, h, kv = LLAMA8B["vocab"], LLAMA8B["dim"], LLAMA8B["ffn"], LLAMA8B["heads"], LLAMA8B["kv_heads"]
    hd = d // h
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv * hd, d),
            p + "self_attn.v_proj.weight": (kv * hd, d), p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        })
    header, off = {}, 0
    for k, s in shapes.items():
        n = int(np.prod(s)) * 2
        header[k] = {"dtype": "BF16", "shape": list(s), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.write(np.random.default_rng(0).integers(0, 2**16, v * d, dtype=np.uint16).view(np.uint16).tobytes())
        fh.truncate(8 + len(raw) + off)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": v, "hidden_size": d,
        "intermediate_size": f, "num_hidden_layers": layers, "num_attention_heads": h, "num_key_value_heads": kv,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(cfg))


def child_load(folder: str, how: str) -> dict:
    import torch

    base = _rss_mb()
    t = time.perf_counter()
    if how == "ours":
        from speechmapper_tune.checkpoint.embedding_table import load_embedding_table

        emb = load_embedding_table(folder, dtype=None)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16)
        emb = model.get_input_embeddings().weight.detach().clone()
        del model
    return {"shape": list(emb.shape), "seconds": time.perf_counter() - t, "peak_rss_MB": _rss_mb(), "base_rss_MB": base}


# ---------------------------------------------------------------- driver
def machine() -> str:
    from speechmapper_tune.dtypes import machine_summary

    return machine_summary()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["train", "load", "table"], default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        args = json.loads(a.child)
        fn = {"train": child_train, "load": child_load}[args.pop("kind")]
        print(json.dumps(fn(**args)))
        return

    print(f"Machine: {machine()}\n")
    if a.only in (None, "train"):
        presets = ["tiny", "small"] + (["paper"] if a.device == "cuda" else [])
        print("| preset | table | dtype | params (M) | step (s) | output vectors/s | peak RSS (MB) | peak GPU (MB) |")
        print("|---|---|---|---|---|---|---|---|")
        for preset in presets:
            table = {"tiny": "tiny", "small": "smollm2", "paper": "llama8b"}[preset]
            for dtype in ("fp32", "bf16"):
                r = _run_child(dict(kind="train", preset=preset, dtype=dtype, device=a.device,
                                    max_tokens=a.max_tokens, steps=a.steps, table=table))
                if "error" in r:
                    print(f"| {preset} | {table} | {dtype} | error: {r['error']} |")
                    continue
                print(f"| {preset} | {table} | {dtype} | {r['params_M']:.2f} | {r['step_s']:.3f} | "
                      f"{r['vectors_per_s']:.0f} | {r['peak_rss_MB']:.0f} | {r.get('peak_gpu_MB', float('nan')):.0f} |")
        print()
    if a.only in (None, "table"):
        print("Same small projector body, stage-1 step with each embedding table (fp32 table):\n")
        print("| table | shape | step (s) | peak RSS (MB) |")
        print("|---|---|---|---|")
        for table, shape in (("smollm2", "49152 x 576"), ("llama8b", "128256 x 4096")):
            r = _run_child(dict(kind="train", preset="small", dtype="fp32", device=a.device,
                                max_tokens=a.max_tokens, steps=a.steps, table=table))
            print(f"| {table} | {shape} | {r.get('step_s', float('nan')):.3f} | {r.get('peak_rss_MB', float('nan')):.0f} |")
        print()
    if a.only in (None, "load"):
        print("Reading the embedding table of a Llama-3.1-8B-shaped checkpoint (bf16), by decoder depth:\n")
        print("| decoder layers | checkpoint size (GB, logical) | loader | seconds | peak RSS (MB) |")
        print("|---|---|---|---|---|")
        with tempfile.TemporaryDirectory() as tmp:
            for layers in (2, 8, 32):
                folder = Path(tmp) / f"l{layers}"
                _sparse_llama_checkpoint(folder, layers)
                size = (folder / "model.safetensors").stat().st_size / 1e9
                for how in ("ours", "transformers") if layers <= 8 else ("ours",):
                    r = _run_child(dict(kind="load", folder=str(folder), how=how))
                    if "error" in r:
                        print(f"| {layers} | {size:.1f} | {how} | error: {r['error']} | |")
                        continue
                    print(f"| {layers} | {size:.1f} | {how} | {r['seconds']:.2f} | {r['peak_rss_MB']:.0f} |")
                import shutil

                shutil.rmtree(folder)


if __name__ == "__main__":
    main()
