"""Greedy decoding throughput: ``greedy_generate`` (torchtune model) vs transformers' ``generate``.

    .venv/bin/python bench/generate.py                     # fp32 + bf16, markdown table
    .venv/bin/python bench/generate.py --threads 2 --batch 8 --prompt-len 60 --new-tokens 64

Same SmolLM2-135M-Instruct weights (smollm2_dir()), same batch of input embeddings (chat
prompts of about ``--prompt-len`` positions, different lengths, with a span of random
"speech" vectors, left-padded), greedy, no early stop (no stop ids on our side,
``eos_token_id=[]`` on transformers' side), so every row generates exactly ``--new-tokens``.

Reported: generated tokens/s over the whole call (prefill included), the prefill time alone
(a 1-token call), and decode tokens/s without prefill; best of ``--repeats`` rounds, the
implementations interleaved within each round, after a warm-up (so a slower spell of a shared
machine hits both alike; the header gives the load average at the start and the end).
"Same ids" says whether both produced identical token ids (in bf16, logits a bf16 step apart
often tie at the top, so some ids differ between any two implementations).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from speechmapper_tune.dtypes import machine_summary


def _prompts(model, tok, batch: int, prompt_len: int, seed: int = 0):
    """``batch`` chat prompts of roughly ``prompt_len`` positions with a random speech span."""
    g = torch.Generator().manual_seed(seed)
    messages = [{"role": "user", "content": 'Repeat the previous text between the quotes: "<speech>"'}]
    base = len(tok.render_with_speech(messages, 0)[0])
    dim = model.tok_embeddings.weight.shape[1]
    embeds = []
    for i in range(batch):
        n = max(1, prompt_len - base - (i % 4) * 3)  # lengths differ: real left padding
        ids, start = tok.render_with_speech(messages, n)
        e = model.tok_embeddings(torch.tensor(ids)).float().clone()
        e[start : start + n] = torch.randn(n, dim, generator=g) * (e.norm(dim=-1).mean() / dim**0.5)
        embeds.append(e)
    return embeds


def run(dtype_name: str, args) -> dict:
    from transformers import LlamaForCausalLM

    from speechmapper_tune.assets import smollm2_dir
    from speechmapper_tune.generation import greedy_generate
    from speechmapper_tune.models.chat_format import ChatTokenizer
    from speechmapper_tune.models.llms import load_llm

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    path = smollm2_dir()
    model, _, _ = load_llm("smollm2_135m", path, dtype=dtype)
    hf = LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tok = ChatTokenizer.from_dir(path, chat_format="smollm2")
    embeds = [e.to(dtype) for e in _prompts(model, tok, args.batch, args.prompt_len)]
    width = max(e.shape[0] for e in embeds)
    inputs = torch.zeros(len(embeds), width, embeds[0].shape[1], dtype=dtype)
    attention = torch.zeros(len(embeds), width, dtype=torch.long)
    for i, e in enumerate(embeds):
        inputs[i, width - e.shape[0] :], attention[i, width - e.shape[0] :] = e, 1

    def ours(n):
        return [r.ids for r in greedy_generate(model, embeds, max_new_tokens=n)]

    def theirs(n):
        with torch.no_grad():
            out = hf.generate(
                inputs_embeds=inputs, attention_mask=attention, max_new_tokens=n, do_sample=False,
                eos_token_id=[], pad_token_id=tok.pad_id,
            )  # fmt: skip
        return out.tolist()

    n = args.new_tokens
    same = ours(n) == theirs(n)
    row = {"dtype": dtype_name, "same": same, "lens": (min(map(len, embeds)), width)}
    impls = {"ours": ours, "hf": theirs}
    # round robin, best of each: a slower spell of the machine hits every implementation alike
    times = {(name, k): [] for name in impls for k in (n, 1)}
    for fn in impls.values():
        fn(n)  # warm-up
    for _ in range(args.repeats):
        for name, fn in impls.items():
            for k in (n, 1):
                t0 = time.perf_counter()
                fn(k)
                times[name, k].append(time.perf_counter() - t0)
    for name in impls:
        total, prefill = min(times[name, n]), min(times[name, 1])
        row[name] = {
            "total_s": total,
            "prefill_s": prefill,
            "tok_s": args.batch * n / total,
            "decode_tok_s": args.batch * (n - 1) / max(total - prefill, 1e-9),
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=60)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--dtypes", default="fp32,bf16")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    load = os.getloadavg()[0]
    rows = [run(d, args) for d in args.dtypes.split(",")]
    print(
        f"Load average (1 min) {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} cores."
    )
    print(
        f"Machine: {machine_summary()}; "
        f"transformers {transformers.__version__}. SmolLM2-135M-Instruct, batch {args.batch}, prompts "
        f"{rows[0]['lens'][0]}-{rows[0]['lens'][1]} positions (left-padded), {args.new_tokens} new tokens, "
        f"greedy, no early stop; best of {args.repeats} rounds (implementations interleaved) after a warm-up.\n"
    )
    print(
        "| dtype | implementation | tokens/s (total) | prefill s | decode tokens/s | total s | same ids | vs transformers |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for name, label in (("ours", "greedy_generate"), ("hf", "transformers generate")):
            m = r[name]
            print(
                f"| {r['dtype']} | {label} | {m['tok_s']:.1f} | {m['prefill_s']:.3f} | "
                f"{m['decode_tok_s']:.1f} | {m['total_s']:.2f} | {'yes' if r['same'] else 'no'} | "
                f"{m['tok_s'] / r['hf']['tok_s']:.2f}x |"
            )


if __name__ == "__main__":
    main()
