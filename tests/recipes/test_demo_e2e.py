"""The demo's whole path, reduced: a few sentences, a few steps, every phase a real `tune run`."""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e


@pytest.mark.skipif(
    shutil.which("espeak-ng") is None or shutil.which("flite") is None or shutil.which("festival") is None,
    reason="TTS engines missing (make sysdeps)",
)
def test_reduced_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "speechmapper_tune.demo",
        "--out",
        str(out),
        "--sentences",
        "train=20,dev=2,test=4",
        "--stage1-steps",
        "3",
        "--stage2-steps",
        "2",
        "--max-items",
        "2",
        "--splits",
        "test,real",
    ]  # dev's generation runs the same commands as test's
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    from speechmapper_tune import pretrained
    from speechmapper_tune.demo import SHIPPED, SHIPPED_STAGE1

    systems = {"topline", "cascade", "stage1", "stage2", "topline_zeroshot"} | {
        k for k, name in SHIPPED.items() if name in pretrained.available()
    }
    systems |= {"shipped_stage1"} if SHIPPED_STAGE1 in pretrained.available() else set()
    got = {(r["split"], r["system"]) for r in res["rows"]}
    assert got == {(s, m) for s in ("test", "real") for m in systems}
    assert all(r["wer"] is not None and r["cer"] is not None and r["stuck"] is not None for r in res["rows"])
    assert {"corpus", "features", "stage1", "stage2", "generation", "evaluation", "total"} <= set(res["wall_seconds"])
    assert {k: v["n"] for k, v in res["unseen_instruction_probe"].items()} == {
        m: 2 for m in systems & {"stage2", "shipped"}
    }
    # the from-scratch run's learning summary: first and last validation of the loss and the diagnostic
    assert {"val_loss", "val_token_acc"} <= set(res["training"]["stage1"])
    assert set(res["training"]["stage2"]) == {"val_ce", "val_mse"}
    for f in ("RESULTS.md", "loss_curves.png", "wer.png"):
        assert (out / f).stat().st_size > 0
    assert "| test | cascade |" in (out / "RESULTS.md").read_text()
    # speech translation into French: test=4 draws the first of the default corpus's test sentences, which have references
    st = {(r["split"], r["system"]): r for r in res["st_rows"]}
    assert set(st) == {("test", m) for m in {"topline", "cascade", "stage2"} | ({"shipped"} & systems)}
    assert all(
        r["n"] == 2 and r["bleu"] is not None and r["chrf"] is not None and r["french_share"] is not None
        for r in st.values()
    )
    assert "English -> French" in (out / "RESULTS.md").read_text()
    # held-out instructions on test: agreement with the transcript-fed answers, and the chance level beside it
    agree = {r["system"]: r for r in res["agreement_rows"]}
    assert set(agree) == {"stage2", "cascade"} | ({"shipped"} & systems)
    assert all(r["split"] == "test" and r["n"] == 2 and r["agreement_chrf"] is not None for r in agree.values())
    assert all(r["chance_chrf"] is not None for r in agree.values())
    assert "Held-out instructions" in (out / "RESULTS.md").read_text()
    row = json.loads((out / "generations" / "st_topline_test" / "generations.jsonl").read_text().splitlines()[0])
    assert (
        row["task"] == "st" and row["target_lang"] == "fr" and "Peux-tu traduire" in row["prompt"]
    )  # the row's instruction
