"""Small helpers shared by the command-line tools."""

from __future__ import annotations

import argparse
import math
import sys


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def fail(prog: str, exc: BaseException) -> int:
    """Print a one-line error (no traceback) and return exit status 1."""
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 1


def progress_printer(verb: str):
    """A callback ``(done, total, entities)`` that prints one line per finished item to stderr."""

    def show(done: int, total: int, entities: dict) -> None:
        label = " ".join(f"{k}-{v}" for k, v in entities.items() if v is not None)
        print(f"[{done}/{total}] {verb} {label}", file=sys.stderr, flush=True)

    return show
