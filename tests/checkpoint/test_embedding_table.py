"""load_embedding_table reads the embedding alone: right values, clear errors, and a peak
memory that does not grow with the number of decoder layers in the checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from speechmapper_tune.checkpoint.embedding_table import embedding_shape, load_embedding_table

REPO = Path(__file__).resolve().parents[2]
VOCAB, DIM = 4096, 512  # 8 MB fp32 embedding, as in a small LLM
LAYER_ROWS, LAYER_COLS = 2048, 1024  # two such tensors per layer: 16 MB per decoder layer
FEW, MANY = 2, 24  # decoder layers: ~40 MB vs ~400 MB checkpoints
MB = 2**20


def _embedding(vocab: int = VOCAB, dim: int = DIM, seed: int = 0) -> torch.Tensor:
    return torch.randn(vocab, dim, generator=torch.Generator().manual_seed(seed))


def _hf_state_dict(emb: torch.Tensor, n_layers: int, rows: int = LAYER_ROWS, cols: int = LAYER_COLS) -> dict:
    """HF names; layer values are cheap constants (only their size matters)."""
    sd = {"model.embed_tokens.weight": emb}
    for i in range(n_layers):
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = torch.full((rows, cols), float(i))
        sd[f"model.layers.{i}.mlp.down_proj.weight"] = torch.full((cols, rows), -float(i))
    sd["model.norm.weight"] = torch.ones(emb.shape[1])
    return sd


def _meta_state_dict(emb: torch.Tensor, n_layers: int, rows: int = LAYER_ROWS, cols: int = LAYER_COLS) -> dict:
    """Meta / torchtune names, as in consolidated.00.pth."""
    sd = {"tok_embeddings.weight": emb}
    for i in range(n_layers):
        sd[f"layers.{i}.feed_forward.w1.weight"] = torch.full((rows, cols), float(i))
        sd[f"layers.{i}.feed_forward.w2.weight"] = torch.full((cols, rows), -float(i))
    sd["norm.weight"] = torch.ones(emb.shape[1])
    return sd


def _write_sharded(folder: Path, sd: dict) -> Path:
    """Two shards + index; the embedding shares shard 1 with the first half of the layers."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(sd)
    half = len(keys) // 2 + 1
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for name, shard_keys in shards.items():
        save_file({k: sd[k] for k in shard_keys}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard_keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _write_all_formats(root: Path, emb: torch.Tensor, n_layers: int, **layer_shape) -> dict[str, Path]:
    """The same embedding as single safetensors (dir), sharded safetensors (dir) and a Meta .pth."""
    single = root / "single"
    single.mkdir(parents=True)
    hf = _hf_state_dict(emb, n_layers, **layer_shape)
    save_file(hf, str(single / "model.safetensors"), metadata={"format": "pt"})
    sharded = _write_sharded(root / "sharded", hf)
    del hf
    pth = root / "consolidated.00.pth"
    torch.save(_meta_state_dict(emb, n_layers, **layer_shape), pth)
    return {"safetensors": single, "sharded": sharded, "pth": pth}


# ---------------------------------------------------------------- peak memory, in subprocesses

# Before each step, resets VmHWM to the current RSS (Linux clear_refs "5"); prints each step's peak growth.
_MEASURE = r"""
import json, re, sys
import torch
from speechmapper_tune.checkpoint.embedding_table import embedding_shape, load_embedding_table

def kib(field):
    return int(re.search(field + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1))

def peak_growth(step):
    open("/proc/self/clear_refs", "w").write("5")
    before = kib("VmRSS")
    result = step()
    return kib("VmHWM") - before, result

peaks = {}
for arg in sys.argv[1:]:
    mode, path = arg.split("=", 1)
    if mode == "control":  # the naive torch.load (no mmap) reads every tensor: the measurement must see it
        peaks[mode] = peak_growth(lambda: torch.load(path, map_location="cpu", weights_only=True))[0]
        continue
    shape_kib, shape = peak_growth(lambda: embedding_shape(path))
    load_kib, table = peak_growth(lambda: load_embedding_table(path))
    assert tuple(table.shape) == shape, (table.shape, shape)
    peaks[mode] = [shape_kib, load_kib]
    del table
print(json.dumps(peaks))
"""


def _peaks_mb(**paths: Path) -> dict:
    """Peak RSS growth in MB of embedding_shape and load_embedding_table, per named path, in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # glibc: big blocks always mmap'd and returned on free, so
    # one step's freed table is not reused by the next: each step is measured as in a fresh process
    args = [f"{name}={path}" for name, path in paths.items()]
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    kib = json.loads(proc.stdout)
    return {name: (v / 1024 if isinstance(v, int) else tuple(x / 1024 for x in v)) for name, v in kib.items()}


def _clear_refs_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def peaks():
    """Writes FEW- and MANY-layer checkpoints in every format (~1.2 GB, deleted after), measures them."""
    if not _clear_refs_works():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    root = Path(tempfile.mkdtemp(prefix="embedding_ckpts_"))
    try:
        emb = _embedding()
        result = {}
        for n in (FEW, MANY):
            paths = _write_all_formats(root / f"layers{n}", emb, n)
            control = {"control": paths["pth"]} if n == MANY else {}
            result[n] = _peaks_mb(**paths, **control)
            shutil.rmtree(root / f"layers{n}")  # at most ~400 MB on disk at a time
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("fmt", ["safetensors", "sharded", "pth"])
def test_peak_memory_does_not_grow_with_layers(peaks, fmt):
    (shape_few, load_few), (shape_many, load_many) = peaks[FEW][fmt], peaks[MANY][fmt]
    size_gap_mb = (MANY - FEW) * 2 * LAYER_ROWS * LAYER_COLS * 4 / MB  # 352 MB of extra layers
    print(
        f"{fmt}: load peak {load_few:.1f} MB ({FEW} layers) vs {load_many:.1f} MB ({MANY} layers); "
        f"shape peak {shape_few:.1f} / {shape_many:.1f} MB; size gap {size_gap_mb:.0f} MB"
    )
    assert load_many - load_few < 40, (load_few, load_many)
    assert load_many < 4 * VOCAB * DIM * 4 / MB, load_many  # a few copies of the 8 MB table at most
    assert shape_many < 4, shape_many  # metadata only: the 8 MB table is not paged in


def test_peak_memory_measurement_catches_a_full_read(peaks):
    """Control: a plain torch.load of the MANY-layer .pth reads every tensor (~390 MB), and the harness sees it."""
    print(f"control: plain torch.load peak {peaks[MANY]['control']:.1f} MB")
    assert peaks[MANY]["control"] > 300, peaks[MANY]["control"]


# ---------------------------------------------------------------- values and layouts (small files)


@pytest.fixture
def small(tmp_path):
    emb = _embedding(vocab=64, dim=16, seed=1)
    return emb, _write_all_formats(tmp_path, emb, 3, rows=8, cols=4)


def test_values_from_every_format_and_entry_point(small):
    emb, made = small
    entry_points = [
        made["safetensors"],
        made["safetensors"] / "model.safetensors",
        made["sharded"],
        made["sharded"] / "model.safetensors.index.json",
        made["pth"],
    ]
    for path in entry_points:
        table = load_embedding_table(path)
        assert table.dtype == torch.float32
        assert torch.equal(table, emb), path
        assert embedding_shape(path) == (64, 16), path


def test_sharded_opens_only_the_embedding_shard(small):
    emb, made = small
    (made["sharded"] / "model-00002-of-00002.safetensors").write_bytes(b"not a safetensors file")
    assert torch.equal(load_embedding_table(made["sharded"]), emb)


def test_meta_original_layout_and_pytorch_bin_index(tmp_path):
    emb = _embedding(vocab=32, dim=8, seed=2)
    (tmp_path / "meta" / "original").mkdir(parents=True)
    torch.save(_meta_state_dict(emb, 1, rows=4, cols=2), tmp_path / "meta" / "original" / "consolidated.00.pth")
    assert torch.equal(load_embedding_table(tmp_path / "meta"), emb)
    # HF pytorch_model.bin shards: the other shard is garbage and must never be read.
    hf = tmp_path / "hf_bin"
    hf.mkdir()
    torch.save({"model.embed_tokens.weight": emb}, hf / "pytorch_model-00001-of-00002.bin")
    (hf / "pytorch_model-00002-of-00002.bin").write_bytes(b"garbage")
    weight_map = {
        "model.embed_tokens.weight": "pytorch_model-00001-of-00002.bin",
        "model.norm.weight": "pytorch_model-00002-of-00002.bin",
    }
    (hf / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(load_embedding_table(hf), emb)
    assert embedding_shape(hf) == (32, 8)


def test_dtype_conversion(tmp_path):
    emb = _embedding(vocab=16, dim=8, seed=3).to(torch.bfloat16)
    save_file({"tok_embeddings.weight": emb}, str(tmp_path / "model.safetensors"))
    assert load_embedding_table(tmp_path, dtype=None).dtype == torch.bfloat16
    table = load_embedding_table(tmp_path)
    assert table.dtype == torch.float32 and torch.equal(table, emb.float())


@pytest.mark.parametrize("name", ["model.safetensors", "consolidated.00.pth"])
def test_result_is_a_copy_not_a_view_of_the_file(tmp_path, name):
    emb = _embedding(vocab=16, dim=8, seed=5)
    file = tmp_path / name
    if file.suffix == ".safetensors":
        save_file({"tok_embeddings.weight": emb}, str(file))
    else:
        torch.save({"tok_embeddings.weight": emb}, file)
    table = load_embedding_table(file, dtype=None)  # same dtype: no conversion copy to hide a view
    with open(file, "r+b") as f:  # overwrite in place: a view onto the mmap would now read zeros
        f.write(bytes(file.stat().st_size))
    assert torch.equal(table, emb)


def test_explicit_key(tmp_path):
    emb = _embedding(vocab=16, dim=8, seed=4)
    save_file({"lm.embed.weight": emb, "other": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    assert torch.equal(load_embedding_table(tmp_path, key="lm.embed.weight"), emb)


# ---------------------------------------------------------------- errors


def test_missing_key_lists_available_keys(small):
    _, made = small
    for path in (made["safetensors"], made["sharded"], made["pth"]):
        with pytest.raises(KeyError) as err:
            load_embedding_table(path, key="nope.weight")
        message = str(err.value)
        assert "'nope.weight'" in message and str(path) in message
        assert "layers.0." in message  # the available keys are listed
    save_file({"foo": torch.zeros(2, 2)}, str(made["safetensors"] / "model.safetensors"))
    tried_then_listed = r"model\.embed_tokens\.weight.*tok_embeddings\.weight.*available keys \(1\): foo"
    with pytest.raises(KeyError, match=tried_then_listed):
        embedding_shape(made["safetensors"])


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_embedding_table(tmp_path / "no_such_model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_embedding_table(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": "gone.safetensors"}})
    )
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        load_embedding_table(tmp_path / "broken")


def test_not_a_matrix_is_rejected(tmp_path):
    save_file({"tok_embeddings.weight": torch.zeros(4)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="expected \\[vocab, dim\\]"):
        load_embedding_table(tmp_path)
