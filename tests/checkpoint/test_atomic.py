import json
import re

import pytest

from speechmapper_tune.checkpoint.atomic import MetricsFile


def _write(path, steps, tail=""):
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in steps) + tail)


def _steps(path):
    return [json.loads(l)["step"] for l in path.read_text().splitlines()]


def test_resume_keeps_the_lines_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [1, 2, 3, 4])
    MetricsFile(path, resumed_step=2).append(3, {"loss": 0.5})
    assert _steps(path) == [1, 2, 3]
    MetricsFile(path, resumed_step=0)  # a fresh start
    assert path.read_text() == ""


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    _write(path, [1, 2, 3], tail='{"step": 4, "lo')  # the job died mid-append
    MetricsFile(path, resumed_step=10)
    assert _steps(path) == [1, 2, 3]
    assert str(path) in caplog.text


def test_an_unreadable_line_before_the_last_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, [1], tail="not json\n" + json.dumps({"step": 2}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2")):
        MetricsFile(path, resumed_step=10)
