"""`tune run speechmapper_eet` on the tiny LLM: a noise-degree -> WER table is written."""

import json

import pytest
import torch

pytestmark = pytest.mark.e2e


def test_noise_injection_follows_algorithm_1():
    import importlib

    eet = importlib.import_module("speechmapper_eet")
    emb = torch.zeros(3, 1000)
    noisy = eet.noisy_embeddings(emb, 1e-2, torch.Generator().manual_seed(0))
    steps = torch.round(noisy / 1e-2)
    assert steps.min() == 1 and steps.max() == 9  # i * d with i uniform in 1..9, per dimension
    assert len(torch.unique(steps[0])) == 9
    assert eet.noisy_embeddings(emb, 0.0, torch.Generator()) is emb
    assert eet.first_line("\n\n  hello there\nmore") == "hello there"


def test_eet_table(tmp_path, tune):
    from speechmapper_tune.data.synthetic import WORDS
    from speechmapper_tune.models.tiny_llm import write_tiny_llm

    llm = write_tiny_llm(tmp_path / "llm", list(WORDS), dim=32)
    (tmp_path / "s.txt").write_text("red cat runs\nblue dog sleeps\nthe small bird sings\nquick fish eats\n")
    tune(
        [
            "run",
            "speechmapper_eet",
            "--config",
            "smollm2_135M/eet",
            f"output_dir={tmp_path}/o",
            "llm.name=hf_llama",
            f"llm.checkpoint={llm}",
            "llm.chat_format=chatml",
            f"sentences.source={tmp_path}/s.txt",
            "sentences.num_sentences=4",
            "noise_degrees=[0,0.1]",
            "max_new_tokens=6",
            "prompt.user=red <sentence>",
            "prompt.assistant_prefix=blue",
        ],
        cwd=tmp_path,
    )
    res = json.loads((tmp_path / "o" / "eet.json").read_text())
    assert set(res["wer"]) == {"0.0", "0.1"} and res["num_sentences"] == 4
    assert all(v >= 0 for v in res["wer"].values())
