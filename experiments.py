"""The first-principles questions of Jacob Hilton's Deep Learning Curriculum, chapter 1
(Transformers), answered by experiment on transformer.py: each comparison trains the same small
model with one thing changed, at a fixed budget and seed, and reports the held-out numbers.

    python experiments.py                        # everything: markdown tables, a PNG of curves
    python experiments.py --only mask,positions  # some of them
    python experiments.py --plot docs/experiments.png   # the curves that QUESTIONS.md shows

What it runs (QUESTIONS.md reads the answers out of its output):
    similarity  the four similarity functions of attention on char-level Shakespeare
    shared      every block with one set of weights, against separate blocks
    residual    blocks without skip connections, at depth 2, 4 and 8
    mask        the reversal task with and without the causal mask (the curriculum's mask check)
    positions   the reversal task without positional encodings
    parallel    a whole sequence in one pass, against one token at a time with the KV cache
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from tinygrad import Tensor

import flags
import runtime
from generate import generate
from tasks import Reverse, Shakespeare
from train import train
from transformer import ABLATIONS, SIMILARITIES, Transformer

STEPS = 300  # every Shakespeare run: 300 steps of 12 x 64 characters
EVERY = 50  # a quick held-out evaluation every 50 steps draws the curves


def run(task, config, steps: int, label: str) -> dict:
    """Train one model; return its held-out score, curve, parameter count and ms per step (the
    evaluations for the curve are timed apart and left out)."""
    curve, eval_time = [], 0.0

    def observe(model, step):
        nonlocal eval_time
        t0 = time.perf_counter()
        curve.append((step, task.evaluate(model, quick=True)))
        eval_time += time.perf_counter() - t0
        return f"{label}: step {step} {task.metric} {curve[-1][1]:.4f}"

    task.observe = observe
    task.eval_every = EVERY
    t0 = time.perf_counter()
    result = train(task, steps, seed=0, config=config, log=lambda *a: None)
    wall = time.perf_counter() - t0
    model = result["model"]
    out = {"label": label, "score": result["score"], "curve": curve,
           "params": sum(p.numel() for p in model.parameters().values()),
           "ms_per_step": 1000 * (result["time"] - eval_time) / steps, "wall_s": wall,
           "model": model}
    print(f"  {label}: {task.metric} {out['score']:.4f}, {out['params']:,} parameters, "
          f"{out['ms_per_step']:.0f} ms/step", file=sys.stderr, flush=True)
    return out


def once(runs: dict, key: str, make, *args, **kwargs) -> dict:
    """runs[key], made by make(*args, **kwargs) the first time: comparisons that share a model
    share its run."""
    if key not in runs:
        runs[key] = make(*args, **kwargs)
    return runs[key]


def shakespeare(data: str, **change) -> dict:
    task = Shakespeare(data)
    label = ", ".join(f"{k}={v}" for k, v in change.items()) or "baseline"
    return run(task, replace(task.config, **change), STEPS, label)


def similarity_key(kind: str) -> str:
    """The run of a similarity function: the default one, scaled, is the depth-2 baseline."""
    return "depth=2 residual" if kind == "scaled" else f"similarity={kind}"


def similarity(data: str, runs: dict) -> list[str]:
    rows = ["| similarity | parameters | val loss after 300 steps | ms/step |", "|---|---|---|---|"]
    for kind in SIMILARITIES:
        r = once(runs, similarity_key(kind), shakespeare, data, similarity=kind)
        rows.append(f"| {kind} | {r['params']:,} | {r['score']:.3f} | {r['ms_per_step']:.0f} |")
    return rows


def shared(data: str, runs: dict) -> list[str]:
    rows = ["| 4 blocks | parameters | val loss after 300 steps | ms/step |", "|---|---|---|---|"]
    for name, change in (("separate", {}), ("shared-layers", ABLATIONS["shared-layers"])):
        key = "depth=4 residual" if name == "separate" else "depth=4 shared-layers"
        r = once(runs, key, shakespeare, data, n_layer=4, **change)
        rows.append(f"| {name} | {r['params']:,} | {r['score']:.3f} | {r['ms_per_step']:.0f} |")
    return rows


def residual(data: str, runs: dict) -> list[str]:
    rows = ["| depth | val loss, residual | val loss, no-residual |", "|---|---|---|"]
    for depth in (2, 4, 8):
        with_skip = once(runs, f"depth={depth} residual", shakespeare, data, n_layer=depth)
        plain = once(runs, f"depth={depth} no-residual", shakespeare, data, n_layer=depth,
                     **ABLATIONS["no-residual"])
        rows.append(f"| {depth} | {with_skip['score']:.3f} | {plain['score']:.3f} |")
    return rows


def reversal(change: dict, label: str) -> dict:
    task = Reverse()
    r = run(task, replace(task.config, **change), task.steps, label)
    losses = task.position_losses(r["model"])
    r["question"], r["answer"] = losses[: task.n - 1].mean(), losses[task.n :].mean()
    return r


def mask(runs: dict) -> list[str]:
    rows = ["| reversal, 200 steps | held-out loss on question digits (chance 2.303) | "
            "held-out loss on answer digits | greedy exact match |", "|---|---|---|---|"]
    for name, change in (("causal mask", {}), ("no-mask", ABLATIONS["no-mask"])):
        r = once(runs, f"reverse {name}", reversal, change, f"reverse {name}")
        rows.append(f"| {name} | {r['question']:.3f} | {r['answer']:.3f} | {r['score']:.3f} |")
    return rows


def positions(runs: dict) -> list[str]:
    rows = ["| reversal, 200 steps | answer-digit loss | greedy exact match |", "|---|---|---|"]
    for name, change in (("learned positions", {}), ("no-positions", ABLATIONS["no-positions"])):
        key = "reverse causal mask" if not change else f"reverse {name}"
        r = once(runs, key, reversal, change, key)
        rows.append(f"| {name} | {r['answer']:.3f} | {r['score']:.3f} |")
    return rows


def parallel(data: str, runs: dict) -> list[str]:
    """A Transformer reads a whole sequence in one pass: every position at once, the causal mask
    keeping each from its future. An RNN must take T steps. Decoding with the KV cache is the
    transformer run like an RNN: one token per step, reusing what earlier steps computed."""
    task = Shakespeare(data)
    Tensor.manual_seed(0)
    model = Transformer(task.config)
    rows = ["| tokens T | one pass over T tokens (ms) | T steps of one token, KV cache (ms) |",
            "|---|---|---|"]
    for T in (8, 16, 32, 64):
        ids = np.zeros((1, T), dtype=np.int32)
        whole = []
        for _ in range(4):  # the first call compiles; the best of the others is the figure
            t0 = time.perf_counter()
            model(Tensor(ids)).realize()
            whole.append(time.perf_counter() - t0)
        steps = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in generate(model, ids[:, :1], T):
                pass
            steps.append(time.perf_counter() - t0)
        rows.append(f"| {T} | {1000 * min(whole[1:]):.1f} | {1000 * min(steps[1:]):.1f} |")
    return rows


GROUPS = ("similarity", "shared", "residual", "mask", "positions", "parallel")


def existing_file(text: str) -> str:
    """An argparse type: the path of a file that is there."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no text at {text}; pass --data PATH")
    return text


def experiments(args) -> int:
    """Run the comparisons args.only names, print their tables, draw their curves."""
    groups = args.only or list(GROUPS)
    device = runtime.install()
    runs: dict = {}
    t0 = time.perf_counter()
    only = f" --only {','.join(args.only)}" if args.only else ""
    print(f"`python experiments.py{only}`: "
          f"{os.cpu_count()} cores ({platform.machine()}), tinygrad on {device}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    for group in groups:
        print(f"{group} ...", file=sys.stderr, flush=True)
        fn = globals()[group]
        rows = fn(runs) if group in ("mask", "positions") else fn(args.data, runs)
        print(f"\n### {group}\n\n" + "\n".join(rows), flush=True)
    print(f"\nall of it: {time.perf_counter() - t0:.0f} s", flush=True)
    panels = {
        "(2) similarity function": {kind: runs[similarity_key(kind)]["curve"]
                                    for kind in SIMILARITIES if similarity_key(kind) in runs},
        "(3) 4 blocks: separate or shared": {
            name: runs[k]["curve"] for k, name in (("depth=4 residual", "separate"),
                                                   ("depth=4 shared-layers", "shared-layers"))
            if k in runs},
        "(4) skip connections by depth": {k: r["curve"] for k, r in runs.items()
                                          if k.startswith("depth=") and "shared" not in k},
    }
    panels = {title: curves for title, curves in panels.items() if curves}
    if panels:
        import plots

        print(f"wrote {plots.experiment_curves(panels, args.plot)}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """`python experiments.py ARGS` -> its exit status, through flags.run: a mistake of the
    user's is one `error:` line and status 2, Ctrl-C one `interrupted` line and 130."""
    ap = flags.Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", type=flags.names(GROUPS, "experiment"), metavar="NAME,...",
                    help=f"comma-separated, of {', '.join(GROUPS)} (not given: all of them)")
    ap.add_argument("--data", type=existing_file, metavar="PATH",
                    default=str(Path(__file__).parent.parent / "shared" / "data" /
                                "tinyshakespeare.txt"), help="a copy of tinyshakespeare")
    # beside the checkpoints (untracked), not docs/experiments.png: a run must not overwrite a
    # tracked file unless told to
    ap.add_argument("--plot", type=Path, metavar="PATH",
                    default=Path(__file__).parent / "models" / "experiments.png",
                    help="where the learning curves go (the picture in QUESTIONS.md is drawn "
                         "with --plot docs/experiments.png)")
    return flags.run(experiments, ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(flags.run(main))
