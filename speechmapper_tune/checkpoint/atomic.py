"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename.

A job killed mid-write leaves the previous good file (or none), never a truncated one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, os.PathLike]
log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; the final file gets normal permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class MetricsFile:
    """``metrics.jsonl``: one JSON object per logged step, consistent with the checkpoint resumed.

    Opening it at ``resumed_step > 0`` drops the lines logged after that step (they belong to
    the part of the run that is being redone), so a resumed run's file equals an uninterrupted one.
    """

    def __init__(self, path: PathLike, resumed_step: int = 0):
        self.path = Path(path)
        kept = []
        if self.path.is_file() and resumed_step > 0:
            kept = [l for l in self._read_lines() if json.loads(l)["step"] <= resumed_step]
        atomic_write_text(self.path, "".join(l + "\n" for l in kept))

    def _read_lines(self) -> list:
        """The file's lines; a torn last line (the job died mid-append) is dropped with a warning."""
        lines = [l for l in self.path.read_text(encoding="utf-8").splitlines() if l.strip()]
        for i, line in enumerate(lines):
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                if i < len(lines) - 1:
                    raise ValueError(
                        f"{self.path}:{i + 1} is not a JSON line ({err}): fix or remove it to resume"
                    ) from err
                log.warning(f"{self.path}: dropping its unreadable last line (a job killed while writing it): {line!r}")
                return lines[:-1]
        return lines

    def append(self, step: int, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
