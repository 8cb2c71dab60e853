"""runtime.py installs nothing at import: the model files are plain tinygrad until a CLI calls
runtime.install(), and on a tinygrad other than the one its pieces were written against, or with
TINYGPT_PLAIN=1, install() adds nothing and says so once."""
import json
import os
import subprocess
import sys

from conftest import REPO

# What a process reports about the pieces: is tinygrad's own product in place, is the CPU kernel
# runner patched, is the kernel table kept on disk, and did install() count itself as done
PROBE = """
import json, sys
import tinygrad.engine.realize as realize
from tinygrad import Tensor
from tinygrad.runtime.ops_cpu import CPUProgram
import runtime
{before}
for name in ("transformer", "hooks", "heads", "generate", "families", "gpt", "train", "tasks"):
    __import__(name)
{after}
print(json.dumps({{
    "tinygrad_dot": Tensor.dot is runtime.TINYGRAD_DOT,
    "tinygrad_linear": Tensor.linear is runtime.TINYGRAD_LINEAR,
    "all_cores": getattr(CPUProgram.__call__, "all_cores", False),
    "kept_kernels": type(realize.to_program_cache).__name__ == "_KeptKernels",
    "installed": runtime.INSTALLED,
}}))
"""


def probe(before: str = "", after: str = "", **env) -> tuple[dict, str]:
    env = {**os.environ, "DEV": "CPU", **env}
    done = subprocess.run([sys.executable, "-c", PROBE.format(before=before, after=after)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


def test_importing_the_model_files_installs_nothing():
    state, err = probe()
    assert state == {"tinygrad_dot": True, "tinygrad_linear": True, "all_cores": False,
                     "kept_kernels": False, "installed": False}
    assert err == ""


def test_install_puts_every_piece_in_place():
    state, err = probe(after="print(runtime.install(), file=sys.stderr)",
                       TINYGPT_PLAIN="0")
    assert state == {"tinygrad_dot": False, "tinygrad_linear": False, "all_cores": True,
                     "kept_kernels": True, "installed": True}
    assert err.startswith("CPU (")  # the device's name, and no note


def test_plain_mode_installs_nothing():
    state, err = probe(after="print(runtime.install(), file=sys.stderr)", TINYGPT_PLAIN="1")
    assert state == {"tinygrad_dot": True, "tinygrad_linear": True, "all_cores": False,
                     "kept_kernels": False, "installed": False}
    assert err.startswith("CPU (") and "note" not in err


def test_another_tinygrad_gets_one_note_and_runs_plain():
    before = "runtime.version = lambda name: '0.15.0'"
    state, err = probe(before, "print(runtime.install(), file=sys.stderr)", TINYGPT_PLAIN="0")
    assert state == {"tinygrad_dot": True, "tinygrad_linear": True, "all_cores": False,
                     "kept_kernels": False, "installed": False}
    note, device = err.splitlines()
    assert note == ("note: tinygrad 0.15.0, not 0.14.0: running on tinygrad alone, without "
                    "runtime.py's faster pieces")
    assert device.startswith("CPU (")


def test_a_cli_on_another_tinygrad_still_trains_and_answers(tmp_path):
    # the whole demo path on plain tinygrad: one note, then the usual result line
    code = ("import runtime, sys; runtime.version = lambda name: '0.15.0'; "
            "from train import cli; sys.argv = ['transformer.py', *sys.argv[1:]]; cli()")
    done = subprocess.run([sys.executable, "-c", code, "--steps", "20", "--n-layer", "1",
                           "--out", str(tmp_path / "m")], cwd=REPO,
                          env={**os.environ, "DEV": "CPU", "TINYGPT_PLAIN": "0"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("note: tinygrad 0.15.0") == 1
    assert done.stdout.splitlines()[-1].startswith("result: task=reverse ")
