"""What the command lines share: one exception for the user's mistakes, one way to end (an
`error:` line and exit status 2; Ctrl-C one line and 130; a closed pipe quietly), number types
that refuse a value out of range where argparse reads it, and a parser that says so in one line.

    ap = flags.Parser(description="...")
    ap.add_argument("--steps", type=flags.count)    # "--steps 0" -> error: argument --steps: ...
    raise flags.UserError("no checkpoint at models/x.safetensors: train one first")
"""
from __future__ import annotations

import argparse
import math
import os
import sys

USER_ERROR = 2  # the exit status of every user error, as argparse's own
INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT (128 + 2)


class UserError(Exception):
    """A mistake the user can mend (a bad flag, a missing file, a text too long): every CLI
    prints it as one `error:` line and exits with USER_ERROR, never with a traceback."""


def run(main, argv=None) -> int:
    """main(argv) -> its exit status, with the endings every CLI shares: a UserError is one
    `error:` line (USER_ERROR), Ctrl-C one `interrupted` line (INTERRUPTED), and a reader that
    closes the pipe early (`| head -2`) ends the run quietly."""
    try:
        return main(argv) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # nobody reads stdout any more: point it at /dev/null so the final flush cannot fail
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help names every flag's default, but not "None" (the flag's help says what happens
    without it) nor a switch's False."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line (no usage block) and exits with USER_ERROR, and
    --help shows every flag's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelp)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(USER_ERROR)


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
