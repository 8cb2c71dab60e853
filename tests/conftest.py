"""What every test file shares: the repository on sys.path, and a CLI run inside this process.

A subprocess of `python transformer.py ...` spends most of its time on start-up (importing
tinygrad, opening the device) and on scheduling and compiling kernels that this process has
already compiled. run_main calls the CLI's main() here instead, with its output captured, and
hands back what a subprocess would: the exit status, stdout and stderr, and a traceback written
to stderr as Python would write it. Each CLI keeps at least one true subprocess run in its tests.
"""
import contextlib
import io
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# Before tinygrad is imported: the tests run on clang's CPU backend, for which the kernel counts
# are pinned, unless DEV says else; and a CLI run in this process then leaves the device alone.
os.environ.setdefault("DEV", "CPU")
# GPT-2's byte-pair ranks from ../shared, so no test needs the network for the tokenizer
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(REPO.parent / "shared" / "tiktoken"))
# The tests run as the CLIs do, with runtime.py's pieces installed; TINYGPT_PLAIN=1 runs them all
# on tinygrad alone (install() then installs nothing)
import runtime  # noqa: E402

runtime.install()
PLAIN = not runtime.INSTALLED


def run_main(main, *args, stdin: bytes = b"", text: bool = True) -> subprocess.CompletedProcess:
    """main(args) in this process, as `python SCRIPT ARGS` would run it: stdin fed from the given
    bytes, stdout and stderr captured (as str, or bytes with text=False)."""
    out, err = io.BytesIO(), io.BytesIO()
    streams = [io.TextIOWrapper(b, encoding="utf-8", write_through=True) for b in (out, err)]
    saved_stdin = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    try:
        with contextlib.redirect_stdout(streams[0]), contextlib.redirect_stderr(streams[1]):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse's errors
                code = e.code
            except Exception:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
    finally:
        sys.stdin = saved_stdin
    stdout, stderr = out.getvalue(), err.getvalue()
    if text:
        stdout, stderr = stdout.decode(), stderr.decode()
    return subprocess.CompletedProcess(["main", *map(str, args)], code or 0, stdout, stderr)


def small_reversal_config(task, **change):
    """The small reversal model that the training tests share: 1 layer of 4 heads, 32 dims."""
    from dataclasses import replace

    return replace(task.config, n_embd=32, n_layer=1, n_head=4, **change)


@pytest.fixture(scope="session")
def reversal():
    """(task, train's result) for 3-digit reversal trained 300 steps from seed 0: one training
    run, and one compilation of its step, for every test that needs a model that learned."""
    from tasks import Reverse
    from train import train

    task = Reverse(n_digits=3)
    result = train(task, steps=300, seed=0, config=small_reversal_config(task), log=lambda *a: None)
    return task, result


@pytest.fixture(scope="session")
def cli_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint trained by the command line for 1 step; tests copy it before changing it.

    One step, because every training process compiles the step's kernels anew (the slow part);
    a second step would also pay for TinyJit's capture."""
    from test_transformer import RESULT_LINE, TINY, cli_process

    out = tmp_path_factory.mktemp("cli") / "rev"
    run = cli_process("--task", "reverse", "--steps", "1", *TINY, "--out", str(out))
    assert run.returncode == 0, run.stderr
    assert re.match(RESULT_LINE, run.stdout.strip().splitlines()[-1]), run.stdout
    return out


def assert_padding_changes_nothing(padded: np.ndarray, plain: np.ndarray, T: int):
    """The real positions' values of a padded pass (logits or attention) against the unpadded
    pass on T tokens: on a CPU the same bits from 8 tokens on. The unpadded pass of a shorter text
    runs kernels of its own (one token: the decode step's one-row product; under 8 tokens, those
    tinygrad picks for the small shapes), which round a few float32 steps apart (measured: up to
    2.4e-6 on logits of 5 to 7), so there within 1e-6 of the values' scale; and so on a GPU,
    whose kernels for the two shapes sum in other orders (CUDA on an H200: 2.4e-6 at 9 tokens)."""
    from tinygrad import Device

    same_bits = T >= 8 and Device.DEFAULT.split(":")[0] == "CPU"
    atol = 0 if same_bits else 1e-6 * np.abs(plain).max()
    np.testing.assert_allclose(padded, plain, rtol=0, atol=atol)


def assert_near(got, want, what: str, tol: float = 1e-5):
    """got within tol of a reference's values' scale (at least 1), the shapes equal: how the
    hook and patching tests hold tinygrad's numbers against Hugging Face's."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, the reference's {want.shape}"
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= tol * scale, f"{what}: {err:.2e} from the reference (scale {scale:.3g})"
