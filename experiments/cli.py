"""What the command lines of experiments/ share: how a hint names this interpreter, and Ctrl-C in one
line wherever it lands (start-up imports included).

A hint a user is meant to paste names the interpreter running now (`.venv/bin/python` in a checkout
set up by `make`), not a bare `python` that may lack the project's packages.
"""
from __future__ import annotations

import os
import sys
from typing import Callable


def interpreter() -> str:
    """This interpreter as a user would type it: relative to the current folder when it lies inside
    it (`.venv/bin/python`), else its absolute path (symlinks kept: a venv's python is one)."""
    exe = sys.executable or "python3"
    try:
        rel = os.path.relpath(exe)
    except ValueError:          # another drive (Windows)
        return exe
    return exe if rel.startswith("..") else rel


def command(module_and_args: str) -> str:
    """`<this interpreter> -m <module_and_args>`: a command a hint can print."""
    return f"{interpreter()} -m {module_and_args}"


def run(name: str, main: Callable[[], int | None]) -> int:
    """main() for `python -m ...`: its exit status, and Ctrl-C (during start-up imports too: main
    imports what is heavy) as one line on stderr and status 130 instead of a traceback."""
    try:
        return int(main() or 0)
    except KeyboardInterrupt:
        print(f"[{name}] interrupted (Ctrl-C)", file=sys.stderr, flush=True)
        return 130
