"""Stage-2 training step: ours (torchtune decoder) vs a plain transformers loop, same batches.

    .venv/bin/python bench/stage2.py [--steps 4] [--batch 8] [--device cpu]

Both sides: the small projector (trainable) on Whisper-base-sized features, the frozen real
SmolLM2-135M-Instruct, a prompt of ~40 tokens + speech span + a ~20-token response, CE on the
response, AdamW on the projector. Ours assembles the sequence with the project's injector and
runs torchtune's TransformerDecoder through ``forward_embeds`` with logits at the label
positions only, as ``speechmapper_adapt`` does; the alternative a user would write runs
``LlamaForCausalLM(inputs_embeds=...)`` and takes the CE over the full logits. A third row gives
transformers the same label-positions trick (``model.model`` + ``lm_head`` on the selected
hidden states), to separate that trick from the decoder implementation. Each measurement runs in a
fresh subprocess (peak RSS is its own). Tokens/s counts every sequence position (text + speech).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(impl: str, dtype: str, steps: int, batch: int, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    from speechmapper_tune.assets import smollm2_dir
    from speechmapper_tune.data.stage2 import assemble_batch
    from speechmapper_tune.losses import IGNORE_INDEX
    from speechmapper_tune.models.injector import inject_speech
    from speechmapper_tune.models.projector import speechmapper_small

    torch.manual_seed(0)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    projector = speechmapper_small().to(device)
    opt = torch.optim.AdamW(projector.parameters(), lr=1e-4)
    if impl == "ours":
        from speechmapper_tune.models.llms import embed_tokens, forward_embeds, load_llm

        llm, _, _ = load_llm("smollm2_135m", smollm2_dir(), dtype=dt, device=device)

        def logits_of(ids, speech, asm, positions):
            emb = inject_speech(embed_tokens(llm, ids), speech, asm.speech_starts, asm.speech_lengths)
            return forward_embeds(llm, emb, positions=positions)
    else:
        from transformers import LlamaForCausalLM

        llm = LlamaForCausalLM.from_pretrained(smollm2_dir(), torch_dtype=dt).to(device).eval()
        for p in llm.parameters():
            p.requires_grad_(False)

        def logits_of(ids, speech, asm, positions):
            emb = inject_speech(llm.get_input_embeddings()(ids), speech, asm.speech_starts, asm.speech_lengths)
            if impl == "transformers_label_positions":
                return llm.lm_head(llm.model(inputs_embeds=emb).last_hidden_state[positions]).float()
            return llm(inputs_embeds=emb).logits

    g = torch.Generator().manual_seed(1)
    frames = [int(x) for x in torch.randint(120, 240, (batch,), generator=g)]  # 5-10 s at 25 frames/s
    feats = torch.randn(batch, max(frames), 512, generator=g)
    lengths = torch.tensor(frames)
    prefix = [list(range(100, 130))] * batch
    suffix = [list(range(200, 212))] * batch
    response = [list(range(300, 300 + int(n))) + [2] for n in torch.randint(12, 28, (batch,), generator=g)]

    def step():
        speech, out_len = projector(feats.to(device), lengths.to(device))
        asm = assemble_batch(prefix, suffix, response, out_len.tolist(), 16, 2)
        ids = asm.input_ids.to(device)
        labels = asm.labels.to(device)
        positions = F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)  # position t predicts label t+1
        if impl == "transformers":
            logits = logits_of(ids, speech, asm, None)
            loss = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
            )
        else:
            loss = F.cross_entropy(logits_of(ids, speech, asm, positions), labels[:, 1:][positions[:, :-1]])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(asm.input_ids.numel()), float(loss)

    step()
    t = time.perf_counter()
    tokens, losses = 0, []
    for _ in range(steps):
        n, l = step()
        tokens += n
        losses.append(l)
    wall = time.perf_counter() - t
    return {
        "step_s": wall / steps,
        "tokens_per_s": tokens / wall,
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_loss": losses[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(**json.loads(a.child))))
        return
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from stage1 import machine

    print(f"Machine: {machine()}; batch {a.batch}, {a.steps} timed steps after 1 warm-up\n")
    print("| LLM dtype | implementation | step (s) | tokens/s | peak RSS (MB) | first loss | ours / transformers |")
    print("|---|---|---|---|---|---|---|")
    for dtype in ("fp32", "bf16"):
        res = {}
        for impl in ("ours", "transformers", "transformers_label_positions"):
            args = dict(impl=impl, dtype=dtype, steps=a.steps, batch=a.batch, device=a.device)
            out = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True
            )
            if out.returncode != 0:
                print(f"| {dtype} | {impl} | error: {out.stderr.strip().splitlines()[-1]} |")
                continue
            res[impl] = r = json.loads(out.stdout.strip().splitlines()[-1])
            ratio = (
                f"{res['ours']['tokens_per_s'] / r['tokens_per_s']:.2f}x" if impl != "ours" and "ours" in res else ""
            )
            print(
                f"| {dtype} | {impl} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_rss_MB']:.0f} | {r['first_loss']:.3f} | {ratio} |"
            )


if __name__ == "__main__":
    main()
