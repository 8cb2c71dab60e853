"""Tests for the grokking and induction tasks (tasks.py), the attention-only model, Grokfast and
the training curves: numbers against NumPy oracles written here, then short runs end to end.

    DEV=CPU .venv/bin/python -m pytest -q tests/test_tasks.py

Every new model shape costs tinygrad tens of seconds to compile on two cores, so the shapes are
tiny and shared, and only two tests train.
"""

import ast
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from tinygrad import Context, Tensor

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from test_transformer import assert_clean_error, cli  # noqa: E402  transformer.py, one error line

import heads  # noqa: E402
from heads import attention_maps  # noqa: E402
from tasks import (  # noqa: E402
    IGNORE,  # noqa: E402
    TASKS,
    Grokking,
    Induction,
    SlowGrokking,
    Task,
    fourier_concentration,
)
from train import make_optimizer, make_train_step, train  # noqa: E402
from transformer import Config, Transformer  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def compile_in_process():
    """Lower kernels in this process, not tinygrad's worker pool (see tests/test_transformer.py)."""
    with Context(PARALLEL=0):
        yield


# ---------------------------------------------------------------------------------------------
# The declared task interface (tasks.Task)
# ---------------------------------------------------------------------------------------------


def read_from_tasks(source: str) -> tuple[set[str], list[str]]:
    """The attributes a file reads from a name `task` (or from TASKS[...]), and every
    getattr/hasattr call on one, from its syntax tree."""
    tree = ast.parse(source)
    is_task = lambda node: ((isinstance(node, ast.Name) and node.id == "task")
                            or (isinstance(node, ast.Subscript)
                                and isinstance(node.value, ast.Name) and node.value.id == "TASKS"))
    read = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and is_task(n.value)}
    probes = [ast.unparse(n) for n in ast.walk(tree)
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
              and n.func.id in ("getattr", "hasattr") and n.args and is_task(n.args[0])]
    return read, probes


def test_train_reads_only_what_task_declares():
    """train.py once probed tasks with 19 getattr/hasattr calls; now every attribute it reads is
    declared on Task (an annotation or a default), and it probes none."""
    read, probes = read_from_tasks((REPO / "train.py").read_text())
    declared = set(dir(Task)) | set(Task.__annotations__)
    assert read, "the parse found no task.X at all"
    assert read <= declared, sorted(read - declared)
    assert probes == []
    # and the check can fail: an undeclared read and a probe are both found
    read, probes = read_from_tasks("task.colour\nhasattr(task, 'plot')\n")
    assert read == {"colour"} and probes == ["hasattr(task, 'plot')"]


def test_every_task_derives_from_task_and_states_what_task_requires(tmp_path):
    text = tmp_path / "text.txt"
    # long enough for the text task too: 10 windows of 128 BPE tokens and their targets
    text.write_text("To be, or not to be, that is the question.\n" * 200)
    required = [a for a in Task.__annotations__ if a not in vars(Task)]  # those with no default
    assert {"name", "config", "chance", "batch_size"} <= set(required)
    for name, cls in TASKS.items():
        assert issubclass(cls, Task), name
        task = cls(data=str(text)) if cls.reads_data else cls()  # abstract methods left: TypeError
        missing = [a for a in required if not hasattr(task, a)]
        assert missing == [], (name, missing)
        assert task.name == name
    # a task that leaves out a required method cannot be made
    class NoJudge(Task):
        def batch(self, rng, B):
            return None

    with pytest.raises(TypeError, match="evaluate"):
        NoJudge()


class Copy(Task):
    """The least a task states: copy the previous token. Everything else is Task's default."""

    name, metric, higher_is_better = "copy", "accuracy", True
    steps, batch_size, lr, eval_every = 2, 3, 1e-2, 1
    config = Config(vocab_size=5, n_ctx=4, n_layer=1, n_head=2, n_embd=8, mlp=False)
    chance = 0.2

    def batch(self, rng, B):
        x = rng.integers(0, 5, (B, 4)).astype(np.int32)
        return x, np.roll(x, 1, axis=1)

    def evaluate(self, model, quick=False):
        x, y = self.batch(np.random.default_rng(1), 8)
        return float((model(Tensor(x)).argmax(-1).numpy() == y).mean())

    def learned(self, score):
        return score > 0.9

    def show(self, model, seed=0):
        return "copy"


def test_a_task_with_only_the_required_members_trains_on_the_defaults(tmp_path):
    """The loop fills in Task's defaults: it prints its own quick evaluation where observe offers
    none, and saves no history with the checkpoint."""
    lines = []
    task = Copy()
    result = train(task, seed=0, out=tmp_path / "copy", verbose=True, log=lines.append)
    assert result["steps"] == 2 and 0 <= result["score"] <= 1
    evals = [line for line in lines if line.startswith("eval")]
    assert len(evals) == 1 and re.fullmatch(r"eval  step 1: accuracy [0-9.]+", evals[0]), lines
    meta = json.loads((tmp_path / "copy.json").read_text())
    assert "history" not in meta and meta["task"] == "copy"


# ---------------------------------------------------------------------------------------------
# Grokking: the data and the Fourier progress measure
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p, fraction", [(7, 0.5), (11, 0.3), (59, 0.5)])
def test_grokking_split_covers_every_pair_once(p, fraction):
    task = Grokking(p=p, train_fraction=fraction)
    ids = np.concatenate([task.train_ids, task.test_ids])
    assert sorted(ids) == list(range(p * p))  # every pair, once, in exactly one of the two
    assert len(task.train_ids) == round(fraction * p * p) == task.batch_size
    pairs = {tuple(ab) for ab in task.x_all[:, :2]}
    assert len(pairs) == p * p  # and the p^2 rows are the p^2 distinct pairs


def test_grokking_split_is_fixed_and_only_the_answer_is_scored():
    task = Grokking(p=11, train_fraction=0.4)
    assert (Grokking(p=11, train_fraction=0.4).train_ids == task.train_ids).all()
    x, y = task.batch(np.random.default_rng(0), 3)  # full batch, whatever B says
    assert x.shape == y.shape == (len(task.train_ids), 3)
    a, b = x[:, 0], x[:, 1]
    assert (x[:, 2] == 11).all()  # "="
    assert (y[:, :2] == IGNORE).all()  # nothing scored but the answer
    assert ((a + b) % 11 == y[:, 2]).all()
    train_pairs = set(map(tuple, x[:, :2]))
    test_pairs = set(map(tuple, task.x_all[task.test_ids, :2]))
    assert not train_pairs & test_pairs


def test_slow_grokking_is_lee_et_al_setting_in_mini_batches():
    task = SlowGrokking()
    assert (task.p, len(task.train_ids), task.batch_size) == (97, round(0.5 * 97 * 97), 512)
    c = task.config
    assert (c.n_layer, c.n_head, c.n_embd, c.vocab_size) == (2, 4, 128, 98)
    assert (task.lr, task.weight_decay, task.l2, task.clip) == (1e-3, 0.0, 0.0, None)
    # embeddings drawn at PyTorch's std 1 (positions 0.5, GPT-2's ratio); the rest as GPT-2's
    Tensor.manual_seed(0)
    model = Transformer(c)
    wte, wpe = model.wte.weight.numpy(), model.wpe.weight.numpy()
    assert wte[:98].std() == pytest.approx(1.0, rel=0.02) and not wte[98:].any()  # padding rows
    assert wpe.std() == pytest.approx(0.5, rel=0.1)
    assert model.h[0].attn.c_attn.weight.numpy().std() == pytest.approx(0.02, rel=0.02)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(3):
        x, y = task.batch(rng, 7)  # the task's batch size, whatever B says
        pairs = list(map(tuple, x[:, :2]))
        assert x.shape == (512, 3) and len(set(pairs)) == 512  # no pair twice in one batch
        assert set(map(int, pairs @ np.array([97, 1]))) <= set(task.train_ids)
        assert ((x[:, 0] + x[:, 1]) % 97 == y[:, 2]).all() and (y[:, :2] == IGNORE).all()
        seen |= set(pairs)
    assert len(seen) > 1024  # fresh draws each step, not one batch again


def np_fourier_concentration(E: np.ndarray, top: int) -> float:
    """The same measure through an explicit real Fourier basis: project each embedding column
    on the orthonormal cos/sin vectors of every frequency and add up squares (no FFT)."""
    p = E.shape[0]
    a = np.arange(p)
    energy = [np.sum(E.mean(0) ** 2) * p]  # k = 0: the constant vector 1 / sqrt(p)
    for k in range(1, p // 2 + 1):
        basis = [np.cos(2 * np.pi * k * a / p)]
        if 2 * k != p:
            basis.append(np.sin(2 * np.pi * k * a / p))
        energy.append(sum(np.sum((v / np.linalg.norm(v) @ E) ** 2) for v in basis))
    energy = np.array(energy)
    assert np.isclose(energy.sum(), np.sum(E**2))  # the basis is complete and orthonormal
    return float(np.sort(energy[1:])[::-1][:top].sum() / energy.sum())


@pytest.mark.parametrize("p", [11, 12, 59])
@pytest.mark.parametrize("top", [1, 4])
def test_fourier_concentration_matches_numpy_basis(p, top):
    E = np.random.default_rng(p + top).normal(size=(p, 8))
    E[:, :3] += np.cos(2 * np.pi * 3 * np.arange(p) / p)[:, None] * [2.0, -1.0, 0.5]
    assert fourier_concentration(E, top) == pytest.approx(np_fourier_concentration(E, top),
                                                          abs=1e-10)


@pytest.mark.parametrize("k", [1, 5, 29])
def test_fourier_concentration_of_a_pure_wave_is_one(k):
    p, a = 59, np.arange(59)
    phases = np.random.default_rng(k).uniform(0, 2 * np.pi, 16)
    E = np.cos(2 * np.pi * k * a[:, None] / p + phases) * np.linspace(0.5, 2, 16)  # (p, 16)
    assert fourier_concentration(E, top=1) == pytest.approx(1.0, abs=1e-12)
    two = E + 0.5 * np.sin(2 * np.pi * ((k % 20) + 1) * a[:, None] / p)
    assert fourier_concentration(two, top=1) < 0.95  # a second frequency is not the first


def test_fourier_concentration_of_white_noise_is_near_its_share_of_frequencies():
    # With C = 4096 columns the energy per frequency concentrates at its mean, 2/p of the total,
    # so the 4 strongest of (p - 1)/2 = 29 frequencies hold just over 8/p = 0.136.
    p = 59
    score = fourier_concentration(np.random.default_rng(0).normal(size=(p, 4096)), top=4)
    assert 8 / p <= score <= 8 / p * 1.15, score


# ---------------------------------------------------------------------------------------------
# Induction: the data and the score
# ---------------------------------------------------------------------------------------------


def test_induction_sequences_repeat_exactly():
    task = Induction()
    T = task.config.n_ctx + 1
    seq, first, repeat = task.sequences(np.random.default_rng(5), 200)
    assert seq.shape == (200, T) and seq.max() < 100
    lengths = first.sum(1) + 1  # the first token of the first copy is never a target
    lo, hi = task.lengths
    assert lengths.min() == lo and lengths.max() == hi and len(set(lengths)) == hi - lo + 1
    for s, f, r, L in zip(seq, first, repeat, lengths):
        assert len(set(s[:L])) == L  # no repeats within the segment
        assert (s == np.resize(s[:L], T)).all()  # then the segment again and again
        # the masks name targets y = seq[:, 1:]: the first copy, the repeat after its first token
        assert (np.flatnonzero(f) + 1 == np.arange(1, L)).all()
        assert (np.flatnonzero(r) + 1 == np.arange(L + 1, T)).all()


def test_induction_batches_carry_loss_on_the_repeat_only():
    task = Induction()
    x, y = task.batch(np.random.default_rng(5), 50)
    seq, _, repeat = task.sequences(np.random.default_rng(5), 50)
    assert (x == seq[:, :-1]).all()
    assert (y[repeat] == seq[:, 1:][repeat]).all() and (y[~repeat] == IGNORE).all()


def test_induction_score_of_a_perfect_pattern_is_one_and_uniform_is_the_baseline():
    task = Induction()
    x = task.x  # (B, T): the evaluation batch
    B, T = x.shape
    perfect = np.zeros((B, 1, 1, T, T))
    targets = {}  # (b, t) -> the keys right after earlier occurrences of token t
    for b in range(B):
        for t in range(T):
            earlier = np.flatnonzero(x[b, :t] == x[b, t])
            if len(earlier):
                targets[b, t] = earlier + 1
                perfect[b, 0, 0, t, earlier + 1] = 1.0 / len(earlier)
            else:
                perfect[b, 0, 0, t, t] = 1.0
    assert sum(len(v) for v in targets.values()) >= sum(task.repeat.sum(1) + 1)
    assert heads.induction_scores(perfect, x)[0, 0] == pytest.approx(1.0)
    # uniform attention: a query t with n targets gives them n of its t + 1 equal shares
    expected = np.mean([len(v) / (t + 1) for (_, t), v in targets.items()])
    assert task.chance == pytest.approx(expected, rel=1e-12)
    uniform = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]
    att = np.broadcast_to(uniform, (B, 1, 1, T, T))
    assert heads.induction_scores(att, x)[0, 0] == pytest.approx(task.chance, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# The attention-only model against NumPy
# ---------------------------------------------------------------------------------------------

ATTN_ONLY = Config(vocab_size=7, n_ctx=6, n_layer=2, n_head=2, n_embd=8, mlp=False)


def np_layernorm(x, w, b, eps=1e-5):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b


def np_attention_only(w: dict, idx: np.ndarray, config: Config) -> np.ndarray:
    """Logits (B, T, vocab) of an attention-only pre-LN transformer with tied embeddings."""
    B, T = idx.shape
    C, H = config.n_embd, config.n_head
    x = w["wte.weight"][idx] + w["wpe.weight"][:T]  # (B, T, C)
    future = np.triu(np.ones((T, T), dtype=bool), 1)
    for i in range(config.n_layer):
        h = x
        if config.layernorm:
            h = np_layernorm(x, w[f"h.{i}.ln_1.weight"], w[f"h.{i}.ln_1.bias"])
        qkv = h @ w[f"h.{i}.attn.c_attn.weight"].T + w[f"h.{i}.attn.c_attn.bias"]  # (B, T, 3C)
        q, k, v = (a.reshape(B, T, H, C // H).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, -1))
        scores = np.where(future, -np.inf, q @ k.transpose(0, 1, 3, 2) / np.sqrt(C // H))
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)  # (B, H, T, T)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
        x = x + y @ w[f"h.{i}.attn.c_proj.weight"].T + w[f"h.{i}.attn.c_proj.bias"]
    x = np_layernorm(x, w["ln_f.weight"], w["ln_f.bias"])
    return x @ w["wte.weight"][: config.vocab_size].T


@pytest.mark.parametrize("layernorm", [True, False])
def test_attention_only_model_has_no_mlp_and_matches_numpy(layernorm):
    config = Config(**{**ATTN_ONLY.__dict__, "layernorm": layernorm})
    Tensor.manual_seed(0)
    model = Transformer(config)
    names = set(model.parameters())
    assert not any(".mlp." in n or ".ln_2." in n for n in names), names
    assert any(".ln_1." in n for n in names) == layernorm
    rng = np.random.default_rng(1)
    weights = {}
    for name, p in model.parameters().items():
        values = rng.normal(0, 0.5, p.shape) + (1.0 if name.endswith("ln_1.weight") else 0.0)
        p.assign(Tensor(values.astype(np.float32))).realize()
        weights[name] = values
    idx = rng.integers(0, config.vocab_size, (2, config.n_ctx)).astype(np.int32)
    got = model(Tensor(idx)).numpy()
    np.testing.assert_allclose(got, np_attention_only(weights, idx, config), rtol=1e-4, atol=1e-4)


def test_default_config_keeps_the_mlp():
    names = set(Transformer(Config(n_layer=1, n_embd=8, n_head=2)).parameters())
    assert {"h.0.mlp.c_fc.weight", "h.0.ln_2.weight"} <= names


# ---------------------------------------------------------------------------------------------
# Grokfast against a NumPy EMA
# ---------------------------------------------------------------------------------------------


def test_grokfast_filter_matches_numpy_ema():
    """With lr 0 the weights stay put, so each step's gradient is that of its own batch alone:
    the EMA the step keeps, and the norm of the amplified gradient it reports, are checked
    against NumPy's running average of those gradients."""
    config = Config(vocab_size=5, n_ctx=4, n_layer=1, n_head=2, n_embd=8, mlp=False)
    Tensor.manual_seed(0)
    model = Transformer(config)
    opt = make_optimizer(model, lr=0.0)
    alpha, lamb = 0.9, 3.0
    step = make_train_step(model, opt, clip=1e9, grokfast=(alpha, lamb))
    rng = np.random.default_rng(0)
    ema = None
    with Context(TRAINING=1):
        for _ in range(4):  # past TinyJit's capture: the replayed step must update it too
            x = rng.integers(0, 5, (3, 4)).astype(np.int32)
            y = rng.integers(0, 5, (3, 4)).astype(np.int32)
            loss = model(Tensor(x)).sparse_categorical_crossentropy(Tensor(y))
            grads = [g.numpy() for g in loss.gradient(*opt.params)]
            ema = grads if ema is None else [alpha * e + (1 - alpha) * g
                                             for e, g in zip(ema, grads)]
            _, norm = step(Tensor(x), Tensor(y), Tensor([0.0]))
            amplified = np.sqrt(sum(np.sum((g + lamb * e) ** 2) for g, e in zip(grads, ema)))
            assert norm.item() == pytest.approx(amplified, rel=1e-4)
    for got, want in zip(step.grokfast_ema, ema):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-7)


def test_l2_penalty_enters_adam_as_numpy_adam_says():
    """Three unclipped steps of Adam with an L2 penalty, against NumPy's Adam fed g + l2 * w (the
    loss gradient g from tinygrad's autodiff at the weights before each step): the weights after
    each step, and the norm the step reports."""
    config = Config(vocab_size=5, n_ctx=4, n_layer=1, n_head=2, n_embd=8, mlp=False)
    Tensor.manual_seed(0)
    model = Transformer(config)
    lr, l2, (b1, b2), eps = 0.01, 0.3, (0.9, 0.98), 1e-8
    opt = make_optimizer(model, lr=lr, weight_decay=0.0, betas=(b1, b2))
    step = make_train_step(model, opt, clip=None, l2=l2)
    rng = np.random.default_rng(0)
    w = [p.numpy().astype(np.float64) for p in opt.params]
    m, v = [np.zeros_like(a) for a in w], [np.zeros_like(a) for a in w]
    with Context(TRAINING=1):
        for t in range(1, 4):  # past TinyJit's capture
            x = rng.integers(0, 5, (3, 4)).astype(np.int32)
            y = rng.integers(0, 5, (3, 4)).astype(np.int32)
            loss = model(Tensor(x)).sparse_categorical_crossentropy(Tensor(y))
            g = [a.numpy() + l2 * b for a, b in zip(loss.gradient(*opt.params), w)]
            m = [b1 * a + (1 - b1) * b for a, b in zip(m, g)]
            v = [b2 * a + (1 - b2) * b ** 2 for a, b in zip(v, g)]
            w = [a - lr * (mi / (1 - b1 ** t)) / (np.sqrt(vi / (1 - b2 ** t)) + eps)
                 for a, mi, vi in zip(w, m, v)]
            _, norm = step(Tensor(x), Tensor(y), Tensor([lr]))
            assert norm.item() == pytest.approx(np.sqrt(sum(np.sum(a ** 2) for a in g)), rel=1e-4)
            for param, want in zip(opt.params, w):
                got, want = param.numpy(), want.copy()
                if param is model.h[0].attn.c_attn.bias:
                    # The key bias's gradient is 0 in exact arithmetic (q·b_k shifts a whole row
                    # of scores, which softmax ignores): what arrives is float noise, which Adam
                    # scales up to a step of up to lr whichever way the noise fell. The penalty
                    # still pulls it; only the noise's share is not comparable.
                    keys = slice(8, 16)
                    assert np.abs(got[keys] - want[keys]).max() <= 2 * lr * t
                    got[keys] = want[keys] = 0.0
                np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


# ---------------------------------------------------------------------------------------------
# Short training runs
# ---------------------------------------------------------------------------------------------


def test_grokking_training_fits_the_training_pairs(tmp_path):
    task = Grokking(p=11, train_fraction=0.5, n_embd=16)
    result = train(task, steps=40, seed=0, log=lambda *a: None)
    h = task.history
    assert [e["step"] for e in h] == list(range(10, 41, 10))
    assert h[-1]["train_acc"] >= 0.25 > 2.5 / 11, h[-1]  # chance is 1/11; measured 0.38
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert result["score"] == h[-1]["test_acc"]
    assert 0 < h[-1]["fourier"] < 1 and h[-1]["weight_norm"] > 0
    # the norm the task reports is that of every parameter
    norm = math.sqrt(sum(np.sum(p.numpy().astype(np.float64) ** 2)
                         for p in result["model"].parameters().values()))
    assert h[-1]["weight_norm"] == pytest.approx(norm, rel=1e-4)
    assert re.fullmatch(r"memorized=(\d+|none) generalized=(\d+|none)", task.result_fields())
    png = task.plot(tmp_path / "g.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_induction_scores_come_from_the_model_attention():
    task = Induction()
    config = Config(**{**task.config.__dict__, "n_embd": 16, "n_head": 2})
    Tensor.manual_seed(0)
    model = Transformer(config)
    s = task.scores(model)
    _, att = attention_maps(model, Tensor(task.x))
    np.testing.assert_allclose(heads.induction_scores(att.numpy(), task.x).max(), s["best"],
                               rtol=1e-6)
    assert s["first_loss"] == pytest.approx(math.log(100), abs=0.05)  # untrained: uniform
    assert abs(s["best"] - task.chance) < 0.02
    assert task.evaluate(model) == s["best"]
    assert re.fullmatch(r"repeat_loss=[0-9.]+ first_loss=[0-9.]+ head=[01]\.[01]",
                        task.result_fields())


INDUCTION_LINE = (r"^result: task=induction induction_score=[0-9.]+ chance=0\.0\d+ steps=1 "
                  r"time=[0-9.]+s repeat_loss=[0-9.]+ first_loss=[0-9.]+ head=[01]\.[01]$")


def test_cli_induction_result_line(tmp_path):
    run = cli("--task", "induction", "--steps", "1", "--n-embd", "16", "--n-head", "2",
              "--out", str(tmp_path / "ind"))
    assert run.returncode == 0, run.stderr
    assert re.match(INDUCTION_LINE, run.stdout.strip().splitlines()[-1]), run.stdout
    assert (tmp_path / "ind.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, fragments", [
    (["--task", "grokking", "--grokfast", "fast"], ["--grokfast", "fast"]),
    (["--task", "grokking", "--grokfast", "-1"], ["--grokfast", "-1"]),
    (["--task", "grokking", "--grokfast", "nan"], ["--grokfast", "nan"]),
    (["--task", "reverse", "--plot", "x.png"], ["--plot", "reverse"]),
    (["--task", "grokking", "--weight-decay", "-0.1"], ["--weight-decay", "-0.1"]),
    (["--task", "grokking", "--weight-decay", "inf"], ["--weight-decay", "inf"]),
    (["--task", "grokking", "--weight-decay", "nan"], ["--weight-decay", "nan"]),
    (["--task", "grokking", "--weight-decay", "heavy"], ["--weight-decay", "heavy"]),
    (["--task", "grokking-slow", "--l2", "-0.005"], ["--l2", "-0.005"]),
    (["--task", "grokking-slow", "--l2", "inf"], ["--l2", "inf"]),
    (["--task", "grokking-slow", "--l2", "much"], ["--l2", "much"]),
])
def test_cli_bad_arguments(args, fragments):
    assert_clean_error(cli(*args), *fragments)


GROK_LINE = (r"^result: task=grokking accuracy=[0-9.]+ chance=0\.01695 steps=(\d+) "
             r"time=[0-9.]+s memorized=(\d+|none) generalized=(\d+|none)$")


def test_cli_grokking_trains_plots_resumes_and_samples(tmp_path):
    out, png = tmp_path / "grok", tmp_path / "curves.png"
    tiny = ["--n-embd", "8", "--n-head", "2"]
    run = cli("--task", "grokking", "--steps", "10", *tiny, "--out", str(out),
              "--plot", str(png), "--grokfast", "--l2", "0.01")
    assert run.returncode == 0, run.stderr
    assert re.match(GROK_LINE, run.stdout.strip().splitlines()[-1]), run.stdout
    assert png.stat().st_size > 1000
    # the picture names its run: the flags that change what is learned, not where files go
    assert PIL.Image.open(png).text["Title"] == ("python transformer.py --task grokking --seed 0 "
                                                 "--steps 10 --l2 0.01 --grokfast 2")
    meta = json.loads(Path(f"{out}.json").read_text())
    assert meta["step"] == 10 and [h["step"] for h in meta["history"]] == [10]
    assert meta["config"]["n_embd"] == 8 and meta["config"]["mlp"] is True
    run = cli("--task", "grokking", "--resume", "--steps", "20", "--out", str(out), "-v")
    assert run.returncode == 0, run.stderr
    assert "eval  step 20: train acc" in run.stdout
    assert re.match(GROK_LINE, run.stdout.strip().splitlines()[-1]).group(1) == "20"
    assert [h["step"] for h in json.loads(Path(f"{out}.json").read_text())["history"]] == [10, 20]
    assert Path(f"{out}.png").exists()  # --plot's default: beside the checkpoint
    run = cli("--task", "grokking", "--sample", "--out", str(out))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 4 and all(re.match(r"^\d+ \+ \d+ = \d+ \(mod 59\)  (ok|WRONG)$", line)
                                   for line in lines), lines
