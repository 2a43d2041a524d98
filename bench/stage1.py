"""Stage-1 benchmarks: training throughput and peak memory, and why stage 1 ignores LLM depth.

    .venv/bin/python bench/stage1.py                # all, prints markdown tables
    .venv/bin/python bench/stage1.py --only train   # throughput only
    .venv/bin/python bench/stage1.py --device cuda  # on a GPU machine (adds the paper preset)
    .venv/bin/python bench/stage1.py --only classifier   # the shipped config's step: full vs sampled classifier

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
4. ``--only classifier``: the shipped stage-1 config (``smollm2_135M/stage1_full``: its projector
   and loss, fp32) as it is (classifier CE over all 49,152 rows), with the sampled classifier
   (``loss.classifier_negatives`` / ``classifier_neighbours``) and without a classifier, side by side:
   output vectors/s of the full step (forward, loss, backward, AdamW). Batches mimic the corpus: ~1024
   output vectors of utterances with 16 vectors and 9 target tokens each, token ids drawn from a
   Zipf law over 12,000 ids. The neighbour variant's cache (each id's nearest rows, computed the first time
   the id is a target) is filled for those 12,000 ids before timing, as after a run's first steps; its
   one-time cost is printed apart. The
   variants run interleaved, ``--rounds`` times each, in fresh processes; the median is reported, so
   a load that changes during the run hits every variant alike.
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
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (d, d),
                p + "self_attn.k_proj.weight": (kv * hd, d),
                p + "self_attn.v_proj.weight": (kv * hd, d),
                p + "self_attn.o_proj.weight": (d, d),
                p + "mlp.gate_proj.weight": (f, d),
                p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f),
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
            }
        )
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
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": v,
        "hidden_size": d,
        "intermediate_size": f,
        "num_hidden_layers": layers,
        "num_attention_heads": h,
        "num_key_value_heads": kv,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "torch_dtype": "bfloat16",
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


SHIPPED_STAGE1 = "smollm2_135M/stage1_full"
CLASSIFIER_VARIANTS = (  # (label, loss overrides)
    ("shipped: classifier over all 49,152 rows", {}),
    ("sampled: targets + 1024 drawn rows", {"classifier_negatives": 1024}),
    ("sampled: targets + 8 neighbours each + 1024 drawn", {"classifier_negatives": 1024, "classifier_neighbours": 8}),
    ("no classifier (classifier_weight 0)", {"classifier_weight": 0.0}),
)


def child_classifier(
    loss_overrides: dict,
    steps: int,
    max_tokens: int,
    vectors_per_utt: int,
    words_per_utt: int,
    device: str = "cpu",
    threads: int = 0,
) -> dict:
    """One variant of the shipped stage-1 step: the config's projector and loss, fp32, SmolLM2-shaped table."""
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)
    from omegaconf import OmegaConf
    from torchtune import config as tt_config

    from speechmapper_tune.configs import resolve_config
    from speechmapper_tune.data.stage1 import lookup_targets
    from speechmapper_tune.losses import build_stage1_target_ids

    cfg = OmegaConf.load(resolve_config(SHIPPED_STAGE1))
    for k, v in loss_overrides.items():
        cfg.loss[k] = v
    torch.manual_seed(0)
    model = tt_config.instantiate(cfg.model).to(device)
    loss_fn = tt_config.instantiate(cfg.loss)
    vocab, dim, pad_id = 49152, int(cfg.model.output_dim), int(cfg.llm.pad_id)
    emb = torch.randn(vocab, dim, device=device) * 0.1  # the table's values do not change the cost
    loss_fn.set_embedding(emb, blank_id=pad_id)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # input frames per output vector: the projector's own downsampling
    frames = next(n for n in range(vectors_per_utt, 64 * vectors_per_utt) if model.output_length(n) >= vectors_per_utt)
    n_utt = max(1, max_tokens // vectors_per_utt)
    rng = np.random.default_rng(0)
    zipf = 1.0 / np.arange(1, 12001)
    zipf /= zipf.sum()
    ids_pool = rng.permutation(np.arange(100, vocab))[:12000]

    def batch():
        toks = [[int(t) for t in ids_pool[rng.choice(12000, size=words_per_utt, p=zipf)]] for _ in range(n_utt)]
        feats = torch.randn(n_utt, frames, model.input_dim, device=device)
        lengths = torch.full((n_utt,), frames, dtype=torch.long, device=device)
        out_lengths = [int(model.output_length(frames))] * n_utt
        target_ids = build_stage1_target_ids(toks, out_lengths, pad_id).to(device)
        return feats, lengths, target_ids, torch.full((n_utt,), words_per_utt, device=device)

    batches = [batch() for _ in range(steps + 2)]
    model.train()
    warm_s = 0.0
    if loss_fn.neighbours is not None:  # steady state: every id of the pool met once (a one-time cost)
        t = time.perf_counter()
        loss_fn.neighbours.lookup(torch.as_tensor(ids_pool, device=device))
        warm_s = time.perf_counter() - t

    def step(b):
        feats, lengths, target_ids, nw = b
        pred, ol = model(feats, lengths)
        out = loss_fn(pred.float(), lookup_targets(emb, target_ids), ol, nw, target_ids)
        out["objective"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[:2]:
        step(b)
    t, c = time.perf_counter(), time.process_time()
    for b in batches[2:]:
        step(b)
    dt, cpu = (time.perf_counter() - t) / steps, (time.process_time() - c) / steps
    vectors = n_utt * int(model.output_length(frames))
    # the classifier's size: word positions x rows scored (the candidates of the sampled variants)
    from speechmapper_tune.losses import position_masks

    rows = []
    for _feats, _lengths, target_ids, nw in batches[2:]:
        ol = torch.full((n_utt,), int(model.output_length(frames)))
        word, _ = position_masks(ol, nw.long(), target_ids.shape[1])
        if loss_fn.classifier_weight == 0:
            rows.append((int(word.sum()), 0))
        elif loss_fn.classifier_negatives is None:
            rows.append((int(word.sum()), vocab))
        else:
            rows.append((int(word.sum()), int(loss_fn._candidates(target_ids[word])[0].numel())))
    positions = sum(r[0] for r in rows) / len(rows)
    scored = sum(r[1] for r in rows) / len(rows)
    return {
        "step_s": dt,
        "cpu_s": cpu,
        "vectors_per_s": vectors / dt,
        "vectors_per_cpu_s": vectors / cpu,
        "vectors": vectors,
        "peak_rss_MB": _rss_mb(),
        "neighbour_cache_s": warm_s,
        "word_positions": positions,
        "rows_scored": scored,
        # forward logits + their gradient w.r.t. the predictions (the table is frozen): 2 matmuls
        "classifier_gflop": 4 * positions * scored * dim / 1e9,
    }


def bench_classifier(a) -> None:
    import statistics

    print(
        f"Shipped stage-1 config ({SHIPPED_STAGE1}: small projector, balanced loss, classifier weight 1), fp32, "
        f"{a.threads or 'default'} torch thread(s), {a.rounds} interleaved rounds of {a.steps} steps per variant "
        f"(median; 'CPU s' is the process's CPU time per step, steadier than wall time on a shared machine):\n"
    )
    runs = {label: [] for label, _ in CLASSIFIER_VARIANTS}
    for _ in range(a.rounds):
        for label, overrides in CLASSIFIER_VARIANTS:
            r = _run_child(
                dict(
                    kind="classifier",
                    loss_overrides=overrides,
                    steps=a.steps,
                    max_tokens=a.max_tokens,
                    vectors_per_utt=16,
                    words_per_utt=9,
                    device=a.device,
                    threads=a.threads,
                )
            )
            if "error" in r:
                print(f"| {label} | error: {r['error']} |")
                continue
            runs[label].append(r)
    first = runs[CLASSIFIER_VARIANTS[0][0]]
    base = statistics.median(r["vectors_per_s"] for r in first) if first else float("nan")
    base_cpu = statistics.median(r["vectors_per_cpu_s"] for r in first) if first else float("nan")
    print(
        "| variant | rows scored x word positions | classifier GFLOP/step | step wall s | output vectors/s | x shipped | "
        "step CPU s | vectors per CPU s | x shipped (CPU) | all rounds (vectors/s) | one-time neighbour cache, 12k ids (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, _ in CLASSIFIER_VARIANTS:
        if not runs[label]:
            continue
        med = {k: statistics.median(r[k] for r in runs[label]) for k in runs[label][0]}
        every = ", ".join(f"{r['vectors_per_s']:.0f}" for r in runs[label])
        cache = f"{med['neighbour_cache_s']:.1f}" if med["neighbour_cache_s"] else "-"
        print(
            f"| {label} | {med['rows_scored']:.0f} x {med['word_positions']:.0f} | {med['classifier_gflop']:.1f} | "
            f"{med['step_s']:.3f} | {med['vectors_per_s']:.0f} | {med['vectors_per_s'] / base:.2f} | {med['cpu_s']:.3f} | "
            f"{med['vectors_per_cpu_s']:.0f} | {med['vectors_per_cpu_s'] / base_cpu:.2f} | {every} | {cache} |"
        )
    print()


# ---------------------------------------------------------------- driver
def machine() -> str:
    from speechmapper_tune.dtypes import machine_summary

    return machine_summary()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["train", "load", "table", "classifier"], default=None)
    ap.add_argument("--rounds", type=int, default=3, help="--only classifier: interleaved rounds per variant")
    ap.add_argument(
        "--threads", type=int, default=0, help="--only classifier: torch threads per child (0: torch's default)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        args = json.loads(a.child)
        fn = {"train": child_train, "load": child_load, "classifier": child_classifier}[args.pop("kind")]
        print(json.dumps(fn(**args)))
        return

    print(f"Machine: {machine()}\n")
    if a.only == "classifier":
        bench_classifier(a)
        return
    if a.only in (None, "train"):
        presets = ["tiny", "small"] + (["paper"] if a.device == "cuda" else [])
        print("| preset | table | dtype | params (M) | step (s) | output vectors/s | peak RSS (MB) | peak GPU (MB) |")
        print("|---|---|---|---|---|---|---|---|")
        for preset in presets:
            table = {"tiny": "tiny", "small": "smollm2", "paper": "llama8b"}[preset]
            for dtype in ("fp32", "bf16"):
                r = _run_child(
                    dict(
                        kind="train",
                        preset=preset,
                        dtype=dtype,
                        device=a.device,
                        max_tokens=a.max_tokens,
                        steps=a.steps,
                        table=table,
                    )
                )
                if "error" in r:
                    print(f"| {preset} | {table} | {dtype} | error: {r['error']} |")
                    continue
                print(
                    f"| {preset} | {table} | {dtype} | {r['params_M']:.2f} | {r['step_s']:.3f} | "
                    f"{r['vectors_per_s']:.0f} | {r['peak_rss_MB']:.0f} | {r.get('peak_gpu_MB', float('nan')):.0f} |"
                )
        print()
    if a.only in (None, "table"):
        print("Same small projector body, stage-1 step with each embedding table (fp32 table):\n")
        print("| table | shape | step (s) | peak RSS (MB) |")
        print("|---|---|---|---|")
        for table, shape in (("smollm2", "49152 x 576"), ("llama8b", "128256 x 4096")):
            r = _run_child(
                dict(
                    kind="train",
                    preset="small",
                    dtype="fp32",
                    device=a.device,
                    max_tokens=a.max_tokens,
                    steps=a.steps,
                    table=table,
                )
            )
            print(
                f"| {table} | {shape} | {r.get('step_s', float('nan')):.3f} | {r.get('peak_rss_MB', float('nan')):.0f} |"
            )
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
