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
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path

USER_ERROR = 2  # the exit status of every user error, as argparse's own
INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT (128 + 2)


class UserError(Exception):
    """A mistake the user can mend (a bad flag, a missing file, a text too long): every CLI
    prints it as one `error:` line and exits with USER_ERROR, never with a traceback."""


_ctrl_c: list[int] = []  # the Ctrl-Cs of this run, whether or not their exception got through


def _on_ctrl_c(signum, frame):
    _ctrl_c.append(signum)
    raise KeyboardInterrupt


def check_interrupt():
    """Raise the KeyboardInterrupt of a Ctrl-C that was lost. Python drops (and prints) an
    exception raised inside a finalizer, and tinygrad frees its buffers in `__del__`: a Ctrl-C
    that lands there never reaches the loop. A long loop asks here once an iteration."""
    if _ctrl_c:
        raise KeyboardInterrupt


def _quiet_lost_ctrl_c(unraisable, shown):
    """sys.unraisablehook while a CLI runs: a Ctrl-C that a finalizer dropped is not printed
    (with its traceback) but left to check_interrupt; anything else is printed as always."""
    if not isinstance(unraisable.exc_value, KeyboardInterrupt):
        shown(unraisable)


def run(main, argv=None) -> int:
    """main(argv) -> its exit status, with the endings every CLI shares: a UserError is one
    `error:` line (USER_ERROR), Ctrl-C one `interrupted` line (INTERRUPTED), and a reader that
    closes the pipe early (`| head -2`) ends the run quietly."""
    _ctrl_c.clear()
    mine = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    hook = sys.unraisablehook
    if mine:  # Python's own handler, which also records the Ctrl-C for check_interrupt
        signal.signal(signal.SIGINT, _on_ctrl_c)
        sys.unraisablehook = partial(_quiet_lost_ctrl_c, shown=hook)
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
    finally:
        _ctrl_c.clear()  # this run's: a later loop outside run (a test's, a library's) goes on
        if mine:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            sys.unraisablehook = hook


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help names every flag's default, but not None, False or [] (they mean "not given", and
    the flag's help says in words what happens then)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help or ""
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
port = number(int, 0, 65535, what="a port number from 0 to 65535")  # --serve's; 0: any free one


def atomic_write(path, write):
    """Call write(file) on a temporary file beside path, then rename it into place: an
    interrupted run leaves the old file or none, never half a file. Returns path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


class Progress:
    """One line on stderr, redrawn with \\r: label, a bar, done/total in unit, percent, rate and
    time left (without a total: done and rate). update() redraws at most every REDRAW seconds,
    as a terminal cannot show more; finish() draws the last state and ends the line. scale
    divides what is shown (1e6: bytes as MB); start is what was done before (a resumed
    download), left out of the rate."""

    REDRAW = 0.1

    def __init__(self, label: str, total: int | None = None, unit: str = "", scale: float = 1,
                 start: int = 0):
        self.clock = time.monotonic
        self.label, self.total, self.unit, self.scale, self.start = label, total, unit, scale, start
        self.started, self.last_draw, self.width = self.clock(), -math.inf, 0

    def update(self, done: int, total: int | None = None):
        """Redraw if REDRAW seconds have passed; total, if given, sets the total; done == total
        finishes the line (so update alone can be a loop's progress callback)."""
        self.total = total if total is not None else self.total
        if done == self.total:
            self.finish(done)
        elif self.last_draw is not None and self.clock() - self.last_draw >= self.REDRAW:
            self.draw(done)

    def finish(self, done: int):
        if self.last_draw is None:
            return  # finished already: the line is ended
        self.draw(done)
        self.last_draw = None
        sys.stderr.write("\n")
        sys.stderr.flush()

    def draw(self, done: int):
        now = self.clock()
        self.last_draw = now
        rate = (done - self.start) / max(now - self.started, 1e-9)
        digits = 0 if self.scale == 1 else 1
        show = lambda n: f"{n / self.scale:.{digits}f}"
        speed = f"{rate / self.scale:.1f} {self.unit}/s".strip()
        if self.total:
            filled = min(20, 20 * done // self.total)
            left = (self.total - done) / rate if rate > 0 else math.inf
            clock = "--:--" if not math.isfinite(left) else "{}:{:02d}".format(
                *divmod(round(left), 60))
            text = (f"{self.label}: [{'#' * filled}{'.' * (20 - filled)}] {show(done)}/"
                    f"{show(self.total)} {self.unit} {100 * done / self.total:5.1f}%  {speed}  "
                    f"ETA {clock}")
        else:
            text = f"{self.label}: {show(done)} {self.unit}  {speed}"
        # padded to the widest line so far: a shorter line covers all of the one before
        self.width = max(self.width, len(text))
        sys.stderr.write("\r" + text.ljust(self.width))
        sys.stderr.flush()


def names(choices, what: str):
    """An argparse type: comma-separated names, each one of choices, e.g. "no-mask,no-residual"
    for --ablate. An unknown one is argparse's error for that flag, naming the choices."""

    def parse(text: str) -> list[str]:
        chosen = [name.strip() for name in text.split(",") if name.strip()]
        for name in chosen:
            if name not in choices:
                raise argparse.ArgumentTypeError(f"unknown {what} {name!r}; choose from "
                                                 f"{', '.join(choices)}")
        return chosen

    return parse


def existing_dir(text: str) -> Path:
    """An argparse type: a folder that exists (bench.py's --llama-cpp)."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return Path(text)
