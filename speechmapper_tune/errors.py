"""A recipe's error as its user needs it: the message first, in one line; the traceback only when asked.

    sys.exit(run_recipe("speechmapper_adapt", resolve_config_argv, recipe_main))

A wrong setting (``lr: fast``, a missing manifest) raised deep inside a recipe used to end a 28-line
traceback; now ``speechmapper_adapt: error: <message>`` (or the message as is, when it begins with the
recipe's name) comes first and alone, with the exception's
type and how to see the traceback (``SPEECHMAPPER_DEBUG=1``) on the line after.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any, Callable

DEBUG_ENV = "SPEECHMAPPER_DEBUG"


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_recipe(name: str, *steps: Callable[[], Any]) -> Any:
    """Call ``steps`` in order and return the last one's result; an exception prints ``NAME: error: message``
    first (the traceback after it with ``SPEECHMAPPER_DEBUG=1``) and returns exit status 1."""
    result = None
    try:
        for step in steps:
            result = step()
    except Exception as e:  # noqa: BLE001  (every error a recipe raises is reported the same way)
        message = str(e).strip() or repr(e)
        # config_schema's messages name the recipe already: "speechmapper_adapt: unknown setting ..."
        print(message if message.startswith(f"{name}: ") else f"{name}: error: {message}", file=sys.stderr, flush=True)
        if debugging():
            traceback.print_exc()
        else:
            print(f"{name}: ({type(e).__name__}; set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr, flush=True)
        return 1
    return result


def error_summary(e: BaseException, limit: int = 300) -> str:
    """An exception's message in one line: its lines joined, so lhotse's "failed. Details:" keeps the details
    that follow on the next lines (the first line alone ended in an empty "Details:"); at most ``limit`` characters."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
