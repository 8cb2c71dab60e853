"""Train transformer.py's toy models: the optimizer, the compiled step, checkpoints, the loop
that checks on held-out data that a model really learned, and the command line.

The step follows tinygrad's examples/beautiful_mnist.py: a TinyJit'd function computes the loss,
its gradients and the AdamW update, so after the first call Python only replays its kernels. What a
model learns and how it is judged comes from a task (tasks.py); the loop does not know which.

    python transformer.py -v                        # learn to reverse digit strings: exact match
    python transformer.py --task shakespeare -v     # character-level tinyshakespeare: val loss
    python transformer.py --task induction -v       # induction heads, 2 attention-only layers
    python transformer.py --task reverse --sample   # decode with the checkpoint saved in models/
    python transformer.py --attention               # every head of that checkpoint, drawn
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from tinygrad import Context, Tensor, nn
from tinygrad.nn.state import get_state_dict, safe_load, safe_save

import flags
from families import Classifier, EncoderDecoder
from flags import UserError
from runtime import exit_now, install, jit_at_once
from tasks import IGNORE, TASKS
from transformer import ABLATIONS, SIMILARITIES, Config, Transformer

# what a checkpoint can hold, by the name saved in its JSON (Transformer when it names none)
MODELS = {m.__name__: m for m in (Transformer, Classifier, EncoderDecoder)}


def make_optimizer(model: Transformer, lr: float, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.99)):
    """AdamW (Loshchilov & Hutter, 2019). Weight decay pulls matrices and embeddings toward zero;
    biases and LayerNorm gains are left alone, as in GPT-2 and nanoGPT."""
    params = list(model.parameters().values())
    decay = [p for p in params if p.ndim >= 2]
    keep = [p for p in params if p.ndim < 2]
    b1, b2 = betas
    return nn.optim.OptimizerGroup(
        nn.optim.AdamW(decay, lr, b1=b1, b2=b2, weight_decay=weight_decay),
        nn.optim.AdamW(keep, lr, b1=b1, b2=b2, weight_decay=0.0),
    )


def learning_rate(step: int, max_lr: float, total: int, warmup: int) -> float:
    """Linear warmup to max_lr, then cosine decay to a tenth of it (Brown et al., 2020, GPT-3)."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return max_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def set_gradients(opt, grads: list[Tensor], lr: Tensor, clip: float | None) -> Tensor:
    """Hand opt.params their gradients for the step, all rescaled together when their global norm
    exceeds clip (Pascanu et al., 2013), and the step's learning rate. -> the norm before."""
    norm = Tensor.stack(*[g.square().sum() for g in grads]).sum().sqrt()
    scale = (clip / (norm + 1e-6)).minimum(1.0) if clip is not None else 1.0
    for p, g in zip(opt.params, grads):
        p.grad = g * scale
    for o in opt.optimizers:
        o.lr.assign(lr)
    return norm


def make_train_step(model: Transformer, opt, clip: float | None = 1.0,
                    grokfast: tuple[float, float] | None = None, l2: float = 0.0):
    """One optimizer step, compiled by TinyJit: the kernels are captured on the first call
    (runtime.jit_at_once) and replayed, so Python no longer rebuilds the graph each step. TinyJit
    would run the step plainly once first, in case it makes buffers that outlive it; the weights
    and the optimizer's state are made before, so it makes none, and the plain run's buffers,
    left in tinygrad's cache beside the capture's, were most of fine-tuning's memory
    (docs/train.md).

    grokfast=(alpha, lamb) amplifies the slow part of the gradient before the step, as in Grokfast
    (Lee et al., 2024): ema <- alpha ema + (1 - alpha) g, then g <- g + lamb ema. The averages
    live in tensors that the compiled step updates in place; the first gradient starts them.
    l2 adds l2 * w to every gradient after that, as torch.optim.Adam(weight_decay=l2) does: an L2
    penalty that Adam then normalizes with the rest, unlike AdamW's decoupled weight decay
    (Loshchilov & Hutter, 2019). clip=None leaves the gradient's norm alone."""
    params = opt.params
    # Realize the initial weights and optimizer state first: left lazy, their random initialization
    # joins the first step's graph, and scheduling that larger graph took several times longer
    # (docs/speed.md, Training).
    Tensor.realize(*get_state_dict(opt).values())
    if grokfast is not None:
        alpha, lamb = grokfast
        emas = [Tensor.zeros(*p.shape).contiguous().is_param_(False).realize() for p in params]
        started = Tensor.zeros(1).contiguous().is_param_(False).realize()  # 0 before step one

    @jit_at_once
    def step(x: Tensor | tuple[Tensor, ...], y: Tensor, lr: Tensor) -> tuple[Tensor, Tensor]:
        inputs = x if isinstance(x, tuple) else (x,)  # (source, target) for an encoder-decoder
        loss = model(*inputs).sparse_categorical_crossentropy(y, ignore_index=IGNORE)
        grads = loss.gradient(*params)
        if grokfast is not None:
            a = alpha * started  # 0 on the first step: the average starts at the first gradient
            for ema, g in zip(emas, grads):
                ema.assign(a * ema + (1 - a) * g)
            grads = [g + lamb * ema for g, ema in zip(grads, emas)]
            started.assign(Tensor.ones(1))
        if l2:
            grads = [g + l2 * p for g, p in zip(grads, params)]
        norm = set_gradients(opt, grads, lr, clip)
        state = [*emas, started] if grokfast is not None else []
        Tensor.realize(loss, norm, *opt.schedule_step(), *state)
        return loss, norm

    step.grokfast_ema = emas if grokfast is not None else None  # for tests
    return step


def make_accumulating_step(model: Transformer, opt, k: int, clip: float | None = 1.0):
    """make_train_step's step over k micro-batches, for a batch too large to fit at once: each
    micro-batch's gradient is added into buffers the size of the weights (one TinyJit, replayed
    k times), then one more applies their mean (clipped as in make_train_step) with the
    optimizer. The same step as one batch of all k, as long as every micro-batch counts the same
    number of targets (the loss is a mean of means); the accumulation is nanoGPT's
    gradient_accumulation_steps, here without a loss scaled by 1/k in each backward pass.
    -> step(batches, lr): batches is a list of k (x, y) pairs; returns (mean loss, grad norm)."""
    params = opt.params
    Tensor.realize(*get_state_dict(opt).values())
    # zeros_like: on the weight's device, or replicated on its devices (--devices)
    sums = [Tensor.zeros_like(p).contiguous().is_param_(False).realize() for p in params]

    @jit_at_once  # as make_train_step's: the sums are made before
    def accumulate(x: Tensor, y: Tensor, keep: Tensor) -> Tensor:
        loss = model(x).sparse_categorical_crossentropy(y, ignore_index=IGNORE)
        grads = loss.gradient(*params)
        for s, g in zip(sums, grads):
            s.assign(s * keep + g)  # keep = 0 on the first micro-batch: the sums start over
        Tensor.realize(loss, *sums)
        return loss

    @jit_at_once
    def apply(lr: Tensor) -> Tensor:
        norm = set_gradients(opt, [s / k for s in sums], lr, clip)
        norm.realize(*opt.schedule_step())
        return norm

    device = params[0].device
    starts = [Tensor([float(i > 0)]).to(device).realize() for i in range(2)]

    def step(batches: list[tuple[Tensor, Tensor]], lr: Tensor) -> tuple[Tensor, Tensor]:
        losses = [accumulate(x, y, starts[i > 0]).item() for i, (x, y) in enumerate(batches)]
        return Tensor([sum(losses) / len(losses)]), apply(lr)

    return step


def place(array: np.ndarray, devices: tuple[str, ...] | None) -> Tensor:
    """A batch as a tensor: on the default device, or split along the batch across devices
    (Tensor.shard), each holding len(array) / len(devices) rows."""
    t = Tensor(array)
    return t if devices is None else t.shard(devices, axis=0)


def replicate(tensors, device: str | tuple[str, ...]):
    """Move each tensor (the weights, the optimizer's state) to device in place: a tuple of
    devices gives each device a copy, whose gradients tinygrad allreduces (schedule/multi.py);
    a name brings replicated tensors back to one device."""
    tensors, seen = list(tensors), set()
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            t.to_(device)
    Tensor.realize(*tensors)


@contextlib.contextmanager
def interrupts_held():
    """Hold Ctrl-C back until the block is done, then deliver it: what the block writes is whole.
    Only the main thread may set a signal handler; elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(signal.SIGINT, None)  # Python's own handler: KeyboardInterrupt, here
    elif caught and previous == signal.SIG_DFL:
        signal.raise_signal(signal.SIGINT)


def save_checkpoint(path: Path, model: Transformer, opt, meta: dict):
    """Weights + optimizer state in one safetensors file, config and progress in JSON beside it.

    Both are written under temporary names, then renamed, with Ctrl-C held back until both are in
    place: an interrupted or failed save leaves the old checkpoint whole (or none), never half a
    checkpoint or a mix of two, and no temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = dict(model.parameters())
    for i, o in enumerate(opt.optimizers):
        for j, (m, v) in enumerate(zip(o.m, o.v)):
            tensors[f"optim.{i}.m.{j}"], tensors[f"optim.{i}.v.{j}"] = m, v
        tensors[f"optim.{i}.b1_t"], tensors[f"optim.{i}.b2_t"] = o.b1_t, o.b2_t
    weights_path, meta_path = checkpoint_files(path)
    tmp_weights, tmp_meta = Path(f"{weights_path}.tmp"), Path(f"{meta_path}.tmp")
    meta = {**meta, "model": type(model).__name__, "config": asdict(model.config)}
    with interrupts_held():
        try:
            safe_save(tensors, str(tmp_weights))
            tmp_meta.write_text(json.dumps(meta, indent=2))
            os.replace(tmp_weights, weights_path)
            os.replace(tmp_meta, meta_path)
        finally:  # after a failure (a full disk): the old checkpoint stays, its stand-ins go
            tmp_weights.unlink(missing_ok=True)
            tmp_meta.unlink(missing_ok=True)


def checkpoint_files(path: Path) -> tuple[Path, Path]:
    """PATH.safetensors and PATH.json (appended, so a name like run.1 keeps its dot)."""
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def check_resumed_shape(path: Path, config: Config) -> None:
    """--resume takes the model from the checkpoint at path; with --init too, it must be of the
    shape --init names (config), or the run would go on with another model than asked for."""
    try:
        saved = json.loads(checkpoint_files(path)[1].read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # load_checkpoint says what is wrong with it
    shape = ("vocab_size", "n_ctx", "n_layer", "n_head", "n_embd")
    if differ := [f"{k} {saved[k]} against {getattr(config, k)}" for k in shape
                  if k in saved and saved[k] != getattr(config, k)]:
        raise UserError(f"checkpoint {path} holds another model than --init names "
                        f"({', '.join(differ)}); resume with the --init it started from")


def load_checkpoint(path: Path, opt_lr: float | None = None):
    """-> (model, optimizer or None, meta). Raises UserError with a one-line reason."""
    weights_path, meta_path = checkpoint_files(path)
    try:
        meta = json.loads(meta_path.read_text())
        config = Config(**meta["config"])
        architecture = MODELS[meta.get("model", "Transformer")]
        tensors = safe_load(str(weights_path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read checkpoint {path}: {e}") from None
    model = architecture(config, init=False)  # every weight comes from the file
    weights = {k: v for k, v in tensors.items() if not k.startswith("optim.")}
    expected = model.parameters()
    if set(weights) != set(expected):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise UserError(f"checkpoint {path} does not fit its config: "
                        f"missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in expected.items():
        if v.shape != weights[k].shape:
            raise UserError(f"checkpoint {path}: {k} has shape {weights[k].shape}, "
                            f"expected {v.shape}")
    for k, v in expected.items():
        v.replace(weights[k].to(v.device)).realize()
    opt = None
    if opt_lr is not None:
        if not isinstance(meta.get("step"), int):
            raise UserError(f"checkpoint {path} does not say which step it reached")
        opt = make_optimizer(model, opt_lr)
        try:
            for i, o in enumerate(opt.optimizers):
                for j, (m, v) in enumerate(zip(o.m, o.v)):
                    m.assign(tensors[f"optim.{i}.m.{j}"].to(m.device)).realize()
                    v.assign(tensors[f"optim.{i}.v.{j}"].to(v.device)).realize()
                o.b1_t.assign(tensors[f"optim.{i}.b1_t"].to(o.b1_t.device)).realize()
                o.b2_t.assign(tensors[f"optim.{i}.b2_t"].to(o.b2_t.device)).realize()
        except KeyError as e:
            raise UserError(f"checkpoint {path} has no optimizer state {e} to resume "
                            "from") from None
    return model, opt, meta


def train(task, steps: int | None = None, seed: int = 0, out: Path | None = None,
          resume: bool = False, verbose: bool = False, config: Config | None = None,
          log=print, grokfast: tuple[float, float] | None = None, grad_accum: int = 1,
          devices: tuple[str, ...] | None = None, until: int | None = None) -> dict:
    """Train a model on task, evaluate it on held-out data as it goes, and return the final scores.

    What the loop reads from the task is declared in tasks.Task: its data (batch), its judge
    (evaluate), its model (config, architecture), its optimizer's settings (weight_decay, betas,
    warmup, constant_lr, l2, clip), and its curves (observe, called every eval_every steps; a
    history list, saved with the checkpoint and restored on resume), and for fine-tuning its
    initial weights (initial), whether its batches replay on resume (replayable), whether it is
    evaluated before the first step (eval_at_start).

    grad_accum=K: each step adds the gradients of K batches of task.batch_size before it applies
    them (make_accumulating_step). devices: each batch is split across them, the weights and the
    optimizer's state replicated on each (data parallelism, one process; tinygrad allreduces the
    gradients); the model comes back to one device after training. until: stop after that step,
    with the checkpoint saved, as an interrupted run that --resume continues (the schedule is
    still that of steps)."""
    steps = steps if steps is not None else task.steps
    Tensor.manual_seed(seed)
    rng = np.random.default_rng(seed)
    start = 0
    if resume:
        model, opt, meta = load_checkpoint(out, opt_lr=task.lr)
        for o, decay in zip(opt.optimizers, (task.weight_decay, 0.0)):  # the task's, not defaults
            o.wd, (o.b1, o.b2) = decay, task.betas
        if task.history is not None:
            task.history = meta.get("history", [])
        if meta.get("task") != task.name:
            raise UserError(f"checkpoint {out} is for task {meta.get('task')!r}, "
                            f"not {task.name!r}")
        start = meta["step"]
        rng = np.random.default_rng([seed, start])  # fresh batches, not a replay of the first ones
        log(f"resumed {out} at step {start}")
    else:
        config = config or task.config
        data_shape = (task.config.n_ctx, task.config.vocab_size)
        if (config.n_ctx, config.vocab_size) != data_shape:
            raise ValueError(f"the task's data has n_ctx={data_shape[0]} and vocab_size="
                             f"{data_shape[1]}; the model has n_ctx={config.n_ctx} and "
                             f"vocab_size={config.vocab_size}")
        model = task.initial()
        if model is None:
            model = task.architecture(config)
        if devices is not None:  # before the optimizer, whose state then lands on each device
            replicate(model.parameters().values(), devices)
        opt = make_optimizer(model, task.lr, task.weight_decay, task.betas)
    if resume and devices is not None:
        replicate([*model.parameters().values(), *get_state_dict(opt).values()], devices)
    c = model.config
    n_params = sum(p.numel() for p in model.parameters().values())
    log(f"task {task.name}: {n_params / 1e6:.2f}M parameters, {c.n_layer} layers, "
        f"{c.n_head} heads, {c.n_embd} dims, context {c.n_ctx}; "
        f"{steps} steps of batch {task.batch_size}"
        + (f" x {grad_accum} accumulated" if grad_accum > 1 else "")
        + (f" across {', '.join(devices)}" if devices is not None else ""))
    if grad_accum > 1:
        if grokfast is not None or task.l2:
            raise ValueError("gradient accumulation does not take --grokfast or --l2")
        step_fn = make_accumulating_step(model, opt, grad_accum, task.clip)
    else:
        step_fn = make_train_step(model, opt, task.clip, grokfast, task.l2)
    warmup = task.warmup if task.warmup is not None else max(1, min(100, steps // 10))
    B = task.batch_size
    tokens_per_step = B * grad_accum * (task.block_size or c.n_ctx)
    if task.eval_at_start and start == 0 and verbose:
        log(task.observe(model, 0))
    elif task.eval_at_start and start == 0:
        task.observe(model, 0)
    losses = []  # each step's training loss, for the tests

    def meta(done: int) -> dict:  # what a checkpoint records besides the tensors
        kept = {"task": task.name, "step": done, "seed": seed}
        return kept | ({"history": task.history} if task.history is not None else {})

    t0 = time.perf_counter()
    for step in range(start, steps if until is None else min(until, steps)):
        flags.check_interrupt()  # a Ctrl-C that a finalizer swallowed ends the run here
        if task.replayable:
            rng = np.random.default_rng([seed, step])
        x, y = task.batch(rng, B * grad_accum)
        if task.constant_lr:
            lr = task.lr * min(1.0, (step + 1) / warmup)
        else:
            lr = learning_rate(step, task.lr, steps, warmup)
        lr_t = Tensor([lr]) if devices is None else Tensor([lr]).to(devices)
        # TRAINING only around the step: the evaluations are inference, with inference's kernels
        with Context(TRAINING=1):
            if grad_accum > 1:
                loss, norm = step_fn([(place(x[i * B : (i + 1) * B], devices),
                                       place(y[i * B : (i + 1) * B], devices))
                                      for i in range(grad_accum)], lr_t)
            else:
                x = (tuple(place(a, devices) for a in x) if isinstance(x, tuple)
                     else place(x, devices))
                loss, norm = step_fn(x, place(y, devices), lr_t)
        done = step + 1
        losses.append(loss.item())
        if until is not None and done == until and done < steps:
            if out is not None:
                save_checkpoint(out, model, opt, meta(done))
                log(f"stopped at step {done}: saved {checkpoint_files(out)[0]}")
            return {"model": model, "score": None, "steps": done,
                    "time": time.perf_counter() - t0, "losses": losses}
        if verbose and (done % 25 == 0 or done == steps):
            elapsed = time.perf_counter() - t0
            rate = (done - start) / elapsed
            log(f"step {done:5d}/{steps}  loss {loss.item():.4f}  lr {lr:.2e}  "
                f"grad-norm {norm.item():.2f}  {rate * tokens_per_step:,.0f} tok/s  "
                f"ETA {(steps - done) / rate:.0f}s")
        if done % task.eval_every == 0 or done == steps:
            line = task.observe(model, done)  # None: the task records no curves
            if line is None and verbose and done != steps:  # the final evaluation follows
                line = f"eval  step {done}: {task.metric} {task.evaluate(model, quick=True):.4f}"
            if verbose and line is not None:
                log(line)
    elapsed = time.perf_counter() - t0
    if devices is not None:  # back on one device: to evaluate, save and sample as usual
        replicate([*model.parameters().values(), *get_state_dict(opt).values()], devices[0])
    score = task.evaluate(model)
    if out is not None:
        save_checkpoint(out, model, opt, meta(steps))
        log(f"saved {checkpoint_files(out)[0]}")
    return {"model": model, "score": score, "steps": steps, "time": elapsed, "losses": losses}


def verdict(task, score: float) -> bool:
    """Did the model learn? Each task judges its own score (tasks.py)."""
    return task.learned(score)


def loaded(task, path: Path):
    """The model saved at path, checked to be task's."""
    model, _, meta = load_checkpoint(path)
    if meta.get("task") != task.name:
        raise UserError(f"checkpoint {path} is for task {meta.get('task')!r}, "
                        f"not {task.name!r}")
    return model


def example_of(task) -> tuple[np.ndarray, list[str]]:
    """The task's held-out example to draw or read, or a one-line reason why there is none."""
    example = task.example()
    if example is None:
        raise UserError(f"task {task.name!r} has no example text to read the model on")
    return example


def show_attention(task, path: Path, folder: Path, layer=None, head=None, tokens=None):
    """Every view of the checkpoint's attention on one held-out example of task (heads.py), the
    head scores, and what the task can say about its heads (e.g. Reverse's mirror heads)."""
    import heads

    model = loaded(task, path)
    drawn = task.inspect(model, folder)  # a model of its own kind: the task draws it
    if drawn is None:
        ids, labels = example_of(task)
        encoder = getattr(model, "encoder", model)  # a Classifier's heads are its encoder's
        drawn = heads.inspect_model(encoder, ids, labels, folder, f"{task.name} model", tokens,
                                    layer, head)
    written, report = drawn
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    print(report)
    explained = task.explain(model)
    if explained is not None:
        print(explained)



def ablate(task, path: Path, folder: Path, heads_spec: str | None = None, mean: bool = False):
    """Knock out each head of the checkpoint alone (or the set heads_spec together) and report
    what it costs the task's own score on held-out data (its ablation_score, else evaluate):
    ablation.npz and ablation.png in folder, a table on stdout, and what the task reads from it.
    mean=True replaces a head by its mean over the batch instead of zeros."""
    import heads

    model = loaded(task, path)
    metric = task.ablation_metric
    mean_over = "batch" if mean else None
    run = lambda: float(task.ablation_score(model))
    written, report, base, delta = heads.ablation_report(
        model, run, folder, heads_spec, mean_over, metric, "score", f"{task.name} model",
        task.ablation_higher_is_better, saved={"metric": metric})
    if written:
        print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    print(report)
    if delta is not None:
        knock = lambda hs: heads.ablate_heads(model, run, hs, mean_over)[1]
        reading = task.ablation_reading(model, base, delta, knock)
        if reading is not None:
            print(reading)


def lens(task, path: Path, folder: Path, tokens: str | None = None):
    """The logit lens of the checkpoint on the task's held-out example (heads.logit_lens)."""
    import heads

    ids, labels = example_of(task)
    model = loaded(task, path)
    window = heads.parse_window(tokens, len(ids))
    reading = heads.logit_lens(model, ids)
    written = heads.write_lens(folder, reading, labels, task.token, f"{task.name} model: logit "
                               "lens", window)
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    print(heads.lens_report(reading, labels, task.token))


def trace(task, path: Path, folder: Path, heads_spec: str | None = None, threshold: float = 0.1,
          dla: bool = False):
    """Activation and attribution patching (or, dla=True, direct logit attribution) of the
    checkpoint on the task's own clean/corrupted pair (patching.py): the npz files and pictures
    in folder, the grids on stdout."""
    import heads
    import patching

    pair = task.patching_pair()
    if pair is None:
        raise UserError(f"task {task.name!r} has no clean/corrupted pair to patch")
    clean, corrupt, answer, wrong = pair
    model = loaded(task, path)
    what = f"{task.name} model: {task.token(answer)!r} against {task.token(wrong)!r}"
    if dla:
        parts = patching.direct_logit_attribution(model, clean, answer, wrong)
        written = patching.write_dla(folder, parts, what)
        report = patching.dla_report(parts)
    else:
        c = model.config
        chosen = [] if heads_spec is None else heads.parse_heads(heads_spec, c.n_layer, c.n_head)
        labels = [task.token(i) for i in corrupt]
        written, report, exact = patching.patch_and_write(model, clean, corrupt, answer, wrong,
                                                          labels, folder, what, chosen, threshold)
        if reading := task.patching_reading(model, exact):
            report += "\n" + reading
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    print(report)


def serve_task(task, path: Path, host: str, port: int | None):
    """The live workbench (serve.py) on the checkpoint, its text the task's own tokens, the
    held-out example filled in."""
    import serve

    model = loaded(task, path)
    vocab = serve.task_vocab(task, model.config.vocab_size)
    example = task.example()
    text = "" if example is None else vocab.decode(example[0])
    bench = serve.Workbench(model, vocab, f"{task.name} model ({path.name})", text)
    serve.serve(bench, host, port, lambda msg: print(msg, file=sys.stderr, flush=True))


def command(args) -> int:
    """What the flags ask for: train a model, or read the saved one (--sample, --attention,
    --head-ablation, --logit-lens). Raises UserError for a mistake of the user's."""
    reads_data = TASKS[args.task].reads_data
    if args.data is not None and not reads_data:
        raise UserError(f"--data is for tasks that read a text; task {args.task!r} makes its own")
    fine_tuning = args.task == "text"
    for flag, value in (("--init", args.init), ("--block-size", args.block_size)):
        if value is not None and not fine_tuning:
            raise UserError(f"{flag} goes with --task text")
    if fine_tuning:
        task = TASKS["text"](data=args.data, init=args.init or "gpt2",
                             block_size=args.block_size)
    else:
        task = TASKS[args.task](data=args.data) if reads_data else TASKS[args.task]()
    if args.batch_size is not None:
        task.batch_size = args.batch_size
    if args.devices is not None and task.batch_size % len(args.devices):
        raise UserError(f"a batch of {task.batch_size} does not split evenly across "
                        f"{len(args.devices)} devices ({','.join(args.devices)}); choose "
                        "--batch-size a multiple of their number")
    if args.lr is not None:
        task.lr = args.lr
    if args.weight_decay is not None:
        task.weight_decay = args.weight_decay  # train() reads it from the task
    if args.l2 is not None:
        task.l2 = args.l2
    # Lee et al.'s EMA for modular arithmetic, and the amplification asked for
    grokfast = None if args.grokfast is None else (0.98, args.grokfast)
    if args.plot is not None and not task.draws_curves:
        raise UserError(f"--plot is for tasks that record curves; task {args.task!r} draws none")
    if args.arch is not None and args.task != "classify":
        raise UserError("--arch goes with --task classify")
    if task.architecture is not Transformer:
        for flag, value in (("--head-ablation", args.head_ablation),
                            ("--logit-lens", args.logit_lens), ("--patch", args.patch),
                            ("--dla", args.dla), ("--serve", args.serve or None)):
            if value is not None:
                raise UserError(f"{flag} reads a decoder-only model; task {args.task!r} trains "
                                f"a {task.architecture.__name__}")
    ablations = [name for names in args.ablate for name in names]
    try:  # after the checks of the arguments: opening a backend takes a moment
        device = install(args.device)
    except Exception as e:
        name = args.device or os.environ.get("DEV")
        raise UserError(f"device {name!r} is not usable here: {e}") from None
    devices = None
    if args.devices is not None:
        from tinygrad import Device

        devices = []
        for name in args.devices:
            try:  # opening it: an unknown or broken backend fails here, not in the first step
                devices.append(Device.canonicalize(name))
                Device[devices[-1]]
            except Exception as e:
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise UserError(f"--devices: {name} is not usable here: {why}") from None
        devices = tuple(devices)
        if len(set(devices)) != len(devices):
            raise UserError(f"--devices {','.join(args.devices)} names one device twice")
    out = args.out or Path(__file__).parent / "models" / task.name
    if fine_tuning:  # the best model in Hugging Face's layout, in a folder of --out's name
        task.best_dir = out
    if args.resume and args.init is not None:
        check_resumed_shape(out, task.config)
    log = print if args.verbose else (lambda *a, **k: None)
    log(f"device {device}")
    for flag, value in (("--port", args.port), ("--host", args.host)):
        if value is not None and not args.serve:
            raise UserError(f"{flag} goes with --serve")
    try:
        if args.serve:
            serve_task(task, out, args.host or "127.0.0.1", args.port)
            return 0
        if args.sample:
            print(task.show(loaded(task, out), args.seed))  # a task that samples draws with it
            return 0
        if args.attention is not None:
            folder = Path(args.attention or Path("attention") / task.name)
            show_attention(task, out, folder, args.layer, args.head, args.tokens)
            return 0
        if args.head_ablation is not None:
            folder = Path(args.head_ablation or Path("attention") / task.name)
            ablate(task, out, folder, args.heads, args.mean)
            return 0
        if args.logit_lens is not None:
            lens(task, out, Path(args.logit_lens or Path("attention") / task.name), args.tokens)
            return 0
        if args.patch is not None or args.dla is not None:
            folder = Path((args.patch if args.patch is not None else args.dla)
                          or Path("attention") / task.name)
            trace(task, out, folder, args.heads, args.threshold, dla=args.patch is None)
            return 0
        for flag, value in (("--heads", args.heads), ("--mean", args.mean or None)):
            if value is not None:
                raise UserError(f"{flag} goes with --head-ablation or --patch")
        overrides = {k: v for k, v in (("n_layer", args.n_layer), ("n_head", args.n_head),
                                       ("n_embd", args.n_embd), ("positions", args.positions))
                     if v is not None}
        if args.post_ln:
            overrides["prenorm"] = False
        if args.arch is not None:
            overrides["causal"] = args.arch == "decoder"
        for name in ablations:
            overrides.update(ABLATIONS[name])
        overrides["similarity"] = args.similarity
        config = replace(task.config, **overrides)
        baselines = task.baselines()
        if baselines is not None:
            log(f"baselines: {baselines}")
        result = train(task, args.steps, args.seed, out, args.resume, args.verbose, config, log,
                       grokfast, args.grad_accum, devices)
        if task.draws_curves:
            # the figure names its run by the flags that change what is learned
            run = f"python transformer.py --task {args.task} --seed {args.seed}"
            grokfast_flag = None if args.grokfast is None else f"{args.grokfast:g}"
            for flag, value in (("--steps", args.steps), ("--lr", args.lr),
                                ("--weight-decay", args.weight_decay), ("--l2", args.l2),
                                ("--grokfast", grokfast_flag), ("--ablate", ",".join(ablations))):
                if value not in (None, ""):
                    run += f" {flag} {value}"
            log(f"wrote {task.plot(args.plot or out.with_name(out.name + '.png'), run)}")
    except (ValueError, OSError) as e:  # a config that cannot be, a file that cannot be written
        raise UserError(str(e)) from None
    log("samples:\n" + task.show(result["model"], args.seed))
    check = task.mask_check(result["model"])
    if check is not None:
        log(check)
    ok = verdict(task, result["score"])
    log(f"verdict: {task.metric} {result['score']:.4f} against chance {task.chance:.4g}: "
        f"{'learned' if ok else 'did NOT learn'}")
    extra = task.result_fields()
    print(f"result: task={task.name} {task.metric}={result['score']:.4f} chance={task.chance:.4g} "
          f"steps={result['steps']} time={result['time']:.1f}s" + (f" {extra}" if extra else ""))
    return 0


def device_list(text: str) -> tuple[str, ...]:
    """--devices: device names separated by commas, as tinygrad spells them (CPU:0, CUDA:1)."""
    names = tuple(n.strip().upper() for n in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected device names separated by commas, got "
                                         f"{text!r}")
    return names


def main(argv=None) -> int:
    """`python transformer.py ARGS` -> its exit status. The flags are read here, and what they ask
    for runs through flags.run: a mistake of the user's is one `error:` line and status 2, Ctrl-C
    one `interrupted` line and 130."""
    ap = flags.Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="reverse", choices=TASKS, metavar="NAME",
                    help=f"what to learn: {', '.join(TASKS)} (tasks.py)")
    ap.add_argument("--steps", type=flags.count, metavar="N",
                    help="training steps (not given: the task's budget)")
    ap.add_argument("--lr", type=flags.positive, metavar="X",
                    help="peak learning rate (not given: the task's)")
    ap.add_argument("--seed", type=flags.natural, default=0, metavar="N",
                    help="seeds the weights, the batches, and the text a task samples "
                         "(shakespeare, words; the others decode greedily)")
    ap.add_argument("--data", metavar="PATH",
                    help="a local text for a task that reads one (not given: download it once)")
    ap.add_argument("--out", type=Path, metavar="PATH",
                    help="checkpoint path without suffix (not given: models/TASK)")
    ap.add_argument("--resume", action="store_true", help="continue training from --out")
    ap.add_argument("--sample", action="store_true", help="generate from the saved checkpoint")
    ap.add_argument("--n-layer", type=flags.count, metavar="N",
                    help="blocks (not given: the task's)")
    ap.add_argument("--n-head", type=flags.count, metavar="N",
                    help="attention heads per block (not given: the task's)")
    ap.add_argument("--n-embd", type=flags.count, metavar="N",
                    help="width of the residual stream, a multiple of --n-head "
                         "(not given: the task's)")
    ap.add_argument("--positions", choices=["learned", "sinusoidal"],
                    help="positional encoding (not given: the task's, learned for all)")
    ap.add_argument("--post-ln", action="store_true", help="post-LN blocks as in the 2017 paper")
    ap.add_argument("--arch", choices=["encoder", "decoder"],
                    help="--task classify: read both directions and pool (encoder, the default) "
                         "or causally and read the last token (decoder)")
    ap.add_argument("--ablate", action="append", default=[], metavar="NAME",
                    type=flags.names(ABLATIONS, "ablation"),
                    help=f"take a part away: {', '.join(ABLATIONS)} (repeat or comma-separate)")
    ap.add_argument("--similarity", default="scaled", choices=SIMILARITIES,
                    help="how a query scores a key")
    ap.add_argument("--attention", nargs="?", const="", metavar="DIR",
                    help="draw every head of the saved checkpoint on a held-out example, score "
                         "the heads (files in DIR; DIR not given: attention/TASK)")
    ap.add_argument("--layer", type=flags.natural, metavar="L",
                    help="with --attention and --head: one head, large")
    ap.add_argument("--head", type=flags.natural, metavar="H",
                    help="with --attention and --layer: one head, large")
    ap.add_argument("--tokens", metavar="A:B",
                    help="with --attention or --logit-lens: show tokens A to B only")
    ap.add_argument("--head-ablation", nargs="?", const="", metavar="DIR",
                    help="knock out each head of the saved checkpoint alone and report what it "
                         "costs the task's score on held-out data (files in DIR; DIR not given: "
                         "attention/TASK)")
    ap.add_argument("--heads", metavar="L.H,...",
                    help="with --head-ablation: knock out these heads together, print one "
                         "result; with --patch: patch each of them position by position")
    ap.add_argument("--mean", action="store_true",
                    help="with --head-ablation: replace a head by its mean over the batch, not 0")
    ap.add_argument("--patch", nargs="?", const="", metavar="DIR",
                    help="patch each activation of the task's clean input into its corrupted "
                         "one, and estimate it by attribution patching (files in DIR; DIR not "
                         "given: attention/TASK)")
    ap.add_argument("--dla", nargs="?", const="", metavar="DIR",
                    help="direct logit attribution on the task's clean input: what each head, "
                         "MLP and embedding writes toward the answer (files in DIR)")
    ap.add_argument("--threshold", type=flags.positive, default=0.1, metavar="X",
                    help="with --patch: name the cells where attribution patching is off by "
                         "more than X of the clean logit difference")
    ap.add_argument("--logit-lens", nargs="?", const="", metavar="DIR",
                    help="read the checkpoint's residual stream after each block through the "
                         "unembedding, on a held-out example (files in DIR; DIR not given: "
                         "attention/TASK)")
    ap.add_argument("--serve", action="store_true",
                    help="the live workbench: a local web page and JSON API on the checkpoint")
    ap.add_argument("--port", type=flags.port, metavar="N",
                    help="with --serve: the port (default: 8000 or the next free one; 0: any)")
    ap.add_argument("--host", metavar="ADDR",
                    help="with --serve: the address to listen on (default: 127.0.0.1, this "
                         "machine only)")
    ap.add_argument("--weight-decay", type=flags.nonnegative, metavar="X",
                    help="AdamW weight decay on matrices and embeddings (not given: the task's)")
    ap.add_argument("--l2", type=flags.nonnegative, metavar="X",
                    help="add X times each weight to its gradient, an L2 penalty as in "
                         "torch.optim.Adam (not given: the task's, 0 for most)")
    ap.add_argument("--grokfast", nargs="?", const=2.0, type=flags.positive, metavar="LAMBDA",
                    help="amplify the slow part of the gradient by LAMBDA (LAMBDA not given: 2; "
                         "EMA 0.98)")
    ap.add_argument("--plot", type=Path, metavar="PATH",
                    help="where a task with curves draws them (not given: the checkpoint path "
                         "with .png)")
    ap.add_argument("--init", metavar="NAME|PATH",
                    help="--task text: start from GPT-2's weights (gpt2, gpt2-medium, gpt2-large, "
                         "gpt2-xl) or a checkpoint file or folder (not given: gpt2)")
    ap.add_argument("--block-size", type=flags.count, metavar="N",
                    help="--task text: tokens per training sequence (not given: 128, or the "
                         "model's context if shorter)")
    ap.add_argument("--batch-size", type=flags.count, metavar="N",
                    help="sequences per step, or per micro-batch with --grad-accum (not given: "
                         "the task's)")
    ap.add_argument("--grad-accum", type=flags.count, default=1, metavar="K",
                    help="add the gradients of K batches before each step: the step of a batch "
                         "K times larger, in the memory of one")
    ap.add_argument("--devices", type=device_list, metavar="A,B,...",
                    help="split each batch across these devices, the weights on each: data "
                         "parallelism in one process (e.g. CPU:0,CPU:1 or CUDA:0,CUDA:1)")
    ap.add_argument("--device", metavar="NAME",
                    help="tinygrad backend: CPU, CPU:LLVM, CL, CUDA, METAL, ... (not given: DEV, "
                         "else the fastest here)")
    ap.add_argument("-v", "--verbose", action="store_true", help="progress, evals and samples")
    return flags.run(command, ap.parse_args(argv))


def cli():
    """`python transformer.py ...` and `python train.py ...` both end here (flags.run again: a
    Ctrl-C while the flags are read is one line too)."""
    exit_now(flags.run(main))


if __name__ == "__main__":
    cli()
