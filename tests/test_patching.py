"""Activation patching, attribution patching and direct logit attribution (patching.py) against
Hugging Face: the same patches made through forward hooks on its GPT-2 modules, the gradient by
PyTorch's autograd, the decomposition from its activations (tests/make_fixtures.py,
patching_reference), on the trained tiny GPT-2 and a random one of another shape whose biases
and LayerNorm parameters are far from 0 and 1. And the checks that need no reference: a patch
of a run's own activations changes nothing, a full patch is the clean run, the estimate is exact
where the model is linear, the parts add up.
"""
import numpy as np
import pytest
from conftest import REPO, assert_near, run_main
from test_transformer import assert_clean_error  # one error line, nothing else
from tinygrad import Tensor

import gpt
import patching
from flags import UserError
from transformer import Config, Transformer

FIXTURES = REPO / "tests" / "fixtures"
REF = np.load(FIXTURES / "tiny-gpt2-patching.npz")
CLEAN, CORRUPT = REF["clean_ids"].astype(np.int32), REF["corrupt_ids"].astype(np.int32)
ANSWER, WRONG = int(REF["answer"]), int(REF["wrong"])
CHECKPOINTS = {"trained": FIXTURES / "tiny-gpt2-trained" / "model.safetensors",
               "narrow": FIXTURES / "tiny-gpt2-narrow" / "model.safetensors"}


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def model(request):
    return request.param, gpt.load_gpt2("gpt2", CHECKPOINTS[request.param])


def test_activation_patching_equals_hugging_face(model):
    tag, m = model
    heads = [tuple(h) for h in REF[f"{tag}.z_pos_heads"]]
    got = patching.activation_patching(m, CLEAN, CORRUPT, ANSWER, WRONG, heads)
    for key in ("clean_logit_diff", "corrupt_logit_diff", "resid_pre", "attn_out", "mlp_out",
                "z", "z_pos"):
        assert_near(got[key], REF[f"{tag}.{key}"], key)
    # the grids move: at layer 0 the position where the texts differ carries the answer
    T = len(CLEAN)
    differ = np.flatnonzero(CLEAN != CORRUPT)
    same = np.setdiff1d(np.arange(T), differ)
    np.testing.assert_allclose(got["resid_pre"][0, same], got["corrupt_logit_diff"], atol=1e-5)
    assert abs(got["resid_pre"][0, differ[0]] - got["corrupt_logit_diff"]) > 1e-3


def test_attribution_patching_equals_hugging_face(model):
    tag, m = model
    got = patching.attribution_patching(m, CLEAN, CORRUPT, ANSWER, WRONG)
    for key in ("resid_pre", "attn_out", "mlp_out", "z"):
        assert_near(got[key], REF[f"{tag}.attr.{key}"], f"attribution {key}")


def test_direct_logit_attribution_equals_hugging_face_and_adds_up(model):
    tag, m = model
    got = patching.direct_logit_attribution(m, CLEAN, ANSWER, WRONG)
    for key in ("embed", "pos_embed", "heads", "mlp", "biases", "logit_diff"):
        assert_near(got[key], REF[f"{tag}.dla.{key}"], f"dla {key}")
    total = got["embed"] + got["pos_embed"] + got["heads"].sum() + got["mlp"].sum() + got["biases"]
    assert abs(total - got["logit_diff"]) <= 1e-4, (total, got["logit_diff"])


def test_patching_a_run_with_its_own_activations_changes_nothing(model):
    # every cell is the same batch with nothing patched (a mask of no position) and the plain
    # run's difference, within float32 rounding: a patched batch recomputes the activation in a
    # batch of T, and tinygrad's plain kernels (TINYGPT_PLAIN=1) for it can round differently in
    # the last bit from the cached run's batch of 2
    _, m = model
    T = len(CORRUPT)
    own = patching.activation_patching(m, CORRUPT, CORRUPT, ANSWER, WRONG)
    acts = patching.cache_pair(m, CORRUPT, CORRUPT, ANSWER, WRONG)
    nowhere = Tensor(np.zeros((T, T, 1), dtype=bool))
    for kind, point in patching.POSITION_GRIDS.items():
        for layer in range(m.config.n_layer):
            name = f"blocks.{layer}.{point}"
            unpatched = patching.patch(m, acts, ANSWER, WRONG, name, nowhere)
            np.testing.assert_allclose(own[kind][layer], unpatched, rtol=0, atol=1e-6,
                                       err_msg=name)
        np.testing.assert_allclose(own[kind], own["corrupt_logit_diff"], rtol=0, atol=1e-6)


def test_patching_every_position_at_layer_0_is_the_clean_run(model):
    _, m = model
    acts = patching.cache_pair(m, CLEAN, CORRUPT, ANSWER, WRONG)
    everywhere = Tensor(np.ones((1, len(CLEAN), 1), dtype=bool))
    full = patching.patch(m, acts, ANSWER, WRONG, "blocks.0.hook_resid_pre", everywhere)
    want = patching.logit_diff(m(Tensor(CLEAN[None])), ANSWER, WRONG).item()
    assert abs(full[0] - want) <= 1e-6 and abs(acts["clean_logit_diff"] - want) <= 1e-6


def test_attribution_is_exact_where_the_model_is_linear_in_the_activation():
    # No LayerNorm and no MLP: after the last layer's heads, c_proj and the unembedding are
    # linear, so the first-order estimate is the patched difference itself
    Tensor.manual_seed(3)
    m = Transformer(Config(vocab_size=11, n_ctx=8, n_layer=2, n_head=2, n_embd=8, mlp=False,
                           prenorm=False, layernorm=False))
    for p in m.parameters().values():  # GPT-2's small initial weights barely move the answer
        p.assign(p * 30).realize()
    rng = np.random.default_rng(3)
    clean, corrupt = (rng.integers(0, 11, 8).astype(np.int32) for _ in range(2))
    exact = patching.activation_patching(m, clean, corrupt, 3, 5)
    estimate = patching.attribution_patching(m, clean, corrupt, 3, 5)
    for kind in ("z", "attn_out"):
        change = exact[kind][-1] - exact["corrupt_logit_diff"]
        np.testing.assert_allclose(estimate[kind][-1], change, rtol=1e-4, atol=1e-5)
        assert np.abs(change).max() > 1e-3, kind  # the patch does move the answer
    # earlier, through attention's softmax, the estimate is only an estimate
    assert np.abs(estimate["resid_pre"][0] - (exact["resid_pre"][0]
                                              - exact["corrupt_logit_diff"])).max() > 1e-4


def test_bad_pairs_are_one_user_error(model):
    _, m = model
    with pytest.raises(UserError, match="the clean text has 14 tokens and the corrupted one 3"):
        patching.activation_patching(m, CLEAN, CORRUPT[:3], ANSWER, WRONG)
    with pytest.raises(UserError, match="a token each"):
        patching.attribution_patching(m, CLEAN[:0], CORRUPT[:0], ANSWER, WRONG)
    with pytest.raises(UserError, match="no head 7.0"):
        patching.activation_patching(m, CLEAN, CORRUPT, ANSWER, WRONG, heads=[(7, 0)])


# ---------------------------------------------------------------------------------------------
# gpt.py --patch and --dla
# ---------------------------------------------------------------------------------------------

CLEAN_TEXT = "When John and Mary went to the store, Mary gave a drink to"
CORRUPT_TEXT = "When John and Mary went to the store, John gave a drink to"


def test_gpt_patch_writes_both_grids_and_names_disagreements(tmp_path):
    run = run_main(gpt.main, "--weights", CHECKPOINTS["narrow"], "--patch", CLEAN_TEXT,
                   "--corrupt", CORRUPT_TEXT, "--answer", " John", "--wrong", " Mary",
                   "--heads", "2.0", "--threshold", "0.05", "--out", tmp_path)
    assert run.returncode == 0, run.stderr
    exact, guessed = np.load(tmp_path / "patching.npz"), np.load(tmp_path / "attribution.npz")
    for key in ("clean_logit_diff", "corrupt_logit_diff", "resid_pre", "attn_out", "mlp_out",
                "z"):
        assert_near(exact[key], REF[f"narrow.{key}"], key)
    assert_near(exact["z_pos"][0], REF["narrow.z_pos"][0], "z_pos")  # 2.0, the fixture's first
    corrupt = float(REF["narrow.corrupt_logit_diff"])
    for key in ("resid_pre", "attn_out", "mlp_out", "z"):  # stored as patched differences
        assert_near(guessed[key] - corrupt, REF[f"narrow.attr.{key}"], f"attribution {key}")
    for kind in ("patching", "attribution"):
        for key in ("resid_pre", "attn_out", "mlp_out", "z"):
            assert (tmp_path / f"{kind}-{key}.png").read_bytes()[:4] == b"\x89PNG"
    # every cell the report names is one where the two grids differ by more than 0.05
    span = float(REF["narrow.clean_logit_diff"]) - corrupt
    named = [line for line in run.stdout.splitlines() if ": patched " in line]
    gaps = {key: np.abs(exact[key] - guessed[key]) / abs(span)
            for key in ("resid_pre", "attn_out", "mlp_out", "z")}
    assert len(named) == min(10, sum(int((g > 0.05).sum()) for g in gaps.values()))
    assert f"in {sum(int((g > 0.05).sum()) for g in gaps.values())} cells" in run.stdout


def test_gpt_dla_adds_up_to_the_logit_difference(tmp_path):
    run = run_main(gpt.main, "--weights", CHECKPOINTS["narrow"], "--dla", CLEAN_TEXT,
                   "--answer", " John", "--wrong", " Mary", "--out", tmp_path)
    assert run.returncode == 0, run.stderr
    saved = np.load(tmp_path / "dla.npz")
    for key in ("embed", "pos_embed", "heads", "mlp", "biases", "logit_diff"):
        assert_near(saved[key], REF[f"narrow.dla.{key}"], f"dla {key}")
    assert (tmp_path / "dla.png").read_bytes()[:4] == b"\x89PNG"
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("the 15 parts add up to ") and "is " in last, last


@pytest.mark.parametrize("args, fragments", [
    (["--patch", CLEAN_TEXT, "--corrupt", "When John", "--answer", " John", "--wrong", " Mary"],
     ["14 tokens", "corrupted one 2"]),
    (["--patch", CLEAN_TEXT, "--corrupt", CORRUPT_TEXT, "--answer", " Johnny Cash",
      "--wrong", " Mary"], ["--answer", "one token", "' Johnny' + ' Cash'"]),
    (["--patch", CLEAN_TEXT, "--corrupt", CORRUPT_TEXT, "--answer", " John", "--wrong", " Mary",
      "--heads", "7.0"], ["--heads", "7.0"]),
    (["--patch", "", "--corrupt", "", "--answer", " John", "--wrong", " Mary"], ["a token"]),
    (["--patch", CLEAN_TEXT, "--answer", " John", "--wrong", " Mary"], ["--corrupt"]),
    (["--dla", CLEAN_TEXT, "--answer", " John"], ["--wrong"]),
    (["-p", "Hi", "--answer", " John"], ["--answer", "--patch"]),
])
def test_gpt_patch_and_dla_bad_input(tmp_path, args, fragments):
    run = run_main(gpt.main, "--weights", CHECKPOINTS["narrow"], "--out", tmp_path / "out", *args)
    assert_clean_error(run, *fragments)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Readings on a model whose answer we know: the reversal model copies input digit n - 1 - j
# ---------------------------------------------------------------------------------------------


def test_toy_patching_finds_the_mirrored_digit_and_the_head_that_carries_it(reversal, tmp_path):
    import train
    from tasks import Reverse

    task, result = reversal
    out = tmp_path / "rev"
    model = result["model"]
    train.save_checkpoint(out, model, train.make_optimizer(model, 1e-3), {"task": "reverse"})
    fresh = Reverse(n_digits=task.n)  # the CLI's task object, with its held-out strings
    run = run_main(lambda argv: train.trace(fresh, out, tmp_path / "p") or 0)
    assert run.returncode == 0, run.stderr
    saved = np.load(tmp_path / "p" / "patching.npz")
    clean, corrupt = float(saved["clean_logit_diff"]), float(saved["corrupt_logit_diff"])
    assert clean - corrupt > 1.0, (clean, corrupt)  # the corrupted digit does flip the answer
    share = patching.recovered(saved["resid_pre"][0], clean, corrupt)  # (T,)
    n, j = task.n, task.n // 2
    # the residual stream carries the answer at the mirrored input position, and nowhere else
    assert share[n - 1 - j] == pytest.approx(1.0, abs=1e-5)
    assert np.abs(np.delete(share, n - 1 - j)).max() < 1e-5
    # and some head's output moves it most of the way: the copy is attention's
    heads_share = patching.recovered(saved["z"], clean, corrupt)  # (L, H)
    assert heads_share.max() > 0.3, heads_share
    dla = run_main(lambda argv: train.trace(fresh, out, tmp_path / "d", dla=True) or 0)
    assert dla.returncode == 0, dla.stderr
    parts = np.load(tmp_path / "d" / "dla.npz")
    total = (parts["embed"] + parts["pos_embed"] + parts["heads"].sum() + parts["mlp"].sum()
             + parts["biases"])
    assert abs(total - clean) <= 1e-4  # the clean run's own difference, split into its parts


def test_toy_cli_patch_refuses_what_it_cannot_read(cli_checkpoint):
    from test_transformer import cli

    assert_clean_error(cli("--task", "grokking", "--patch", "--out", str(cli_checkpoint)),
                       "grokking", "no clean/corrupted pair")
    assert_clean_error(cli("--task", "classify", "--dla"), "--dla", "decoder-only")


# ---------------------------------------------------------------------------------------------
# Induction: a circuit built by hand, so which heads carry the answer is known, not inferred
# ---------------------------------------------------------------------------------------------


def hand_made_induction(task):
    """The two-head induction circuit of Elhage et al. (2021), its weights set by hand in the
    induction task's shape without LayerNorm in the blocks: the stream holds the token
    (features 0..V-1), the position (V..V+n_ctx-1) and, from layer 0 on, the previous token
    (the next V). L0H0 is a previous-token head: position t's query matches position t - 1's
    key, and its value, the token, lands in the previous-token features. L1H0 is an induction
    head: a query holding token A matches the key whose previous token is A, and copies that
    position's token into the token features, which the tied unembedding reads as logits. Every
    other head's weights are 0."""
    from dataclasses import replace

    c = replace(task.config, layernorm=False)
    V, N, C, H = c.vocab_size, c.n_ctx, c.n_embd, c.n_head
    hs = C // H
    assert 2 * V + N <= C and max(V, N) <= hs
    tok, pos, prev = np.arange(V), V + np.arange(N), V + N + np.arange(V)
    m = Transformer(c)
    wte = np.zeros(m.wte.weight.shape, np.float32)
    wte[tok, tok] = 1.0
    wpe = np.zeros((N, C), np.float32)
    wpe[np.arange(N), pos] = 1.0
    m.wte.weight.assign(Tensor(wte)).realize()
    m.wpe.weight.assign(Tensor(wpe)).realize()
    sharp = 8.0  # scores of sharp**2 / sqrt(hs) = 16: the softmax all but one-hot
    for layer, block in enumerate(m.h):
        qkv, proj = np.zeros((3 * C, C), np.float32), np.zeros((C, C), np.float32)
        if layer == 0:  # query at t: e_t; key at s: e_(s+1); value: the token at s
            qkv[np.arange(N), pos] = sharp
            qkv[C + np.arange(1, N), pos[:-1]] = sharp
            qkv[2 * C + tok, tok] = 1.0
            proj[prev, tok] = 1.0  # head 0's output -> the previous-token features
        else:  # query: the token A; key: the previous token; value: the token, copied out
            qkv[tok, tok] = sharp
            qkv[C + tok, prev] = sharp
            qkv[2 * C + tok, tok] = 1.0
            proj[tok, tok] = 10.0
        block.attn.c_attn.weight.assign(Tensor(qkv)).realize()
        block.attn.c_attn.bias.assign(Tensor.zeros(3 * C)).realize()
        block.attn.c_proj.weight.assign(Tensor(proj)).realize()
        block.attn.c_proj.bias.assign(Tensor.zeros(C)).realize()
    m.ln_f.weight.assign(Tensor.ones(C)).realize()
    m.ln_f.bias.assign(Tensor.zeros(C)).realize()
    return m


def test_patching_finds_the_previous_token_head_feeding_the_induction_head():
    from tasks import Induction

    task = Induction(vocab=16, n_ctx=16, lengths=(4, 8))
    model = hand_made_induction(task)
    s = task.scores(model)
    assert s["head"] == (1, 0) and s["best"] > 0.9  # it is an induction circuit
    assert s["previous"][0].argmax() == 0 and s["previous"][0, 0] > 0.9
    clean, corrupt, answer, wrong = task.patching_pair()
    k = int(np.flatnonzero(clean != corrupt)[0])  # A's first occurrence, the one corrupted
    assert (clean != corrupt).sum() == 1 and clean[k] == clean[-1] and clean[k + 1] == answer
    assert corrupt[k] not in clean and wrong not in clean and wrong not in corrupt
    exact = patching.activation_patching(model, clean, corrupt, answer, wrong)
    cd, xd = exact["clean_logit_diff"], exact["corrupt_logit_diff"]
    assert cd - xd > 5.0, (cd, xd)  # without an earlier A, B is no longer copied
    # entering layer 0 the difference lies at A's first position; entering layer 1, one on,
    # where the previous-token head wrote it
    first = patching.recovered(exact["resid_pre"][0], cd, xd)
    second = patching.recovered(exact["resid_pre"][1], cd, xd)
    assert first[k] == pytest.approx(1.0, abs=1e-5) and np.abs(np.delete(first, k)).max() < 1e-5
    assert second[k + 1] > 0.95 and np.abs(np.delete(second, k + 1)).max() < 0.05, second
    # the two heads of the circuit bring the answer back, the heads with zero weights nothing
    z = patching.recovered(exact["z"], cd, xd)
    assert z[0, 0] > 0.95 and z[1, 0] > 0.95, z
    assert np.abs(z[:, 1:]).max() < 1e-5, z
    reading = task.patching_reading(model, exact)
    print(reading)
    assert "most for L0H0" in reading and "is L0H0" in reading and ": agrees" in reading, reading
    assert "does NOT" not in reading and "in layer 1, L1H0" in reading, reading
