"""Tests for seeing inside: attention maps from the real forward pass, head scores, the views
(heads.png, attention.html), and GPT-2's perplexity of a text.

The oracles: every head's attention as Hugging Face transformers computes it (eager attention,
output_attentions=True) for the tiny GPT-2 fixture; a tiny GPT-2 trained by transformers with its
sliding-window losses per token (tests/fixtures/README.md); NumPy formulas written here for the
head scores; and a real browser (Debian's chromium) for the page.

    DEV=CPU .venv/bin/python -m pytest -q tests/test_heads.py
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ["TIKTOKEN_CACHE_DIR"] = str(ROOT.parent / "shared" / "tiktoken")

from conftest import assert_padding_changes_nothing, run_main  # noqa: E402
from test_transformer import assert_clean_error  # noqa: E402  one error line, nothing else
from tinygrad import Tensor  # noqa: E402

import generate  # noqa: E402
import gpt  # noqa: E402
import heads  # noqa: E402
from heads import attention_maps  # noqa: E402
from transformer import Config, Transformer  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
TINY = FIXTURES / "tiny-gpt2" / "model.safetensors"
TRAINED = FIXTURES / "tiny-gpt2-trained" / "model.safetensors"
ATT_REF = np.load(FIXTURES / "tiny-gpt2-attention.npz")
PPL_REF = np.load(FIXTURES / "tiny-gpt2-trained-perplexity.npz")
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def tiny():
    return gpt.load_gpt2("gpt2", weights=TINY)


@pytest.fixture(scope="module")
def trained():
    return gpt.load_gpt2("gpt2", weights=TRAINED)


# ---------------------------------------------------------------------------------------------
# Capture: the probabilities the forward pass used, against Hugging Face
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["len17", "batch2", "len128"])
def test_attention_equals_hugging_face(tiny, case):
    ids = ATT_REF[f"{case}_ids"].astype(np.int32)
    logits, att = attention_maps(tiny, Tensor(ids))
    att = att.numpy()
    expected = ATT_REF[f"{case}_attention"]  # (B, L, H, T, T)
    assert att.shape == expected.shape
    np.testing.assert_allclose(att, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(att.sum(-1), 1.0, atol=1e-6, rtol=0)
    T = ids.shape[1]
    assert (att[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0).all()
    # capture changes nothing: the same logits, bit for bit, as the pass it keeps the maps of
    # (a causal model's, run as a prefill)
    assert np.array_equal(logits.numpy(), tiny(Tensor(ids), 0).numpy())
    hf_sum = ATT_REF[f"{case}_logits_sum"]  # and they are Hugging Face's logits
    np.testing.assert_allclose(logits.numpy()[..., :50257].sum(-1), hf_sum, rtol=1e-4, atol=1e-2)


def test_attention_maps_alone_are_the_maps_with_logits(tiny):
    ids = Tensor(ATT_REF["len17_ids"].astype(np.int32))
    none, alone = attention_maps(tiny, ids, logits=False)
    assert none is None
    assert np.array_equal(alone.numpy(), attention_maps(tiny, ids)[1].numpy())


def assert_padded_equals_unpadded(model, lengths, seed=0):
    """heads.padded_attention (what --attention draws) and the padded pass's logits, against
    the unpadded forward."""
    rng = np.random.default_rng(seed)
    for T in lengths:
        ids = rng.integers(0, model.config.vocab_size, T).astype(np.int32)
        logits, att = attention_maps(model, Tensor(ids[None]))
        assert_padding_changes_nothing(heads.padded_attention(model, ids)[None], att.numpy(), T)
        size = generate.prefill_bucket(T, model.config.n_ctx)
        padded = np.zeros((1, size), dtype=np.int32)
        padded[0, :T] = ids
        padded_logits = attention_maps(model, Tensor(padded))[0].numpy()[:, :T]
        assert_padding_changes_nothing(padded_logits, logits.numpy(), T)


def test_padded_attention_equals_unpadded_on_the_fixtures(tiny, trained):
    assert_padded_equals_unpadded(tiny, (2, 7, 14, 26, 40))
    assert_padded_equals_unpadded(trained, (3, 10, 33))


def test_padded_attention_equals_unpadded_on_a_trained_toy_model(reversal):
    task, result = reversal
    assert_padded_equals_unpadded(result["model"], (2, 4, 5, 6))  # padded to its context, 7


def test_texts_of_three_lengths_in_one_bucket_build_one_set_of_kernels(tiny):
    import tinygrad.engine.realize

    made = []
    for T in (17, 23, 30):  # bucket 32
        heads.padded_attention(tiny, np.arange(T, dtype=np.int32) + 1000)
        made.append(len(tinygrad.engine.realize.to_program_cache))
    assert made[0] == made[1] == made[2], made


def test_capture_is_off_after_the_call(tiny):
    attention_maps(tiny, Tensor(ATT_REF["len17_ids"].astype(np.int32)))
    assert all(not point.fns for point in tiny.hook_points().values())


def test_queries_of_zero_attend_uniformly():
    """q = 0 makes every score 0, so causal row i is uniform over its i + 1 keys."""
    config = Config(vocab_size=11, n_ctx=9, n_layer=2, n_head=2, n_embd=8)
    Tensor.manual_seed(5)
    model = Transformer(config)
    C = config.n_embd
    for block in model.h:  # c_attn's first C outputs are the queries
        w, b = block.attn.c_attn.weight.numpy(), block.attn.c_attn.bias.numpy()
        w[:C], b[:C] = 0, 0
        block.attn.c_attn.weight.assign(Tensor(w)).realize()
        block.attn.c_attn.bias.assign(Tensor(b)).realize()
    ids = np.random.default_rng(0).integers(0, 11, (2, 9)).astype(np.int32)
    att = attention_maps(model, Tensor(ids))[1].numpy()
    expected = np.tril(np.ones((9, 9))) / np.arange(1, 10)[:, None]
    np.testing.assert_allclose(att, np.broadcast_to(expected, att.shape), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Head scores on hand-built patterns
# ---------------------------------------------------------------------------------------------


def pattern(T: int, key_of) -> np.ndarray:
    """(1, 1, T, T): query t puts all its attention on key_of(t)."""
    att = np.zeros((1, 1, T, T))
    for t in range(T):
        att[0, 0, t, key_of(t)] = 1
    return att


def test_scores_of_pure_patterns():
    T = 10
    previous = pattern(T, lambda t: max(t - 1, 0))
    diagonal = pattern(T, lambda t: t)
    first = pattern(T, lambda t: 0)
    uniform = (np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None])[None, None]
    assert heads.previous_token_scores(previous)[0, 0] == pytest.approx(1.0)
    assert heads.previous_token_scores(diagonal)[0, 0] == pytest.approx(0.0)
    assert heads.diagonal_scores(diagonal)[0, 0] == pytest.approx(1.0)
    assert heads.diagonal_scores(first)[0, 0] == pytest.approx(0.0)
    assert heads.first_token_scores(first)[0, 0] == pytest.approx(1.0)
    assert heads.first_token_scores(previous)[0, 0] == pytest.approx(1 / (T - 1))  # only t = 1
    assert heads.entropy_scores(first)[0, 0] == pytest.approx(0.0)
    # a uniform row t >= 1 has entropy ln(t + 1)
    assert heads.entropy_scores(uniform)[0, 0] == pytest.approx(np.log(np.arange(2, T + 1)).mean())
    assert heads.previous_token_scores(uniform)[0, 0] == pytest.approx(
        (1 / np.arange(2, T + 1)).mean())


def test_induction_score_of_a_perfect_induction_head_is_one():
    n = 6
    ids = heads.repeated_random_tokens(np.random.default_rng(3), n, 50)
    assert np.array_equal(ids[0, :n], ids[0, n:]) and len(set(ids[0, :n])) == n
    # second copy: token t repeats token t - n, so attend to what followed it, t - n + 1
    induction = pattern(2 * n, lambda t: t - n + 1 if t >= n else 0)
    assert heads.induction_scores(induction, ids)[0, 0] == pytest.approx(1.0)
    assert heads.induction_scores(pattern(2 * n, lambda t: max(t - 1, 0)), ids)[0, 0] == 0
    # uniform attention: query t of the second copy gives 1 / (t + 1) to its one target
    expected = np.mean([1 / (t + 1) for t in range(n, 2 * n)])
    assert heads.induction_baseline(ids) == pytest.approx(expected)


def test_top_heads_and_the_window():
    scores = np.array([[0.1, 0.9], [0.5, 0.3]])
    assert heads.top_heads(scores, 2) == [(0, 1, 0.9), (1, 0, 0.5)]
    assert heads.top_heads(scores, 1, largest=False) == [(0, 0, 0.1)]
    assert heads.parse_window(None, 10) == (0, 10)
    assert heads.parse_window("2:5", 10) == (2, 5)
    assert heads.parse_window(":-3", 10) == (0, 7)
    assert heads.parse_window("4:", 10) == (4, 10)
    for bad in ("5:2", "x:3", "3", "1:2:3", "20:30"):
        with pytest.raises(heads.UserError, match="--tokens"):
            heads.parse_window(bad, 10)


def test_labels_are_readable_and_distinct():
    labels = [heads.readable(s) for s in ["The", " cat", " sat", "\n", " the", " cat", "\t"]]
    assert labels == ["The", "·cat", "·sat", "↵", "·the", "·cat", "⇥"]
    assert heads.distinct(labels) == ["The", "·cat[1]", "·sat", "↵", "·the", "·cat[5]", "⇥"]


# ---------------------------------------------------------------------------------------------
# The files: npz, heads.png, the page in a real browser
# ---------------------------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    """`python gpt.py ARGS`, run in this process (conftest.run_main; test_gpt.py runs gpt.py in
    processes of its own)."""
    return run_main(gpt.main, *args)


SENTENCE = "The cat sat on the mat. The cat"


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    """gpt.py --attention on the tiny fixture, run once; the tests read what it wrote."""
    out = tmp_path_factory.mktemp("views") / "att"
    run = cli("--weights", str(TINY), "--attention", SENTENCE, "--out", str(out),
              "--layer", "1", "--head", "0")
    assert run.returncode == 0, run.stderr
    return out, run


def test_cli_attention_writes_what_the_forward_pass_computed(views, tiny):
    out, run = views
    assert sorted(p.name for p in out.iterdir()) == [
        "attention.html", "attention.npz", "heads.png", "layer1-head0.png", "scores.png"]
    saved = np.load(out / "attention.npz")
    ids = gpt.tokenizer().encode(SENTENCE)
    assert saved["ids"].tolist() == ids  # no start token added
    assert saved["attention"].dtype == np.float32 and saved["attention"].shape == (2, 2, 9, 9)
    expected = attention_maps(tiny, Tensor(np.array([ids], dtype=np.int32)))[1].numpy()[0]
    np.testing.assert_allclose(saved["attention"], expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(saved["score_previous"], heads.previous_token_scores(expected),
                               atol=1e-6)


def test_cli_attention_prints_scores_and_one_head(views):
    out, run = views
    lines = run.stdout.splitlines()
    assert lines[0].split() == ["layer", "head", "previous", "diagonal", "first", "entropy",
                                "induction"]
    rows = [line.split() for line in lines[1:5]]
    assert [r[:2] for r in rows] == [["0", "0"], ["0", "1"], ["1", "0"], ["1", "1"]]
    saved = np.load(out / "attention.npz")
    for r in rows:  # the table prints the saved scores
        assert float(r[2]) == pytest.approx(saved["score_previous"][int(r[0]), int(r[1])],
                                            abs=5e-4)
    for kind in heads.SCORE_NAMES:
        assert any(re.match(rf"top {kind}( \(lowest\))?: L\dH\d", line) for line in lines), kind
    at = lines.index("layer 1, head 0: row = query (attending), column = key")
    numbers = np.array([[float(v) for v in row.split()[1:]] for row in lines[at + 2 : at + 11]])
    np.testing.assert_allclose(numbers, saved["attention"][1, 0], atol=5e-4)
    assert "·cat[1]" in lines[at + 1] and "·cat[8]" in lines[at + 1]


def blue_runs(mask_1d: np.ndarray) -> int:
    """How many separate runs of True a boolean profile has."""
    padded = np.concatenate([[False], mask_1d, [False]])
    return int((np.diff(padded.astype(int)) == 1).sum())


def test_heads_png_has_one_panel_per_head(views):
    import matplotlib.image

    image = matplotlib.image.imread(views[0] / "heads.png")[..., :3]  # (rows, cols, rgb) in [0, 1]
    # the colour bar is blue too: look left of it, where only the panels are
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    strong = (b - r > 0.3) & (g < 0.6)  # cells of high attention; text is grey or black
    cut = int(image.shape[1] * 0.8)
    assert blue_runs(strong[:, :cut].any(axis=0)) == 2  # heads side by side
    assert blue_runs(strong[:, :cut].any(axis=1)) == 2  # layers one above the other


def page_json(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))


def test_page_is_self_contained_and_holds_the_npz_values(views):
    out, _ = views
    html = (out / "attention.html").read_text()
    for pattern_ in (r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", r"@import", r"\bfetch\(",
                     r"\bimport\s*\(", r"XMLHttpRequest", r"https?://"):
        assert not re.search(pattern_, html, re.I), pattern_
    data = page_json(html)
    att = np.load(out / "attention.npz")["attention"]
    L, H, T, _ = att.shape
    assert (data["layers"], data["heads"], len(data["tokens"])) == (L, H, T)
    rows, cols = np.tril_indices(T)
    page = np.array(data["att"], dtype=np.float64).reshape(L, H, -1) / data["scale"]
    np.testing.assert_allclose(page, att[:, :, rows, cols], atol=0.5 / data["scale"] + 1e-7)
    assert data["tokens"][1] == "·cat[1]"


def test_page_window_keeps_only_those_tokens(tmp_path, tiny):
    enc = gpt.tokenizer()
    gpt.show_attention(tiny, enc, SENTENCE, tmp_path, tokens="3:7", log=lambda *a: None)
    data = page_json((tmp_path / "attention.html").read_text())
    assert data["tokens"] == ["·on", "·the", "·mat", "."] and data["first"] == 3
    att = np.load(tmp_path / "attention.npz")["attention"]
    assert att.shape[-1] == 9  # the npz keeps everything
    rows, cols = np.tril_indices(4)
    page = np.array(data["att"]).reshape(2, 2, -1) / data["scale"]
    np.testing.assert_allclose(page, att[:, :, 3:7, 3:7][:, :, rows, cols], atol=1e-4)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def dump_dom(page: Path | str, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    """The page's DOM after its script ran, from headless Chromium, offline, a profile of its
    own. page: a file, or a URL (the workbench's, on 127.0.0.1); flags: Chromium's more, e.g.
    --virtual-time-budget=MS to wait for the page's requests."""
    url = page if isinstance(page, str) else page.as_uri()
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", *flags, "--dump-dom", url],
        capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not CHROMIUM and not os.environ.get("CI"),
                    reason="no chromium here (apt-get install chromium); CI installs it")
def test_page_renders_offline_in_a_real_browser(views, tmp_path):
    assert CHROMIUM, "CI must have chromium: .ci/run installs it"
    out, _ = views
    run = dump_dom(out / "attention.html", tmp_path)
    dom = run.stdout
    assert run.returncode == 0, run.stderr[-2000:]
    # the script ran: it built one canvas per head and one span per token
    heads_drawn = re.findall(r'<canvas class="head[^"]*" data-layer="(\d)" data-head="(\d)"', dom)
    assert sorted(heads_drawn) == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    tokens = re.findall(r'<span class="tok[^"]*" data-i="\d+"[^>]*>([^<]*)</span>', dom)
    assert tokens == page_json((out / "attention.html").read_text())["tokens"]
    assert 'id="caption">layer 0, head 0' in dom


# ---------------------------------------------------------------------------------------------
# Perplexity against Hugging Face's losses, token by token
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [str(c) for c in PPL_REF["case_names"]])
def test_perplexity_equals_the_loop_of_hugging_faces_guide(trained, case):
    """The fixture is the guide's own code run on Hugging Face's model (tests/make_fixtures.py):
    the same tokens scored, each within 1e-4 nats, and the guide's average within 1e-4."""
    ids, stride = PPL_REF[f"{case}_ids"], int(PPL_REF[f"{case}_stride"])
    targets, losses, weights = gpt.token_losses(trained, ids, stride)
    np.testing.assert_array_equal(targets, PPL_REF[f"{case}_targets"])
    assert len(losses) == int(PPL_REF[f"{case}_tokens"])
    np.testing.assert_allclose(losses, PPL_REF[f"{case}_token_nll"], atol=1e-4, rtol=0)
    assert weights.sum() == pytest.approx(int(PPL_REF[f"{case}_guide_tokens"]), abs=1e-9)
    nll = gpt.perplexity_nll(losses, weights)
    assert nll == pytest.approx(float(PPL_REF[f"{case}_nll"]), rel=1e-4)


def test_perplexity_fixture_covers_overlap_no_overlap_and_short_texts():
    strides = {int(PPL_REF[f"{c}_stride"]) for c in PPL_REF["case_names"]}
    assert {16, 32, 48, 64} <= strides  # 64 = the fixture's context: windows without overlap
    assert len(PPL_REF["short_ids"]) < 64 < len(PPL_REF["long_stride16_ids"])


def guide_windows(n, ctx, stride):
    """The guide's loop, written out: which tokens each window scores, and its weight."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + ctx, n)
        labels = np.arange(begin, end)
        valid = labels[max(0, len(labels) - (end - prev_end)):]  # the others are -100
        out.append(([int(t) for t in valid if t > begin], len(valid) - 1))  # the label shift
        prev_end = end
        if end == n:
            break
    return out


def test_windows_are_the_guides():
    for n, ctx, stride in [(1281, 64, 16), (1281, 64, 64), (1277, 64, 48), (50, 64, 32),
                           (65, 64, 64), (2, 8, 1), (100, 8, 7)]:
        plan = gpt.windows(n, ctx, stride)
        want = guide_windows(n, ctx, stride)
        assert [list(range(w.first, w.end)) for w in plan] == [t for t, _ in want]
        assert [w.weight for w in plan] == [wt for _, wt in want]
        assert all(w.end - w.begin <= ctx and w.begin < w.first for w in plan)
    # with overlap every token after the first is scored once; without, a window's first never
    scored = [t for w in gpt.windows(1281, 64, 16) for t in range(w.first, w.end)]
    assert scored == list(range(1, 1281))
    scored = {t for w in gpt.windows(1281, 64, 64) for t in range(w.first, w.end)}
    assert scored == set(range(1, 1281)) - set(range(64, 1281, 64))
    with pytest.raises(gpt.UserError, match="--stride"):  # flags.UserError
        gpt.windows(100, 64, 65)


def test_a_last_window_of_one_token_scores_nothing(trained):
    """1281 tokens at stride 64 end in a window of one token: the guide's loop takes its loss
    over no labels (nan, which makes its perplexity nan); here it weighs nothing."""
    ids = np.resize(PPL_REF["long_stride16_ids"], 129)
    targets, losses, weights = gpt.token_losses(trained, ids, 64)
    assert len(losses) == 126 and np.isfinite(gpt.perplexity_nll(losses, weights))
    assert 64 not in targets and 128 not in targets


def test_half_precision_perplexity_is_close(tmp_path):
    half = gpt.load_gpt2("gpt2", weights=TRAINED, half=True)
    case = "long_stride48"
    _, losses, weights = gpt.token_losses(half, PPL_REF[f"{case}_ids"], 48)
    nll = gpt.perplexity_nll(losses, weights)
    assert nll == pytest.approx(float(PPL_REF[f"{case}_nll"]), rel=2e-3)


needs_text = pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"{SHAKESPEARE} is missing")


@needs_text
def test_cli_perplexity_of_a_file(tmp_path):
    first, end = PPL_REF["long_stride48_chars"]
    text = tmp_path / "text.txt"
    text.write_text(SHAKESPEARE.read_text()[first:end])
    run = cli("--weights", str(TRAINED), "--perplexity", str(text), "--stride", "48")
    assert run.returncode == 0, run.stderr
    last = run.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"perplexity=([0-9.]+) nll=([0-9.]+) tokens=(\d+)", last)
    assert m, last
    nll = float(PPL_REF["long_stride48_nll"])
    assert float(m.group(1)) == pytest.approx(np.exp(nll), rel=1e-4)
    assert float(m.group(2)) == pytest.approx(nll, rel=1e-4)
    assert int(m.group(3)) == int(PPL_REF["long_stride48_tokens"])


# ---------------------------------------------------------------------------------------------
# Bad input: one error line, a non-zero exit, nothing written
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, fragments", [
    (["--attention", ""], ["--attention"]),
    (["--attention", "Hi there", "--layer", "2", "--head", "0"], ["2.0", "layers 0-1"]),
    (["--attention", "Hi there", "--layer", "1"], ["--layer", "--head"]),
    (["--attention", "Hi there", "--tokens", "5:1"], ["--tokens"]),
    (["--perplexity", "/nonexistent/text.txt"], ["/nonexistent/text.txt"]),
    (["--perplexity", "tests/fixtures/README.md", "--stride", "0"], ["--stride"]),
    (["-p", "Hi", "-t", "nan"], ["--temperature", "nan"]),
    (["-p", "Hi", "--top-p", "inf"], ["--top-p", "inf"]),
    (["-p", "Hi", "-n", "many"], ["many"]),
    (["-p", "Hi", "--layer", "1"], ["--layer", "--attention"]),
])
def test_cli_bad_input(args, fragments, tmp_path):
    run = cli("--weights", str(TINY), "--out", str(tmp_path / "out"), *args)
    assert_clean_error(run, *fragments)
    assert not (tmp_path / "out").exists()


def test_cli_empty_and_one_token_files(tmp_path):
    empty, one = tmp_path / "empty.txt", tmp_path / "one.txt"
    empty.write_text("")
    one.write_text("Hello")
    assert_clean_error(cli("--weights", str(TINY), "--perplexity", str(empty)), "empty")
    assert_clean_error(cli("--weights", str(TINY), "--perplexity", str(one)), "at least 2")


def test_cli_unwritable_folder_leaves_nothing(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    run = cli("--weights", str(TINY), "--attention", "Hi there", "--out", str(blocker / "att"))
    assert_clean_error(run, str(blocker / "att"))
    assert blocker.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_printed_induction_score_is_measured_on_repeated_random_tokens(views, tiny):
    """The documented recipe, written out here: 4 rows of 50 distinct random tokens (seed 0), each
    followed by itself; a query t in the second copy should look at t - 50 + 1."""
    out, _ = views
    rng, n = np.random.default_rng(0), 50
    first = np.stack([rng.choice(50257, n, replace=False) for _ in range(4)])
    ids = np.concatenate([first, first], axis=1).astype(np.int32)  # (4, 100)
    att = attention_maps(tiny, Tensor(ids))[1].numpy()  # (4, L, H, 100, 100)
    t = np.arange(n, 2 * n)
    want = att[:, :, :, t, t - n + 1].mean(axis=(0, -1))  # (L, H)
    saved = np.load(out / "attention.npz")["score_induction"]
    np.testing.assert_allclose(saved, want, atol=1e-6)


def test_induction_probe_is_kept_per_checkpoint_key(tiny, tmp_path, monkeypatch):
    """With a key the probe's scores are computed once and read back after; without, every
    call runs the probe. Read back, they are the very scores the probe computed."""
    runs = []
    real_maps = heads.attention_maps

    def counting_maps(*args, **kwargs):
        runs.append(args[1].shape)
        return real_maps(*args, **kwargs)

    monkeypatch.setattr(heads, "attention_maps", counting_maps)
    key = f"{tmp_path}|test"  # a new key: nothing kept yet
    first, _ = heads.probe_induction(tiny, 0, key)
    second, _ = heads.probe_induction(tiny, 0, key)
    assert len(runs) == 1 and np.array_equal(first, second)
    plain, _ = heads.probe_induction(tiny, 0)
    assert len(runs) == 2 and np.array_equal(plain, first)


def test_a_text_rides_along_in_the_probes_pass(tiny, monkeypatch, tmp_path):
    """A new checkpoint's --attention runs the probe and the text in one pass: the text's maps
    are those of its own padded pass, and the probe's scores those of the probe alone, within
    1e-6."""
    alone, none = heads.probe_induction(tiny, 0)
    assert none is None
    rng = np.random.default_rng(4)
    for T in (3, 14, 40):
        ids = rng.integers(0, tiny.config.vocab_size, T).astype(np.int32)
        scores, att = heads.probe_induction(tiny, 0, text=ids)
        np.testing.assert_allclose(scores, alone, rtol=0, atol=1e-6)
        # a batch of 5 padded to 100 runs kernels of other shapes than one row padded to its
        # bucket, which round apart: measured up to 3.9e-7
        np.testing.assert_allclose(att, heads.padded_attention(tiny, ids), rtol=0, atol=1e-6)
    too_long = rng.integers(0, tiny.config.vocab_size, 101).astype(np.int32)  # probe: 2 x 50
    assert heads.probe_induction(tiny, 0, text=too_long)[1] is None
    runs = []
    real_maps = heads.attention_maps
    monkeypatch.setattr(heads, "attention_maps",
                        lambda *a, **k: runs.append(a[1].shape) or real_maps(*a, **k))
    heads.inspect_model(tiny, ids, [str(i) for i in ids], tmp_path, "t")
    assert runs == [(5, 100)]  # no key: the probe runs, and the text with it
    assert (tmp_path / "heads.png").is_file()


def test_a_piece_of_a_character_is_labelled_by_its_bytes():
    # GPT-2's byte-level BPE splits 🐍 (f0 9f 90 8d) into " \xf0\x9f", "\x90", "\x8d": as text
    # each piece was U+FFFD, all alike; as escapes each says which bytes it holds
    assert heads.readable(b" \xf0\x9f") == "·\\xf0\\x9f"
    assert heads.readable(b"\x90") == "\\x90"
    assert heads.readable("caf\u00e9".encode()) == "café"  # whole characters stay themselves
    assert heads.readable(b"\n") == "↵" and heads.readable(b"") == "∅"
    assert heads.distinct([heads.readable(b"\x90"), heads.readable(b"\x8d")]) == ["\\x90", "\\x8d"]


def mosaic_figure(monkeypatch, att, labels):
    """The Figure plots.all_heads draws (plots.save hands it over instead of writing it)."""
    import plots

    drawn = []
    monkeypatch.setattr(plots, "save", lambda fig, path, dpi=100: drawn.append(fig) or path)
    plots.all_heads(att, Path("unused.png"), "t", labels)
    return drawn[0]


def test_heads_png_names_the_tokens_on_its_maps_axes(monkeypatch):
    L, H, T = 2, 3, 5
    labels = ["The", "·cat", "·sat", "·\\xf0\\x9f", "\\x90"]
    fig = mosaic_figure(monkeypatch, np.zeros((L, H, T, T)), labels)
    ax = fig.axes[0]
    gap = 1  # plots.mosaic_gap(5, 5)
    assert len(ax.child_axes) == 2  # matplotlib's secondary axes: keys below, queries left
    x_axis = next(s for s in ax.child_axes if s._orientation == "x")
    y_axis = next(s for s in ax.child_axes if s._orientation == "y")
    # under each head of the bottom row, and left of each layer of the left column, every token
    assert [t.get_text() for t in x_axis.get_xticklabels()] == labels * H
    assert [t.get_text() for t in y_axis.get_yticklabels()] == labels * L
    assert list(x_axis.get_xticks()) == [h * (T + gap) + k for h in range(H) for k in range(T)]
    assert list(y_axis.get_yticks()) == [r * (T + gap) + q for r in range(L) for q in range(T)]
    # the head and layer names stay: heads on top, layers now on the right
    assert [t.get_text() for t in ax.get_xticklabels()] == ["head 0", "head 1", "head 2"]
    assert ax.yaxis.get_ticks_position() == "right"


def test_heads_png_of_a_long_text_leaves_tokens_unnamed(monkeypatch):
    import plots

    T = plots.MOSAIC_LABELS + 1
    fig = mosaic_figure(monkeypatch, np.zeros((1, 2, T, T)), [f"t{i}" for i in range(T)])
    assert fig.axes[0].child_axes == []


@pytest.mark.skipif(not CHROMIUM and not os.environ.get("CI"),
                    reason="no chromium here (apt-get install chromium); CI installs it")
def test_page_names_the_large_maps_rows_and_columns_by_token(views, tmp_path):
    out, _ = views
    run = dump_dom(out / "attention.html", tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    tokens = page_json((out / "attention.html").read_text())["tokens"]
    for side in ("rows", "cols"):
        box = re.search(rf'<div id="{side}">(.*?</div>)</div>', run.stdout, re.S)
        assert box, side  # the script filled it: one name per token
        names = re.findall(r'<div class="axis"[^>]*>([^<]*)</div>', box.group(1))
        assert names == tokens, (side, names)
