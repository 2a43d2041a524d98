"""Text files read line by line, with an error naming the file and line of a byte that is not UTF-8.

Python's own decoding error gives a byte offset in a decoded buffer, not a line, so a file
saved as Latin-1 (say) cannot be fixed from it. Plain Python; ``.gz`` files are read through gzip.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Iterable, Iterator, Optional, Tuple


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _not_utf8(path: Path, lineno: int, e: UnicodeDecodeError) -> ValueError:
    byte = e.object[e.start : e.start + 1].hex()
    return ValueError(
        f"{path}, line {lineno}: not UTF-8 text (byte 0x{byte} at column {e.start + 1}); save the file as UTF-8"
    )


def read_lines(path) -> Iterator[Tuple[int, str]]:
    """``(line number, line without its newline)`` for each line of a UTF-8 text file."""
    path = Path(path)
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, lineno, e) from None


def numbered(path, lines: Iterable[str]) -> Iterator[Tuple[int, str]]:
    """``enumerate(lines, start=1)`` over a file opened as UTF-8 text, a decoding error naming its line."""
    try:
        yield from enumerate(lines, start=1)
    except UnicodeDecodeError as e:
        raise (first_non_utf8_line(path) or ValueError(f"{path}: not UTF-8 text ({e})")) from None


def first_non_utf8_line(path) -> Optional[ValueError]:
    """The error naming the first line that is not UTF-8, or None when the whole file is."""
    try:
        for _ in read_lines(path):
            pass
    except ValueError as e:
        return e
    return None
