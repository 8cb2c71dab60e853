"""What the command lines share: number types that refuse a value out of range where argparse
reads it, and a parser whose every complaint is one `error:` line and exit status 2.

    ap = flags.Parser(description="...")
    ap.add_argument("--steps", type=flags.count)    # "--steps 0" -> error: argument --steps: ...
"""
from __future__ import annotations

import argparse
import math
import sys


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line (no usage block) and exits with status 2."""

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def number(cast, low: float, high: float = math.inf, above: bool = False, what: str = ""):
    """An argparse type: cast(text), finite, at least low (above=True: more than low), at most
    high. Anything else is argparse's error for that flag, naming the value."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        fits = value > low if above else value >= low
        if not (math.isfinite(value) and fits and value <= high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


count = number(int, 1, what="a whole number >= 1")  # sizes, steps, samples
natural = number(int, 0, what="a whole number >= 0")  # seeds, indices, token budgets
positive = number(float, 0, above=True, what="a finite number > 0")  # learning rates, factors
nonnegative = number(float, 0, what="a finite number >= 0")  # penalties, temperatures
probability = number(float, 0, 1, above=True, what="a number in (0, 1]")  # top-p
