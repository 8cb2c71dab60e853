"""Tests for the curriculum's experiments: the four similarity functions, the ablations, and the
reversal's mask check, each against a NumPy oracle written here or in test_transformer.py.

    DEV=CPU .venv/bin/python -m pytest -q tests/test_ablations.py
"""

import json
import math
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from tinygrad import Context, Tensor, Variable
from tinygrad.nn.state import get_state_dict

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import run_main, small_reversal_config  # noqa: E402
from test_transformer import (  # noqa: E402
    assert_clean_error,
    help_entries,
    np_block,
    np_causal_mask,
    np_gelu_tanh,
    np_layernorm,
    np_multi_head,
    np_softmax,
    randomize,
)

import flags  # noqa: E402
from flags import UserError  # noqa: E402
from tasks import Reverse, Shakespeare, Words  # noqa: E402
from train import load_checkpoint, make_optimizer, save_checkpoint, train  # noqa: E402
from train import main as train_main  # noqa: E402
from transformer import (  # noqa: E402
    ABLATIONS,
    SIMILARITIES,
    Block,
    CausalSelfAttention,
    Config,
    Transformer,
)

CONFIG = Config(vocab_size=13, n_ctx=12, n_layer=2, n_head=2, n_embd=16)
B, L = 2, CONFIG.n_ctx


@pytest.fixture(scope="module", autouse=True)
def compile_in_process():
    with Context(PARALLEL=0):  # see test_transformer.py
        yield


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(2).integers(0, CONFIG.vocab_size, (B, L)).astype(np.int32)


def make(config: Config, seed: int = 0) -> Transformer:
    Tensor.manual_seed(seed)
    model = Transformer(config)
    randomize(model.parameters(), config.vocab_size, seed)
    return model


# ---------------------------------------------------------------------------------------------
# Similarity functions
# ---------------------------------------------------------------------------------------------


def np_scores(kind: str, q, k, w: dict, h: int):
    """Scores (T, S) of head h, for q (T, hs) and k (S, hs), one pair at a time where it helps."""
    hs = q.shape[-1]
    if kind == "dot":
        return q @ k.T
    if kind == "scaled":
        return q @ k.T / math.sqrt(hs)
    if kind == "general":
        return q @ w["w_general"][h] @ k.T
    wq, wk, v = w["w_q_add"][h], w["w_k_add"][h], w["v_add"][h]
    out = np.zeros((len(q), len(k)))
    for t in range(len(q)):
        for s in range(len(k)):
            out[t, s] = v @ np.tanh(q[t] @ wq + k[s] @ wk)  # Bahdanau's vᵀ tanh(W q + U k)
    return out


@pytest.mark.parametrize("kind", SIMILARITIES)
def test_similarity_attention_matches_numpy(kind):
    C, H, T = 16, 2, 6
    attn = CausalSelfAttention(C, H, n_ctx=T, similarity=kind)
    params = get_state_dict(attn)
    randomize(params, 0, seed=4)
    w = {name: t.numpy().astype(np.float64) for name, t in params.items()}
    x = np.random.default_rng(4).normal(0, 1, (B, T, C)).astype(np.float32)
    got = attn(Tensor(x)).numpy()
    qkv = x.astype(np.float64) @ w["c_attn.weight"].T + w["c_attn.bias"]
    want = np.zeros((B, T, C))
    hs = C // H
    for b in range(B):
        heads = []
        for h in range(H):
            q, k, v = (qkv[b, :, i * C + h * hs : i * C + (h + 1) * hs] for i in range(3))
            att = np_softmax(np_scores(kind, q, k, w, h) + np_causal_mask(T, T, 0))
            heads.append(att @ v)
        want[b] = np.concatenate(heads, -1) @ w["c_proj.weight"].T + w["c_proj.bias"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", SIMILARITIES)
def test_similarity_kv_cache_equals_full_forward(kind, tokens):
    model = make(replace(CONFIG, similarity=kind), seed=5)
    full = model(Tensor(tokens)).numpy()
    got = model(Tensor(tokens[:, :5]), 0).numpy()  # prefill
    np.testing.assert_allclose(got, full[:, :5], rtol=0, atol=1e-4)
    pos = Variable("pos", 1, L - 1)
    for p in range(5, L):  # then one token at a time from the cache
        got = model(Tensor(tokens[:, p : p + 1]), pos.bind(p)).numpy()
        np.testing.assert_allclose(got[:, 0], full[:, p], rtol=0, atol=1e-4)


def test_general_starts_as_scaled_and_similarities_differ(tokens):
    scaled = make(CONFIG, seed=7)
    general = make(replace(CONFIG, similarity="general"), seed=7)
    hs = CONFIG.n_embd // CONFIG.n_head
    for block in general.h:  # W = I / √hs, as initialized, gives back the scaled dot product
        block.attn.w_general.assign(Tensor(np.broadcast_to(
            np.eye(hs) / math.sqrt(hs), (CONFIG.n_head, hs, hs)).astype(np.float32))).realize()
    for name, p in scaled.parameters().items():
        general.parameters()[name].assign(p.numpy()).realize()
    np.testing.assert_allclose(general(Tensor(tokens)).numpy(), scaled(Tensor(tokens)).numpy(),
                               atol=1e-5)
    dot = make(replace(CONFIG, similarity="dot"), seed=7)
    assert np.abs(dot(Tensor(tokens)).numpy() - scaled(Tensor(tokens)).numpy()).max() > 1e-2


# ---------------------------------------------------------------------------------------------
# Ablations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prenorm", [True, False])
def test_no_residual_block_is_the_formula_without_the_sums(prenorm):
    config = replace(CONFIG, prenorm=prenorm, residual=False)
    block = Block(config)
    weights = get_state_dict(block)
    randomize(weights, 0, seed=8)
    x = np.random.default_rng(8).normal(0, 2, (B, L, CONFIG.n_embd)).astype(np.float32)
    w = {name: t.numpy().astype(np.float64) for name, t in weights.items()}

    def ln(name, h):
        return np_layernorm(h, w[f"{name}.weight"], w[f"{name}.bias"], config.ln_eps)

    def attn(h):
        return np_multi_head(h, w["attn.c_attn.weight"], w["attn.c_attn.bias"],
                             w["attn.c_proj.weight"], w["attn.c_proj.bias"], config.n_head)

    def mlp(h):
        return (np_gelu_tanh(h @ w["mlp.c_fc.weight"].T + w["mlp.c_fc.bias"])
                @ w["mlp.c_proj.weight"].T + w["mlp.c_proj.bias"])

    h = x.astype(np.float64)
    want = mlp(ln("ln_2", attn(ln("ln_1", h)))) if prenorm else ln("ln_2", mlp(ln("ln_1", attn(h))))
    np.testing.assert_allclose(block(Tensor(x)).numpy(), want, rtol=1e-4, atol=1e-4)


def test_shared_layers_hold_one_block_and_apply_it_at_every_depth(tokens):
    config = replace(CONFIG, n_layer=3, shared_layers=True)
    model = make(config, seed=9)
    names = set(model.parameters())
    one_block = {n for n in Transformer(replace(CONFIG, n_layer=1)).parameters()}
    assert names == one_block  # h.0.* and nothing of h.1 or h.2
    w = {n: t.numpy().astype(np.float64) for n, t in model.parameters().items()}
    block_w = {n.removeprefix("h.0."): v for n, v in w.items() if n.startswith("h.0.")}
    x = w["wte.weight"][tokens] + w["wpe.weight"][:L]
    for _ in range(3):
        x = np_block(x, block_w, True, config.ln_eps, config.n_head)
    x = np_layernorm(x, w["ln_f.weight"], w["ln_f.bias"], config.ln_eps)
    want = (x @ w["wte.weight"].T)[..., : config.vocab_size]
    np.testing.assert_allclose(model(Tensor(tokens)).numpy(), want, rtol=1e-3, atol=1e-3)
    # the blocks hold the same tensors, so an optimizer step moves every layer at once; the KV
    # cache stays each layer's own
    assert model.h[2].attn.c_attn.weight is model.h[0].attn.c_attn.weight
    assert model.h[1].mlp is model.h[0].mlp and model.h[1].attn is not model.h[0].attn


def test_no_mask_lets_a_position_see_later_tokens(tokens):
    changed = tokens.copy()
    changed[:, 8] = (changed[:, 8] + 1) % CONFIG.vocab_size
    for causal in (True, False):
        model = make(replace(CONFIG, causal=causal), seed=10)
        before = model(Tensor(tokens)).numpy()[:, 3]
        after = model(Tensor(changed)).numpy()[:, 3]
        moved = np.abs(after - before).max()
        assert (moved > 1e-3) if not causal else (moved == 0), (causal, moved)


def test_no_positions_has_no_positional_weights_and_ignores_order(tokens):
    config = replace(CONFIG, n_layer=1, positions="none")
    model = make(config, seed=11)
    assert not any(name.startswith(("wpe", "pe")) for name in get_state_dict(model))
    perm = np.concatenate([np.random.default_rng(0).permutation(L - 1), [L - 1]])
    last = model(Tensor(tokens)).numpy()[:, -1]
    shuffled = model(Tensor(tokens[:, perm])).numpy()[:, -1]
    np.testing.assert_allclose(shuffled, last, atol=1e-5)
    learned = make(replace(config, positions="learned"), seed=11)  # with positions it differs
    moved = learned(Tensor(tokens[:, perm])).numpy()[:, -1] - learned(Tensor(tokens)).numpy()[:, -1]
    assert np.abs(moved).max() > 1e-3


def test_checkpoint_records_the_ablations(tmp_path, tokens):
    config = replace(CONFIG, causal=False, shared_layers=True, positions="none",
                     similarity="additive")
    model = make(config, seed=12)
    save_checkpoint(tmp_path / "ab", model, make_optimizer(model, 1e-3), {"task": "x", "step": 1})
    meta = json.loads((tmp_path / "ab.json").read_text())
    assert meta["config"]["causal"] is False and meta["config"]["similarity"] == "additive"
    loaded, _, _ = load_checkpoint(tmp_path / "ab")
    assert loaded.config == config
    np.testing.assert_array_equal(loaded(Tensor(tokens)).numpy(), model(Tensor(tokens)).numpy())


# ---------------------------------------------------------------------------------------------
# The mask check on the reversal task
# ---------------------------------------------------------------------------------------------


def test_position_losses_are_the_cross_entropy_of_the_logits():
    task = Reverse(n_digits=3)
    task.test = task.test[:20]
    model = make(task.config, seed=13)
    seq = np.concatenate([task.test, np.full((20, 1), 10), task.test[:, ::-1]], axis=1)
    logits = model(Tensor(seq[:, :-1].astype(np.int32))).numpy().astype(np.float64)
    probs = np_softmax(logits)
    nll = -np.log(probs[np.arange(20)[:, None], np.arange(6)[None], seq[:, 1:]])  # (20, 6)
    np.testing.assert_allclose(task.position_losses(model), nll.mean(0), rtol=1e-6, atol=1e-6)
    line = task.mask_check(model)
    q, a = nll[:, :2].mean(), nll[:, 3:].mean()  # predicting digits 2-3, then the 3 answers
    assert line == f"mask check: question {q:.3f} nats (chance 2.303), answer {a:.3f} nats"


def test_the_mask_check_tells_a_masked_model_from_one_that_sees_ahead(reversal):
    """Train the tiny reversal both ways: with the mask the question digits stay at chance (ln 10)
    while the answer is learned; without it, the question is "predicted" by peeking at the next
    input. Measured (seed 0; 300 steps with the mask, 150 without): question 2.32 / 0.05 nats.
    (This small model learns the mirror too, so its greedy decoding survives without the mask,
    1.0 exact match; the default 8-digit model's collapses to 0.04, see QUESTIONS.md.)"""
    masked_task, masked = reversal  # the masked model is the one the training tests share
    task = Reverse(n_digits=3)
    peeking = train(task, steps=150, seed=0, config=small_reversal_config(task, causal=False),
                    log=lambda *a: None)
    results = {}
    for causal, t, result in ((True, masked_task, masked), (False, task, peeking)):
        losses = t.position_losses(result["model"])
        results[causal] = (losses[:2].mean(), losses[3:].mean(), result["score"])
    (q_mask, a_mask, em_mask), (q_peek, a_peek, _) = results[True], results[False]
    assert abs(q_mask - math.log(10)) < 0.15, results
    assert a_mask < 0.5 and em_mask >= 0.8, results
    assert q_peek < 0.5 and a_peek < 0.5, results


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    """`python transformer.py ARGS`, run in this process (conftest.run_main)."""
    return run_main(train_main, *args)


@pytest.mark.parametrize("args, fragments", [
    (["--ablate", "no-brain"], ["no-brain", "no-mask"]),
    (["--ablate", "no-mask,no-heads"], ["no-heads"]),
    (["--similarity", "cosine"], ["cosine", "additive"]),
])
def test_cli_bad_ablation_or_similarity(args, fragments):
    assert_clean_error(cli(*args), *fragments)


@pytest.mark.parametrize("text, fragment", [("", "empty"), ("abc", "too short")])
def test_cli_text_too_short_for_a_window(tmp_path, text, fragment):
    data = tmp_path / "tiny.txt"
    data.write_text(text)
    run = cli("--task", "shakespeare", "--data", str(data))
    assert_clean_error(run, fragment)


def test_ablations_combine_into_one_config():
    names = ["no-mask", "no-residual", "no-positions", "shared-layers"]
    assert sorted(ABLATIONS) == sorted(names)
    merged = {}
    for name in names:
        merged.update(ABLATIONS[name])
    config = replace(CONFIG, **merged)
    assert (config.causal, config.residual, config.positions, config.shared_layers) == (
        False, False, "none", True)


# ---------------------------------------------------------------------------------------------
# Word-level Shakespeare
# ---------------------------------------------------------------------------------------------

SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def test_word_split_gives_the_text_back():
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak."
    pieces = Words.split(text)
    assert "".join(pieces) == text and "" not in pieces
    assert pieces[:4] == ["First", " ", "Citizen", ":\n"]
    if SHAKESPEARE.exists():
        full = SHAKESPEARE.read_text()
        assert "".join(Words.split(full)) == full


def test_word_vocabulary_comes_from_the_training_part_only(tmp_path):
    # "zebra" is frequent, but only in the held-out last tenth: it must be <unk> there
    words = ["alpha", "beta", "gamma", "delta"] * 250 + ["zebra"] * 100
    data = tmp_path / "words.txt"
    data.write_text(" ".join(words))
    task = Words(str(data))
    assert "zebra" not in task.words and "alpha" in task.words and task.words[0] == "<unk>"
    pieces = Words.split(data.read_text())
    split = int(0.9 * len(pieces))
    assert len(task.train) == split and len(task.val) == len(pieces) - split
    rebuilt = "".join(p if i else "<unk>" for p, i in zip(pieces[split:], task.val))
    assert rebuilt == "".join(task.words[i] for i in task.val)  # <unk> aside, the text itself
    assert (task.val[np.array(pieces[split:]) == "zebra"] == 0).all()


def test_word_baselines_match_counting_by_hand(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "w.txt"
    data.write_text(" ".join(rng.choice(["a", "b", "c", "d", "e"], 2000, p=[.4, .3, .1, .1, .1])))
    task = Words(str(data))
    V = len(task.words)
    train, val = task.train.tolist(), task.val.tolist()
    uni = [(train.count(w) + 1) / (len(train) + V) for w in range(V)]
    pairs = {}
    for a, b in zip(train, train[1:]):
        pairs[a, b] = pairs.get((a, b), 0) + 1
    prev = {a: sum(n for (x, _), n in pairs.items() if x == a) for a in range(V)}
    bigram = np.mean([-math.log(0.7 * pairs.get((a, b), 0) / max(prev[a], 1) + 0.3 * uni[b])
                      for a, b in zip(val, val[1:])])
    unigram = np.mean([-math.log(uni[w]) for w in val])
    assert task.unigram == pytest.approx(unigram, rel=1e-9)
    assert task.bigram == pytest.approx(bigram, rel=1e-9)


@pytest.mark.parametrize("text, fragment", [("", "empty"), ("to be or not", "too short")])
def test_cli_words_refuses_a_text_too_short(tmp_path, text, fragment):
    data = tmp_path / "tiny.txt"
    data.write_text(text)
    assert_clean_error(cli("--task", "words", "--data", str(data)), fragment)


@pytest.mark.parametrize("task", [Shakespeare, Words])
def test_a_text_that_cannot_be_read_is_the_one_user_error(tmp_path, task):
    """tasks.DataError is gone: a dataset's problems are flags.UserError, which every CLI prints
    as one line with exit status 2 (flags.run)."""
    with pytest.raises(UserError, match="nothing-here"):
        task(data=str(tmp_path / "nothing-here.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="empty"):
        task(data=str(tmp_path / "empty.txt"))
    assert flags.run(lambda argv: task(data=str(tmp_path / "empty.txt"))) == flags.USER_ERROR


def test_experiments_help_and_a_default_plot_that_overwrites_no_tracked_file():
    """experiments.py once drew into docs/experiments.png, a tracked file, unless told otherwise.
    Its default now lies where git ignores it (asked of git itself), its --help shows it, and
    every flag says what it does without "(default: None)"."""
    import experiments

    run = run_main(experiments.main, "--help")
    assert run.returncode == 0, run.stderr
    entries = help_entries(run.stdout)
    assert sorted(entries) == ["--data", "--only", "--plot", "-h"]
    assert all(entries.values()) and "(default: None)" not in run.stdout
    plot = Path(re.search(r"\(default: (\S+)\)$", entries["--plot"]).group(1))
    assert plot.name == "experiments.png" and "docs" not in plot.parts
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout: cannot ask git what it tracks")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(plot)], cwd=REPO)
    assert ignored.returncode == 0, f"{plot} is not ignored by git"
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "docs/experiments.png"],
                             cwd=REPO, capture_output=True)
    assert tracked.returncode == 0  # the check can fail: the old default is tracked


@pytest.mark.parametrize("args, fragment", [
    (["--only", "mask,lasers"], "lasers"),
    (["--data", "/nonexistent/shakespeare.txt"], "/nonexistent"),
])
def test_experiments_bad_input_is_one_line(args, fragment):
    import experiments

    run = run_main(experiments.main, *args)
    assert_clean_error(run, fragment)
    assert run.returncode == flags.USER_ERROR
