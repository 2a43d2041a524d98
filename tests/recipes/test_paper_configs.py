"""The paper configs check themselves against a checkpoint's embedding shape in a dry run."""

import json
import struct

import pytest
from documented_variants import shell_variables

pytestmark = pytest.mark.e2e
EUROLLM = shell_variables()["EUROLLM"].split()  # docs/recipes.md: EuroLLM-9B-Instruct is llama3_1_8B/* with these


def sparse_safetensors(path, key, shape, dtype="BF16", itemsize=2):
    """A real safetensors file whose data section is a hole: header-only reads cost no disk."""
    nbytes = shape[0] * shape[1] * itemsize
    header = json.dumps({key: {"dtype": dtype, "shape": list(shape), "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + nbytes)


@pytest.mark.parametrize("llm, vocab", [("llama3_1_8b", 128256), ("eurollm_9b", 128000)])
def test_paper_config_dry_run(tmp_path, tune, llm, vocab):
    ckpt = tmp_path / "llm"
    ckpt.mkdir()
    sparse_safetensors(ckpt / "model.safetensors", "model.embed_tokens.weight", (vocab, 4096))
    proc = tune(
        [
            "run",
            "speechmapper_pretrain",
            "--config",
            "llama3_1_8B/stage1",
            *(EUROLLM if llm == "eurollm_9b" else []),
            f"llm.checkpoint={ckpt}",
            "device=cpu",
            "dry_run=True",
            f"output_dir={tmp_path}/o",
        ],
        cwd=tmp_path,
    )
    info = json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][-1])
    assert info["vocab_size"] == vocab and info["llm_dim"] == 4096
    assert 279.0e6 < info["parameters"] < 279.2e6


def test_paper_config_refuses_a_checkpoint_of_another_width(tmp_path, tune):
    ckpt = tmp_path / "llm"
    ckpt.mkdir()
    sparse_safetensors(ckpt / "model.safetensors", "model.embed_tokens.weight", (49152, 576))
    proc = tune(
        [
            "run",
            "speechmapper_pretrain",
            "--config",
            "llama3_1_8B/stage1",
            f"llm.checkpoint={ckpt}",
            "device=cpu",
            "dry_run=True",
            f"output_dir={tmp_path}/o",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "llm.pad_id=128004 is outside the vocabulary" in proc.stderr
