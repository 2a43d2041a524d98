"""Which transcript form does the frozen LLM read best? The text topline with written vs normalized text.

    .venv/bin/python bench/topline_text_form.py                  # dev and test sentences of corpus/tts_en
    .venv/bin/python bench/topline_text_form.py --splits dev --max-items 50

Stage 1 trains the projector to reproduce the LLM's embeddings of the transcript. The corpus stores
the transcript normalized (lowercase, no punctuation: what WER scores), a form the LLM rarely reads;
the engines read it as written (cased, punctuated). This puts each form's exact token embeddings in
the speech span (the text topline: the best any projector trained on that form can do) and decodes
with the same prompts and settings for both, scoring the normalized hypothesis against the
normalized reference. Prompts: the paper's zero-shot ASR prompt (table 11, first line kept) and the
IT prompt with the forced prefix "Transcript:" (the demo's). No audio is synthesized: the sentences
come from the corpus plan. Length limit per item: twice the reference's token count + 8 (the same
for both forms). Choose on dev; test is printed for the report.
"""

from __future__ import annotations

import argparse
import time

import jiwer
import torch
from omegaconf import OmegaConf

from speechmapper_tune.configs import resolve_config
from speechmapper_tune.corpus.plan import check_engines, make_plan
from speechmapper_tune.corpus.sentences import load_wordnet_sentences
from speechmapper_tune.corpus.settings import CorpusSettings
from speechmapper_tune.models.speech_lm import SpeechLM, zero_shot_prompt
from speechmapper_tune.text import normalize_text

IT_PROMPT = {
    "user": "Speech: {speech}\n{instruction}",
    "instruction": "Can you transcribe the Speech content?",
    "assistant_prefix": "Transcript:",
}


def planned_sentences(config: str):
    """(normalized, written) transcript pairs per split, as the corpus recipe would synthesize them."""
    settings = CorpusSettings.from_dict(OmegaConf.to_container(OmegaConf.load(resolve_config(config)), resolve=True))
    sentences, _ = load_wordnet_sentences(
        settings.wordnet_dir, settings.min_words, settings.max_words, settings.spell_out_numbers
    )
    check = check_engines(settings)
    plan = make_plan(sentences, settings, check.engines, check.voices)
    return {split: [(u.text, u.tts_text) for u in utts] for split, utts in plan.items()}


def topline_wer(lm: SpeechLM, pairs, form: str, batch_size: int) -> float:
    parts = lm.prompt_parts()
    hyps = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        spans = [lm.text_span(norm if form == "normalized" else written) for norm, written in chunk]
        caps = [2 * len(lm.chat.encode_text(norm)) + 8 for norm, _ in chunk]
        res = lm.generate(spans, [parts] * len(chunk), max_new_tokens=max(caps), max_new_tokens_per_item=caps)
        hyps += [normalize_text(lm.answer_text(r.ids)) for r in res]
    return 100 * jiwer.wer([norm for norm, _ in pairs], hyps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="corpus/tts_en")
    ap.add_argument("--splits", default="dev,test")
    ap.add_argument("--max-items", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="bf16")
    args = ap.parse_args()
    torch.manual_seed(0)
    plan = planned_sentences(args.corpus)
    zero_shot, one_line = zero_shot_prompt()
    llm = {"name": "smollm2_135m", "chat_format": "smollm2", "pad_id": 16, "dtype": args.dtype}
    print(f"SmolLM2-135M-Instruct ({args.dtype}), {args.corpus}, greedy; WER of the normalized hypothesis\n")
    print("| prompt | split | n | normalized text in the span | written text in the span |")
    print("|---|---|---|---|---|")
    for name, prompt, newline in (
        ("zero-shot (table 11)", zero_shot, one_line),
        ('IT + "Transcript:"', IT_PROMPT, True),
    ):
        lm = SpeechLM.from_checkpoint(None, llm=llm, prompt=prompt, stop_at_newline=newline)
        for split in args.splits.split(","):
            pairs = plan[split][: args.max_items]
            t0 = time.perf_counter()
            wer = {form: topline_wer(lm, pairs, form, args.batch_size) for form in ("normalized", "written")}
            print(
                f"| {name} | {split} | {len(pairs)} | {wer['normalized']:.1f} | {wer['written']:.1f} |"
                f"  <!-- {time.perf_counter() - t0:.0f} s -->",
                flush=True,
            )


if __name__ == "__main__":
    main()
