"""Tests for what heads do, as causes: knocking heads out before c_proj, and the logit lens.

The oracles: a NumPy multi-head attention written here, with a head zeroed or replaced by its
mean; and Hugging Face's GPT-2 on the trained tiny fixture (tests/make_fixtures.py causes), with a
hook on each attn.c_proj that rewrites the knocked-out head's columns, and its hidden states read
through ln_f and lm_head.
"""
import json
import math

import numpy as np
import pytest
from conftest import REPO, run_main
from test_transformer import assert_clean_error, set_linear
from tinygrad import Context, Tensor

import gpt
import heads
import train
from heads import knock_out
from tasks import Reverse
from transformer import CausalSelfAttention

FIXTURES = REPO / "tests" / "fixtures"
TRAINED = FIXTURES / "tiny-gpt2-trained" / "model.safetensors"
REF = np.load(FIXTURES / "tiny-gpt2-trained-causes.npz")


@pytest.fixture(scope="module", autouse=True)
def compile_in_process():
    with Context(PARALLEL=0):  # see tests/test_transformer.py
        yield


@pytest.fixture(scope="module")
def trained():
    return gpt.load_gpt2("gpt2", weights=TRAINED)


def loss_of(model, ids: np.ndarray):
    """The mean next-token loss on ids, as score() for heads.ablate_*."""
    return lambda: float(model(Tensor(ids[None, :-1])).sparse_categorical_crossentropy(
        Tensor(ids[None, 1:])).item())


# ---------------------------------------------------------------------------------------------
# knock_out against NumPy
# ---------------------------------------------------------------------------------------------


def np_heads(x, w_attn, b_attn, H: int) -> np.ndarray:
    """Each head's causal attention output, (B, H, T, hs), before c_proj."""
    T, C = x.shape[-2:]
    hs = C // H
    qkv = x @ w_attn.T + b_attn
    out = []
    for h in range(H):
        q, k, v = (qkv[..., i * C + h * hs : i * C + (h + 1) * hs] for i in range(3))
        s = q @ np.swapaxes(k, -1, -2) / math.sqrt(hs) + np.triu(np.full((T, T), -np.inf), 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        out.append((p / p.sum(-1, keepdims=True)) @ v)
    return np.stack(out, axis=1)


@pytest.mark.parametrize("mean", [None, "positions", "batch", "causal"])
def test_knocked_out_head_is_zeros_or_its_mean_before_c_proj(mean):
    Bt, T, C, H = 3, 6, 16, 4
    rng = np.random.default_rng(5)
    w_attn, b_attn = rng.normal(0, 0.5, (3 * C, C)), rng.normal(0, 0.5, 3 * C)
    w_proj, b_proj = rng.normal(0, 0.5, (C, C)), rng.normal(0, 0.5, C)
    x = rng.normal(size=(Bt, T, C))
    attn = CausalSelfAttention(C, H, n_ctx=8)
    set_linear(attn.c_attn, w_attn.astype(np.float32), b_attn.astype(np.float32))
    set_linear(attn.c_proj, w_proj.astype(np.float32), b_proj.astype(np.float32))
    knock = lambda z: knock_out(z, Tensor([1.0, 0.0, 1.0, 0.0]), mean)  # at hook_z
    attn.hook_z.fns.append(knock)
    got = attn(Tensor(x.astype(np.float32))).numpy()

    y = np_heads(x, w_attn, b_attn, H)  # (B, H, T, hs)
    for h in (1, 3):  # y[:, h] is (B, T, hs): the batch is its axis 0, the positions axis 1
        if mean == "causal":  # position t: the mean of positions 0..t
            y[:, h] = np.cumsum(y[:, h], 1) / np.arange(1, T + 1)[None, :, None]
        else:
            axis = {"batch": 0, "positions": 1}.get(mean)
            y[:, h] = 0.0 if axis is None else y[:, h].mean(axis, keepdims=True)
    want = y.transpose(0, 2, 1, 3).reshape(Bt, T, C) @ w_proj.T + b_proj
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    attn.hook_z.fns.remove(knock)
    plain = attn(Tensor(x.astype(np.float32))).numpy()
    assert np.abs(plain - got).max() > 1e-2  # the knock-out changed something


def test_a_mask_of_ones_leaves_the_pass_bit_for_bit(trained):
    ids = REF["ids"].astype(np.int32)
    plain = trained(Tensor(ids[None])).numpy()
    with heads.KnockOut(trained, mean="positions"):
        kept = trained(Tensor(ids[None])).numpy()
    np.testing.assert_array_equal(kept, plain)
    assert all(not p.fns for p in trained.hook_points().values())  # off again after the block


def test_knock_out_keeps_unmasked_heads_exactly():
    z = Tensor(np.random.default_rng(0).normal(size=(2, 4, 3, 5)).astype(np.float32))  # B T H hs
    got = knock_out(z, Tensor([1.0, 0.0, 1.0])).numpy()
    np.testing.assert_array_equal(got[:, :, [0, 2]], z.numpy()[:, :, [0, 2]])
    assert (got[:, :, 1] == 0).all()


# ---------------------------------------------------------------------------------------------
# GPT-2 against Hugging Face
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, mean", [("zero", None), ("mean", "positions"),
                                        ("causal", "causal")])
def test_head_ablation_equals_hugging_face(trained, kind, mean):
    ids = REF["ids"].astype(np.int32)
    base, delta = heads.ablate_each_head(trained, loss_of(trained, ids), mean)
    assert base == pytest.approx(float(REF["base_loss"]), abs=1e-5)
    np.testing.assert_allclose(delta, REF[f"{kind}_loss_delta"], atol=2e-5)
    assert np.abs(REF[f"{kind}_loss_delta"]).max() > 1e-3  # the heads matter, or this proves little


def test_heads_knocked_out_together_equal_hugging_face(trained):
    ids = REF["ids"].astype(np.int32)
    _, knocked = heads.ablate_heads(trained, loss_of(trained, ids), [(0, 1), (1, 0)])
    assert knocked == pytest.approx(float(REF["zero_0.1_1.0_loss"]), abs=1e-5)


def test_logit_lens_equals_hugging_face_and_its_last_row_is_the_model(trained):
    ids = REF["ids"].astype(np.int32)
    lens = heads.logit_lens(trained, ids)
    L1, T = lens["next_token_prob"].shape
    assert (L1, T) == (trained.config.n_layer + 1, len(ids))
    np.testing.assert_allclose(lens["next_token_prob"][:, :-1], REF["next_token_prob"], atol=1e-5)
    assert np.isnan(lens["next_token_prob"][:, -1]).all()  # the last token has no next one
    np.testing.assert_allclose(lens["top_probs"], REF["top_probs"], atol=1e-5)
    np.testing.assert_array_equal(lens["top_ids"][:, :, 0], REF["top_ids"][:, :, 0])
    # the last reading is the model's own prediction, computed here by a plain forward pass
    z = trained(Tensor(ids[None])).numpy()[0].astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    # two graphs of one forward (the stream kept beside the logits, or not) may add in other
    # orders: logits up to 2e-6 apart at |z| <= 11, two float32 steps
    np.testing.assert_allclose(lens["next_token_prob"][-1, :-1], p[np.arange(T - 1), ids[1:]],
                               rtol=0, atol=1e-6)
    np.testing.assert_allclose(lens["top_probs"][-1], -np.sort(-p, -1)[:, :5], rtol=0, atol=1e-6)



def test_lens_read_in_tinygrad_equals_hugging_face(trained):
    """heads.lens_read (the workbench's lens, computed in tinygrad) of every block's stream
    through the final LayerNorm and the unembedding, and of the logits, against the same
    readings of Hugging Face as logit_lens."""
    ids = REF["ids"].astype(np.int32)
    points = heads.lens_points(trained)[:-1]
    logits, cache = trained.run_with_cache(Tensor(ids[None]), points)
    stream = Tensor.stack(*[cache[name][0] for name in points])  # (L, T, C)
    following = np.zeros(len(ids), dtype=np.int32)
    following[:-1] = ids[1:]
    read = [heads.lens_read(z, Tensor(following)) for z in (trained.unembed(stream), logits)]
    top_ids, top_probs, next_probs = (np.concatenate([t.numpy() for t in part])
                                      for part in zip(*read))  # (L + 1, T) each
    np.testing.assert_array_equal(top_ids, REF["top_ids"][:, :, 0])
    np.testing.assert_allclose(top_probs, REF["top_probs"][:, :, 0], atol=1e-5)
    np.testing.assert_allclose(next_probs[:, :-1], REF["next_token_prob"], atol=1e-5)

# ---------------------------------------------------------------------------------------------
# The command lines
# ---------------------------------------------------------------------------------------------

TEXT = "ROMEO: Is the day so young? The day is young, and so am I, my lord."


def test_gpt_head_ablation_writes_the_deltas_and_names_the_top_heads(tmp_path):
    run = run_main(gpt.main, "--weights", TRAINED, "--head-ablation", TEXT, "--out", tmp_path)
    assert run.returncode == 0, run.stderr
    saved = np.load(tmp_path / "ablation.npz")
    np.testing.assert_array_equal(saved["ids"], REF["ids"])
    np.testing.assert_allclose(saved["loss_delta"], REF["zero_loss_delta"], atol=2e-5)
    assert float(saved["base_loss"]) == pytest.approx(float(REF["base_loss"]), abs=1e-5)
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    top = np.unravel_index(REF["zero_loss_delta"].argmax(), (2, 2))
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith(f"top heads: L{top[0]}H{top[1]} "), last


@pytest.mark.parametrize("flag, kind", [("causal", "causal"), ("positions", "mean")])
def test_gpt_mean_ablation_is_causal_unless_told_and_says_which(tmp_path, flag, kind):
    # the bare flag is the running mean, which gives no position a summary of its future
    args = ["--mean"] if flag == "causal" else ["--mean", flag]
    run = run_main(gpt.main, "--weights", TRAINED, "--head-ablation", TEXT, *args, "--out",
                   tmp_path)
    assert run.returncode == 0, run.stderr
    np.testing.assert_allclose(np.load(tmp_path / "ablation.npz")["loss_delta"],
                               REF[f"{kind}_loss_delta"], atol=2e-5)
    assert f"({flag} mean ablation)" in run.stdout
    assert np.abs(REF["causal_loss_delta"] - REF["mean_loss_delta"]).max() > 1e-3


def test_gpt_mean_from_another_text_equals_hugging_face(tmp_path):
    # each head's mean over every position of another text: nothing of the scored text in it
    run = run_main(gpt.main, "--weights", TRAINED, "--head-ablation", TEXT, "--mean-from",
                   "JULIET: O Romeo, Romeo! wherefore art thou Romeo?", "--out", tmp_path)
    assert run.returncode == 0, run.stderr
    np.testing.assert_allclose(np.load(tmp_path / "ablation.npz")["loss_delta"],
                               REF["reference_loss_delta"], atol=2e-5)
    assert "(reference-text mean ablation)" in run.stdout
    assert np.abs(REF["reference_loss_delta"] - REF["causal_loss_delta"]).max() > 1e-3


def test_gpt_heads_together_print_one_result(tmp_path):
    run = run_main(gpt.main, "--weights", TRAINED, "--head-ablation", TEXT, "--heads", "0.1,1.0",
                   "--out", tmp_path / "none")
    assert run.returncode == 0, run.stderr
    value = float(run.stdout.split("->")[1].split()[0])
    assert value == pytest.approx(float(REF["zero_0.1_1.0_loss"]), abs=1e-4)
    assert not (tmp_path / "none").exists()  # one result, no files


def test_gpt_logit_lens_writes_the_readings(tmp_path):
    run = run_main(gpt.main, "--weights", TRAINED, "--logit-lens", TEXT, "--out", tmp_path)
    assert run.returncode == 0, run.stderr
    saved = np.load(tmp_path / "lens.npz")
    assert saved["top_ids"].shape == saved["top_probs"].shape == (3, len(REF["ids"]), 5)
    np.testing.assert_allclose(saved["next_token_prob"][:, :-1], REF["next_token_prob"],
                               atol=1e-5)
    assert (tmp_path / "lens.png").exists()
    assert len(run.stdout.strip().splitlines()) == len(REF["ids"])  # a header, a line per token


@pytest.mark.parametrize("args, fragments", [
    (["--head-ablation", TEXT, "--heads", "5.0"], ["--heads", "5.0", "layers 0-1"]),
    (["--head-ablation", TEXT, "--heads", "first"], ["--heads", "first"]),
    (["-p", "Hi", "--mean"], ["--mean", "--head-ablation"]),
    (["-p", "Hi", "--mean-from", "Hi"], ["--mean-from", "--head-ablation"]),
    (["--head-ablation", TEXT, "--mean", "--mean-from", "Hi"], ["--mean", "--mean-from", "one"]),
    (["--head-ablation", TEXT, "--mean-from", ""], ["--mean-from"]),
    (["--logit-lens", "Hi"], ["--logit-lens", "at least 2"]),
    (["--logit-lens", TEXT, "--tokens", "9:3"], ["--tokens"]),
])
def test_gpt_bad_input(tmp_path, args, fragments):
    run = run_main(gpt.main, "--weights", TRAINED, "--out", tmp_path / "out", *args)
    assert_clean_error(run, *fragments)
    assert not (tmp_path / "out").exists()


def test_toy_ablation_reads_the_mirror_head_as_it_came_out(reversal, tmp_path):
    """The reversal model's attention names its mirror head; the run knocks every head out and
    says whether the mirror head's cost is the largest, as the numbers it saved say. (This small
    1-layer model spreads the copy over its heads: measured, the mirror head L0H0 costs 0.24 of
    exact match and L0H1 0.63, so it disagrees; the default 8-digit model's L0H2 costs all.)"""
    task, result = reversal
    out = tmp_path / "rev"
    model = result["model"]
    train.save_checkpoint(out, model, train.make_optimizer(model, 1e-3), {"task": "reverse"})
    fresh = Reverse(n_digits=3)  # the CLI's task object, with its held-out strings
    printed = run_main(lambda argv: train.ablate(fresh, out, tmp_path / "views") or 0)
    assert printed.returncode == 0, printed.stderr
    saved = np.load(tmp_path / "views" / "ablation.npz")
    share = task.mirror_shares(model)
    mirror = np.unravel_index(share.argmax(), share.shape)
    delta = saved["score_delta"]
    assert float(saved["base_score"]) == pytest.approx(result["score"])
    assert delta.min() < -0.1, delta  # knocking heads out does cost this model something
    base = float(saved["base_score"])
    line = printed.stdout.strip().splitlines()[-1]
    assert line.startswith(f"knocking out L{mirror[0]}H{mirror[1]} (the mirror head"), line
    assert f"from {base:.2f} to {base + delta[mirror]:.2f}" in line, line
    agrees = delta[mirror] == delta.min()
    assert line.endswith("agrees with the map" if agrees else "does NOT agree with the map")


def test_toy_cli_ablation_and_lens(cli_checkpoint, tmp_path):
    """The toy command line end to end on the 1-step checkpoint of tests/test_transformer.py."""
    from test_transformer import cli

    run = cli("--task", "reverse", "--head-ablation", str(tmp_path / "a"), "--out",
              str(cli_checkpoint))
    assert run.returncode == 0, run.stderr
    saved = np.load(tmp_path / "a" / "ablation.npz")
    assert saved["score_delta"].shape == (1, 2) and str(saved["metric"]) == "exact_match"
    assert "the mirror head" in run.stdout.splitlines()[-1]
    run = cli("--task", "reverse", "--head-ablation", "--heads", "0.1", "--mean", "--out",
              str(cli_checkpoint))
    assert run.returncode == 0, run.stderr
    assert "knocking out L0H1 together (batch mean ablation): exact_match" in run.stdout
    run = cli("--task", "reverse", "--logit-lens", str(tmp_path / "l"), "--out",
              str(cli_checkpoint))
    assert run.returncode == 0, run.stderr
    lens = np.load(tmp_path / "l" / "lens.npz")
    assert lens["next_token_prob"].shape == (2, 17)  # embed + 1 block, 8 + 1 + 8 tokens
    assert json.loads((cli_checkpoint.parent / "rev.json").read_text())["task"] == "reverse"
    assert_clean_error(cli("--task", "reverse", "--heads", "0.1", "--out", str(cli_checkpoint)),
                       "--heads", "--head-ablation")
