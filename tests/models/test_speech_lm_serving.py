"""The serving path: SpeechLM.prompt_embeds is what an inputs-embeds server (vLLM's enable_prompt_embeds,
transformers' generate(inputs_embeds=...)) takes, and it decodes to the same ids as our generation."""

from __future__ import annotations

import glob

import pytest
import torch
from transformers import LlamaForCausalLM

from speechmapper_tune.assets import smollm2_dir
from speechmapper_tune.models.speech_lm import SpeechLM, load_wave

LIBRIVOX = sorted(glob.glob("/usr/share/pocketsphinx/test/data/librivox/*.wav"))


@pytest.mark.parametrize("instruction", [None, "What is the speaker talking about?"])
def test_prompt_embeds_decode_like_ours_in_transformers(instruction):
    if len(LIBRIVOX) != 5:
        pytest.fail("real speech not found: apt-get install -y pocketsphinx-testdata")
    lm = SpeechLM.from_pretrained("smollm2_135m_whisper_base_stage2_asr", llm={"dtype": "fp32"})
    t = lm.prompt_embeds(LIBRIVOX[1], instruction)
    parts = lm.prompt_parts(instruction)
    span = lm.speech_spans(lm.audio_features([load_wave(LIBRIVOX[1])]))[0]
    assert t.shape == (len(parts.prefix) + span.shape[0] + len(parts.suffix), 576) and t.dtype == torch.float32
    ours = lm.generate([span], [parts], max_new_tokens=24)[0]
    hf = LlamaForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(
            inputs_embeds=t[None],
            attention_mask=torch.ones(1, t.shape[0], dtype=torch.long),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=list(lm.chat.stop_ids),
            pad_token_id=lm.pad_id,
        )
    ids = out[0].tolist()
    if ids and ids[-1] in lm.chat.stop_ids:
        ids = ids[:-1]  # ours leaves the stop token out
    assert ids == ours.ids and ids, (lm.chat.decode(ids), lm.chat.decode(ours.ids))
