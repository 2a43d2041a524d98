"""Per-item recipes under `tune run --nproc_per_node 2`: generate splits its items between the
processes and writes each once; eval and eet refuse to run in several processes."""

import json

import pytest
from documented_variants import fixture_config

pytestmark = pytest.mark.e2e


def _gen(tune, trained, out, *extra, nproc=1):
    launch = ["run", "--nproc_per_node", str(nproc)] if nproc > 1 else ["run"]
    return tune(
        [
            *launch,
            "speechmapper_generate",
            "--config",
            fixture_config("tiny/generate"),
            f"projector_checkpoint={trained}/checkpoints/step_20",
            f"manifest={trained}/data/val.jsonl.gz",
            f"llm.checkpoint={trained}/data/llm",
            f"output_dir={out}",
            *extra,
        ],
        cwd=trained,
    )


def _rows(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_two_processes_write_each_item_once_and_resume(tmp_path, tune, trained):
    one, two = tmp_path / "one", tmp_path / "two"
    _gen(tune, trained, one, "max_items=9")
    proc = _gen(tune, trained, two, "max_items=9", nproc=2)
    out = proc.stdout + proc.stderr
    assert "rank 0 of 2 generates 5" in out and "rank 1 of 2 generates 4" in out
    rows, reference = _rows(two / "generations.jsonl"), _rows(one / "generations.jsonl")
    assert [r["id"] for r in rows] == [r["id"] for r in reference]  # each once, in manifest order
    assert {r["id"]: r["hypothesis"] for r in rows} == {r["id"]: r["hypothesis"] for r in reference}
    assert not list(two.glob("*.rank*.jsonl"))
    assert (two / "not_generated.jsonl").read_text() == (one / "not_generated.jsonl").read_text()
    assert json.loads((two / "generation_settings.json").read_text()) == json.loads(
        (one / "generation_settings.json").read_text()
    )

    # a killed 2-process run: 3 merged rows, 2 rows in rank 1's part, then a torn line
    lines = (two / "generations.jsonl").read_text().splitlines()
    (two / "generations.jsonl").write_text("\n".join(lines[:3]) + "\n")
    (two / "generations.rank1.jsonl").write_text("\n".join(lines[5:7]) + "\n" + lines[7][:15])
    proc = _gen(tune, trained, two, "max_items=9", nproc=2)
    assert "9 items (5 already generated" in proc.stdout + proc.stderr
    resumed = _rows(two / "generations.jsonl")
    assert sorted(r["id"] for r in resumed) == sorted(r["id"] for r in reference) and len(resumed) == 9
    assert not list(two.glob("*.rank*.jsonl"))


def test_eval_and_eet_refuse_several_processes(tmp_path, tune):
    gen = tmp_path / "g.jsonl"
    gen.write_text(
        json.dumps({"id": "a", "task": "asr", "reference": "a cat", "hypothesis": "a cat", "flags": []}) + "\n"
    )
    proc = tune(
        [
            "run",
            "--nproc_per_node",
            "2",
            "speechmapper_eval",
            "--config",
            "eval/default",
            f"output_dir={tmp_path}/ev",
            f"generations={{g: {gen}}}",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0 and "speechmapper_eval runs in one process" in proc.stdout + proc.stderr
    assert not (tmp_path / "ev").exists()
    proc = tune(
        [
            "run",
            "--nproc_per_node",
            "2",
            "speechmapper_eet",
            "--config",
            "smollm2_135M/eet",
            f"output_dir={tmp_path}/eet",
        ],
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0 and "speechmapper_eet runs in one process" in proc.stdout + proc.stderr


def test_two_processes_on_an_audio_manifest(tmp_path, tune):
    """Features made first (rank 0 merges the chunks the ranks made), then the items split."""
    import glob

    files = sorted(glob.glob("/usr/share/pocketsphinx/test/data/librivox/*.wav"))[:3]
    if len(files) != 3:
        pytest.fail("real speech not found: apt-get install -y pocketsphinx-testdata")
    rows = [{"id": f"utt{i}", "audio": f} for i, f in enumerate(files)] + [
        {"id": "bad", "audio": str(tmp_path / "gone.wav")}
    ]
    (tmp_path / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tune(
        [
            "run",
            "--nproc_per_node",
            "2",
            "speechmapper_generate",
            "--config",
            "smollm2_135M/generate",
            f"manifest={tmp_path}/mine.jsonl",
            "projector_checkpoint=smollm2_135m_whisper_base_stage2_asr",
            f"output_dir={tmp_path}/gen",
            "max_new_tokens=10",
            "stop_at_newline=True",
        ],
        cwd=tmp_path,
    )
    assert [r["id"] for r in _rows(tmp_path / "gen" / "generations.jsonl")] == ["utt0", "utt1", "utt2"]
    assert [r["id"] for r in _rows(tmp_path / "gen" / "not_generated.jsonl")] == ["bad"]
    assert not list((tmp_path / "gen").glob("*.rank*.jsonl"))
