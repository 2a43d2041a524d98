"""Multi-process generation outputs: rank part files merged into the one-process files."""

import json

from speechmapper_tune.data.generation_data import (
    GENERATIONS,
    NOT_GENERATED,
    SETTINGS,
    merge_parts,
    part_file,
    start_run,
)


def _write(path, rows, torn=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + torn)


def _ids(path):
    return [json.loads(l)["id"] for l in path.read_text().splitlines()]


def test_merge_parts_in_manifest_order_each_id_once(tmp_path):
    _write(tmp_path / GENERATIONS, [{"id": "a"}], torn='{"id": "to')  # merged before a kill, torn line after
    _write(part_file(tmp_path, GENERATIONS, 0), [{"id": "e"}, {"id": "c"}])
    _write(part_file(tmp_path, GENERATIONS, 1), [{"id": "a"}, {"id": "d"}, {"id": "b"}], torn='{"id": "f"')
    _write(part_file(tmp_path, NOT_GENERATED, 1), [{"id": "x", "reason": "NaN features"}])
    assert merge_parts(tmp_path, order=["a", "b", "c", "d", "e", "f"]) == 4
    assert _ids(tmp_path / GENERATIONS) == ["a", "b", "c", "d", "e"]  # "a" not twice, torn "f" dropped
    assert _ids(tmp_path / NOT_GENERATED) == ["x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([GENERATIONS, NOT_GENERATED])


def test_merge_without_parts_writes_nothing_and_overwrite_removes_parts(tmp_path):
    assert merge_parts(tmp_path) == 0 and not list(tmp_path.iterdir())
    _write(part_file(tmp_path, GENERATIONS, 1), [{"id": "a"}])
    start_run(tmp_path, {"k": 1})  # parts of the same settings stay, to be merged
    assert part_file(tmp_path, GENERATIONS, 1).is_file()
    start_run(tmp_path, {"k": 2}, overwrite=True)
    assert not part_file(tmp_path, GENERATIONS, 1).exists()


def test_restart_if_changed_starts_over_only_on_other_settings(tmp_path):
    """A shipped projector replaced since the last run (the demo): its rows go, rows of the same settings stay."""
    import pytest

    start_run(tmp_path, {"projector": {"step": 2000}})
    _write(tmp_path / GENERATIONS, [{"id": "a"}])
    assert start_run(tmp_path, {"projector": {"step": 2000}}, restart_if_changed=True) == []
    assert _ids(tmp_path / GENERATIONS) == ["a"]  # same settings: resumed
    with pytest.raises(ValueError, match=r"other settings \(projector.step: 2000 -> 5500\)"):
        start_run(tmp_path, {"projector": {"step": 5500}})  # without it: the error, nothing deleted
    assert _ids(tmp_path / GENERATIONS) == ["a"]
    changed = start_run(tmp_path, {"projector": {"step": 5500}}, restart_if_changed=True)
    assert changed == ["projector.step: 2000 -> 5500"] and not (tmp_path / GENERATIONS).exists()
    assert json.loads((tmp_path / SETTINGS).read_text()) == {"projector": {"step": 5500}}
