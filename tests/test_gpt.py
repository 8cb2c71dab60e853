"""Tests for gpt.py: GPT-2 on tinygrad against numbers from Hugging Face transformers.

The model under test is the tiny random GPT-2 in tests/fixtures/tiny-gpt2 (2 layers, 16 dims,
the real 50257-token vocabulary, a 128-token context), saved in the official checkpoint layout.
tests/fixtures/tiny-gpt2-reference.npz holds what transformers computed from it: logits and
greedy continuations. tests/fixtures/README.md describes both.

Run from the repository root:

    DEV=CPU .venv/bin/python -m pytest -q tests/test_gpt.py

tinygrad builds and compiles new kernels for every new tensor shape, which takes seconds on a
CPU, so the tiny model is loaded once per module and every reference forward pass uses one shape
(see logits_of). The command-line tests start a fresh Python each, and compile again there.
"""

import hashlib
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# gpt.py and transformer.py live in the repository root, which plain `pytest` may not put on
# sys.path.
sys.path.insert(0, str(ROOT))
# GPT-2's BPE ranks are kept beside the repository, so the tokenizer loads without a network.
# tiktoken reads this variable when a tokenizer is first requested.
TIKTOKEN_DIR = ROOT.parent / "shared" / "tiktoken"
os.environ["TIKTOKEN_CACHE_DIR"] = str(TIKTOKEN_DIR)

import tiktoken  # noqa: E402  (after TIKTOKEN_CACHE_DIR on purpose)
from conftest import PLAIN, assert_padding_changes_nothing, run_main  # noqa: E402
from tinygrad import Tensor, Variable, dtypes  # noqa: E402
from tinygrad.nn.state import safe_load, safe_save  # noqa: E402

import flags  # noqa: E402
import generate  # noqa: E402
import gpt  # noqa: E402
import heads  # noqa: E402
import transformer  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
TINY_DIR = FIXTURES / "tiny-gpt2"
SAFETENSORS = TINY_DIR / "model.safetensors"
TRAINED = FIXTURES / "tiny-gpt2-trained" / "model.safetensors"
PYTORCH_BIN = TINY_DIR / "pytorch_model.bin"
REF = np.load(FIXTURES / "tiny-gpt2-reference.npz")

# The fixture README: an independent float64 forward pass matches transformers to 3e-6.
LOGIT_TOL = 1e-4

EOT = 50256  # <|endoftext|> in r50k_base
PROMPT = "Hello, my dog is"  # greedy1 in the fixture: [15496, 11, 616, 3290, 318]
GREEDY_TEXT = str(REF["greedy1_output_text"])  # its 20 greedy tokens, decoded
N_GREEDY = int(REF["greedy_new_tokens"])

# Port 9 ("discard") on the loopback interface has no listener here, so a connection to it is
# refused at once: the way to be offline without touching the real network.
CLOSED_ENDPOINT = "http://127.0.0.1:9"


# ---------------------------------------------------------------------------------------------
# Shared fixtures and helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return gpt.load_gpt2("gpt2", weights=SAFETENSORS)


@pytest.fixture(scope="module")
def enc():
    return gpt.tokenizer()


def logits_of(model, ids) -> np.ndarray:
    """Logits (T, vocab) for one sequence of T <= n_ctx ids, by a full forward pass (no cache).

    The ids are padded to the whole context, so every call here has the shape (1, n_ctx) and
    tinygrad compiles the forward pass only once. Attention is causal, so position t never sees
    the padding after it and its logits are those of the unpadded sequence."""
    ids = np.asarray(ids, dtype=np.int32)
    padded = np.zeros((1, model.config.n_ctx), dtype=np.int32)
    padded[0, : len(ids)] = ids
    return model(Tensor(padded)).numpy()[0, : len(ids)]


def record_sampled_logits(monkeypatch) -> list:
    """Make generate.sample keep a copy of the logits it is given at each step."""
    seen = []
    real_sample = generate.sample

    def recording_sample(logits, *args, **kwargs):
        seen.append(np.array(logits, dtype=np.float64))
        return real_sample(logits, *args, **kwargs)

    monkeypatch.setattr(generate, "sample", recording_sample)
    return seen


def logsumexp(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    top = x.max(-1, keepdims=True)
    return (top + np.log(np.exp(x - top).sum(-1, keepdims=True)))[..., 0]


# ---------------------------------------------------------------------------------------------
# Logits against the Hugging Face reference
# ---------------------------------------------------------------------------------------------


# Regression: the loaded weights used to stay lazy copies out of the checkpoint file (a transposed
# view realizes as itself), so every decode step copied them from disk again: GPT-2 124M decoded at
# 2.1 tokens/s instead of 7.7, with numbers still exact. Each weight must be a plain buffer on the
# device, laid out as the model reads it.
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "half"])
def test_loaded_weights_are_device_buffers_in_the_models_layout(half):
    from tinygrad import Device
    from tinygrad.uop.ops import Ops

    model = gpt.load_gpt2("gpt2", weights=SAFETENSORS, half=half)
    conv1d = safe_load(str(SAFETENSORS))["h.0.attn.c_attn.weight"].numpy()  # (in, out)
    for name, p in model.parameters().items():
        assert p.uop.base.op is Ops.BUFFER and p.device == Device.DEFAULT, (name, p.uop.base.op)
    ours = model.h[0].attn.c_attn.weight.float().numpy()  # (out, in)
    np.testing.assert_allclose(ours, conv1d.T, rtol=0, atol=1e-3 if half else 0)


@pytest.mark.parametrize("checkpoint", [SAFETENSORS, PYTORCH_BIN], ids=["safetensors", "bin"])
def test_logits_match_hugging_face(tiny, checkpoint):
    model = tiny if checkpoint == SAFETENSORS else gpt.load_gpt2("gpt2", weights=checkpoint)
    assert model.config.n_ctx == 128 and model.config.n_embd == 16  # from config.json beside it
    columns = REF["vocab_columns"]
    for case in REF["case_names"]:
        ids = REF[f"{case}_ids"]
        # batch2's two rows ran as one batch in transformers; here each row runs alone, which
        # must not matter. The batched path is checked against the fixture by the CLI test
        # with --num-samples 2.
        ours = np.stack([logits_of(model, row) for row in ids])  # (B, T, V)
        np.testing.assert_allclose(ours[..., columns], REF[f"{case}_column_logits"],
                                   rtol=0, atol=LOGIT_TOL, err_msg=f"{case} columns")
        np.testing.assert_allclose(logsumexp(ours), REF[f"{case}_logsumexp"],
                                   rtol=0, atol=LOGIT_TOL, err_msg=f"{case} logsumexp")
        # exact: the closest top-2 gap in these cases is 1.7e-3, far above float32 noise
        np.testing.assert_array_equal(ours.argmax(-1), REF[f"{case}_argmax"], err_msg=case)
        if f"{case}_last_logits" in REF:
            np.testing.assert_allclose(ours[:, -1], REF[f"{case}_last_logits"],
                                       rtol=0, atol=LOGIT_TOL, err_msg=f"{case} last row")


# ---------------------------------------------------------------------------------------------
# Greedy decoding and the KV cache
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("i", [0, 1, 2])
def test_greedy_continuation_matches_hugging_face(tiny, enc, i):
    prompt_ids = REF[f"greedy{i}_prompt"]
    ids = list(generate.generate(tiny, prompt_ids[None], N_GREEDY, temperature=0.0))
    assert [int(t[0]) for t in ids] == REF[f"greedy{i}_output"].tolist()

    # The fixture's prompt 0 is the text "<|endoftext|>" (id 50256); complete() starts a new
    # document from an empty prompt the same way.
    prompt = "" if i == 0 else str(REF["greedy_prompt_texts"][i])
    assert enc.encode(prompt) == ([] if i == 0 else prompt_ids.tolist())
    texts, stats = gpt.complete(tiny, enc, prompt, N_GREEDY, temperature=0.0, ignore_eos=True)
    assert texts == [str(REF[f"greedy{i}_output_text"])]
    assert stats["prompt_tokens"] == len(prompt_ids)
    assert stats["new_tokens"] == N_GREEDY


# --half stores the weights in float16 and computes in float32: the fixture's greedy tokens (from
# transformers in float32) must not change. On OpenCL this once failed to compile at all
# (tinygrad 0.14 cannot compile nn.Embedding's float16 lookup there); CI runs it there too, below.
def test_half_greedy_continuation_matches_float32_hugging_face(enc):
    half = gpt.load_gpt2("gpt2", weights=SAFETENSORS, half=True)
    assert half.h[0].mlp.c_fc.weight.dtype == dtypes.float16
    for i in range(3):
        ids = generate.generate(half, REF[f"greedy{i}_prompt"][None], N_GREEDY, temperature=0.0)
        assert [int(t[0]) for t in ids] == REF[f"greedy{i}_output"].tolist(), f"prompt {i}"


def test_half_greedy_text_equals_float32s_for_20_tokens_on_the_trained_model():
    # float32's greedy tokens are Hugging Face's (the tests above). The trained model's top two
    # logits lie 0.8 or more apart on this prompt; the random tiny-gpt2's come within 5e-4 of
    # each other on it, closer than float16's rounding, so there it is the fixture's prompts
    prompt = np.random.default_rng(7).integers(0, 50257, (1, 6), dtype=np.int32)
    tokens = [[int(t[0]) for t in generate.generate(gpt.load_gpt2("gpt2", TRAINED, half=half),
                                                    prompt, 20, temperature=0.0)]
              for half in (False, True)]
    assert tokens[1] == tokens[0]


# A decode step (one token, its keys and values written at pos, every earlier one read back from
# the cache) against the plain forward pass over all pos + 1 tokens, far into a context of
# GPT-2's 1024, in float32 and with --half's float16 weights (float32 activations). The weights
# are GPT-2's initial ones plus noise of std 0.1, so biases are not 0, LayerNorm gains not 1, and
# the logits are of order 1 (std 0.63): measured, the step is within 5e-7 of the plain pass (the
# float16 model's within 2.7e-4: its cache is float16) and the float16 model within 2e-3 of the
# float32 one.
DECODE_TOL = 1e-5  # float32 sums in another order
HALF_TOL = 1e-2  # float16 weights against float32 ones: their rounding, 2^-11 of each weight
# float16 weights keep float16 keys and values in the cache, which the plain pass does not round
# (measured: within 2.7e-4)
HALF_CACHE_TOL = 2e-3


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "fp16"])
def test_decode_steps_at_positions_0_300_900_equal_the_plain_forward_pass(half):
    Tensor.manual_seed(5)
    model = transformer.Transformer(transformer.Config(vocab_size=96, n_ctx=1024, n_layer=2,
                                                       n_head=4, n_embd=32))
    rng = np.random.default_rng(2)
    plain = {name: (p.numpy() + rng.normal(0, 0.1, p.shape)).astype(np.float32)
             for name, p in model.parameters().items()}
    for name, p in model.parameters().items():
        p.replace(Tensor(plain[name]))
    if half:
        for p in model.parameters().values():
            p.replace(p.half().realize())
    ids = np.random.default_rng(1).integers(0, 96, (1, 901), dtype=np.int32)
    pos_var = Variable("pos", 1, 1023)
    for pos in (0, 300, 900):
        if pos:
            model(Tensor(ids[:, :pos]), 0).realize()  # the prompt into the cache
        step = model(Tensor(ids[:, pos : pos + 1]), pos_var.bind(pos) if pos else 0)
        want = model(Tensor(ids[:, : pos + 1])).numpy()[0, -1]  # no cache
        np.testing.assert_allclose(step.numpy()[0, -1], want, rtol=0,
                                   atol=HALF_CACHE_TOL if half else DECODE_TOL,
                                   err_msg=f"position {pos}")
    if half:  # and the float16 model's logits near the float32 model's
        fp32 = transformer.Transformer(model.config)
        for name, p in fp32.parameters().items():
            p.replace(Tensor(plain[name]))
        np.testing.assert_allclose(model(Tensor(ids)).numpy(), fp32(Tensor(ids)).numpy(),
                                   rtol=0, atol=HALF_TOL)


def test_prompt_text_endoftext_is_the_document_separator(tiny, enc):
    # Regression: complete() once encoded with allowed_special=set(), and tiktoken raises on
    # text that spells a special token, so `gpt.py -p "<|endoftext|>"` died with a traceback.
    # The fixture pairs the prompt text "<|endoftext|>" with the id 50256.
    texts, stats = gpt.complete(tiny, enc, str(REF["greedy_prompt_texts"][0]), N_GREEDY,
                                temperature=0.0, ignore_eos=True)
    assert stats["prompt_tokens"] == 1
    assert texts == [str(REF["greedy0_output_text"])]


def test_kv_cached_decoding_equals_full_recomputation(tiny, monkeypatch):
    seen = record_sampled_logits(monkeypatch)
    prompt = REF["greedy1_prompt"].tolist()
    steps = 30
    new = [int(t[0]) for t in generate.generate(tiny, np.array([prompt]), steps)]
    assert len(seen) == steps
    cached = np.concatenate(seen)  # (30, V): prefill's last row, then 29 one-token steps
    # the logits that chose token i come from the position just before it
    full = logits_of(tiny, prompt + new[:-1])[len(prompt) - 1 :]
    np.testing.assert_allclose(cached, full, rtol=0, atol=LOGIT_TOL)
    np.testing.assert_allclose(cached[0], REF["len5_last_logits"][0], rtol=0, atol=LOGIT_TOL)


def test_generate_runs_no_forward_pass_after_the_last_token(tiny, monkeypatch):
    # Regression (speed): generate() once ran one more decode step after its last token, whose
    # logits nobody used; with -n 1 that was a whole extra kernel compilation (seconds on a CPU).
    calls = []
    real_call = transformer.Transformer.final_stream

    def counting_call(self, *args, **kwargs):
        calls.append(args[0].shape)
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(transformer.Transformer, "final_stream", counting_call)
    monkeypatch.setattr(tiny, "_kept_jits", None, raising=False)  # none kept: all traced
    out = list(generate.generate(tiny, REF["greedy1_prompt"][None], 1))
    assert [int(t[0]) for t in out] == REF["greedy1_output"][:1].tolist()
    assert calls == [(1, 8)]  # the prefill (5 tokens in bucket 8) gives the only token, no step


def test_beam_searches_the_decode_kernels_and_keeps_greedy_output(tiny, enc, monkeypatch):
    # --beam N must really reach tinygrad's kernel search for the decode step, with width N, and
    # a faster kernel must still compute the same tokens.
    from tinygrad.codegen.opt import search

    widths = []
    real_search = search.beam_search

    def recording_search(s, rawbufs, var_vals, amt, *args, **kwargs):
        widths.append(amt)
        return real_search(s, rawbufs, var_vals, amt, *args, **kwargs)

    monkeypatch.setattr(search, "beam_search", recording_search)
    # Generate every kernel here: the CLIs run in this process keep generated kernels on disk
    # (runtime.keep_kernels), and one kept from an earlier run would never reach the search
    import tinygrad.codegen
    import tinygrad.engine.realize

    for module in (tinygrad.codegen, tinygrad.engine.realize):
        monkeypatch.setattr(module, "to_program_cache", {})
    texts, _ = gpt.complete(tiny, enc, PROMPT, N_GREEDY, temperature=0.0, ignore_eos=True,
                            beam=1)
    assert texts[0] == GREEDY_TEXT
    assert widths and set(widths) == {1}, widths


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(tiny, enc):
    def draw(seed):
        texts, _ = gpt.complete(tiny, enc, PROMPT, 12, temperature=1.0, seed=seed,
                                ignore_eos=True)
        return texts[0]

    first = draw(7)
    assert draw(7) == first
    # 12 draws from a distribution spread over thousands of tokens: a clash is not plausible
    assert draw(8) != first
    assert first != GREEDY_TEXT[: len(first)]


def sampled_run(tiny, steps, **sampling):
    """Sample `steps` tokens after PROMPT; return them with the logits (steps, V) behind each,
    recomputed by a full forward pass rather than taken from the run itself."""
    prompt = REF["greedy1_prompt"].tolist()
    rng = np.random.default_rng(3)
    new = [int(t[0]) for t in generate.generate(tiny, np.array([prompt]), steps, rng=rng,
                                                   **sampling)]
    logits = logits_of(tiny, prompt + new[:-1])[len(prompt) - 1 :].astype(np.float64)
    return np.array(new), logits


def test_top_k_picks_only_among_the_k_likeliest(tiny):
    k = 5
    new, logits = sampled_run(tiny, 15, temperature=1.0, top_k=k)
    kth_best = np.sort(logits, -1)[:, -k]
    chosen = logits[np.arange(len(new)), new]
    assert (chosen >= kth_best - LOGIT_TOL).all(), (chosen, kth_best)
    # it really sampled: some steps took another token than the argmax
    assert (new != logits.argmax(-1)).any()


def test_top_p_picks_only_inside_the_nucleus(tiny):
    top_p, temperature = 0.1, 0.8  # a nucleus of about 130 of the 50257 tokens here
    new, logits = sampled_run(tiny, 15, temperature=temperature, top_p=top_p)
    scaled = logits / temperature
    probs = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for step, token in enumerate(new):
        likelier = probs[step] > probs[step, token]
        # A token is in the nucleus when the tokens likelier than it sum to less than top_p.
        # These logits may differ from the run's by LOGIT_TOL, which moves sums by less than
        # that.
        assert probs[step, likelier].sum() < top_p + LOGIT_TOL, (step, token)
    assert (new != logits.argmax(-1)).any()


def test_sample_never_picks_a_token_top_k_removed():
    # Regression (rare): sample() draws u in [0, 1) and takes the first token whose cumulative
    # probability passes it. Rounding can leave the cumulative sum a few ulps below 1; a u above
    # it once fell off the end and was clamped to the last vocabulary id (EOT in GPT-2), even
    # when top-k or top-p gave that id probability 0. Here seven probabilities of 1/7 add up to
    # 0.9999999999999998.
    class LargestDraw:
        def random(self, shape):
            return np.full(shape, np.nextafter(1.0, 0.0))  # the largest value random() returns

    logits = np.zeros((1, 20))
    logits[0, :7] = 5.0
    token = generate.sample(logits, temperature=1.0, top_k=7, rng=LargestDraw())
    assert 0 <= int(token[0]) < 7


# ---------------------------------------------------------------------------------------------
# Streaming and <|endoftext|>, with a scripted generate() in place of the model
# ---------------------------------------------------------------------------------------------

FAKE_MODEL = SimpleNamespace(config=SimpleNamespace(n_ctx=128))


class ScriptedGenerate:
    """Stands in for generate.generate: yields the given tokens, one (B,) row per step, and
    counts how many steps the caller pulled."""

    def __init__(self, rows):
        self.rows = [np.array(r, dtype=np.int32) for r in rows]
        self.pulled = 0

    def __call__(self, model, prompt, max_new_tokens, *args):
        assert prompt.shape[0] == len(self.rows[0])  # one row per sample
        for row in self.rows[:max_new_tokens]:
            self.pulled += 1
            yield row


class RecordingStream(io.BytesIO):
    """A binary stream that also keeps every write separately."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, data):
        self.writes.append(bytes(data))
        return super().write(data)


def test_stream_writes_exactly_the_returned_text(tiny, enc):
    stream = io.BytesIO()
    texts, _ = gpt.complete(tiny, enc, PROMPT, N_GREEDY, temperature=0.0, ignore_eos=True,
                            stream=stream)
    assert texts == [GREEDY_TEXT]
    assert stream.getvalue() == GREEDY_TEXT.encode()


def test_stream_holds_back_a_character_split_across_tokens(enc, monkeypatch):
    text = " hug 🤗 and grin 😀!"
    ids = enc.encode(text)
    pieces = [enc.decode_single_token_bytes(i) for i in ids]
    # the premise: some tokens end inside a UTF-8 character (🤗 is 3 tokens in r50k_base)
    assert sum(not is_utf8(piece) for piece in pieces) >= 3

    monkeypatch.setattr(gpt, "generate", ScriptedGenerate([[i] for i in ids]))
    stream = RecordingStream()
    texts, _ = gpt.complete(FAKE_MODEL, enc, "x", len(ids), stream=stream)
    assert texts == [text]
    assert stream.getvalue() == text.encode()
    # One write per token: after each, the stream holds every finished character so far, and
    # only the bytes of an unfinished one (at most 3) wait for the next token.
    held_back = []
    for i in range(len(ids)):
        arrived = b"".join(pieces[: i + 1])
        written = b"".join(stream.writes[: i + 1])
        assert is_utf8(written) and arrived.startswith(written), i
        held_back.append(len(arrived) - len(written))
    assert max(held_back) <= 3 and held_back[-1] == 0
    assert sum(n > 0 for n in held_back) >= 3  # the test did go through split characters


def test_stream_ending_inside_a_character_matches_the_returned_text(enc, monkeypatch):
    ids = enc.encode("🤗")[:2]  # the first two of its three tokens: an unfinished character
    monkeypatch.setattr(gpt, "generate", ScriptedGenerate([[i] for i in ids]))
    stream = io.BytesIO()
    texts, _ = gpt.complete(FAKE_MODEL, enc, "x", 2, stream=stream)
    assert texts == ["\ufffd"]
    assert stream.getvalue() == "\ufffd".encode()


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_generation_stops_at_endoftext(enc, monkeypatch):
    a, b, c = enc.encode(" one two three")
    script = ScriptedGenerate([[a], [b], [EOT], [c], [c]])
    monkeypatch.setattr(gpt, "generate", script)
    stream = io.BytesIO()
    texts, stats = gpt.complete(FAKE_MODEL, enc, "x", 5, stream=stream)
    assert texts == [" one two"]
    assert stream.getvalue() == b" one two"
    assert stats["new_tokens"] == 2
    assert script.pulled == 3  # nothing is generated after the EOT


def test_ignore_eos_goes_on_past_endoftext(enc, monkeypatch):
    a, b, c = enc.encode(" one two three")
    monkeypatch.setattr(gpt, "generate", ScriptedGenerate([[a], [b], [EOT], [c], [c]]))
    texts, stats = gpt.complete(FAKE_MODEL, enc, "x", 5, ignore_eos=True)
    assert texts == [" one two<|endoftext|> three three"]
    assert stats["new_tokens"] == 5


def test_endoftext_ends_only_its_own_sample(enc, monkeypatch):
    a, b, c = enc.encode(" one two three")
    script = ScriptedGenerate([[a, a], [b, b], [EOT, c], [c, c]])
    monkeypatch.setattr(gpt, "generate", script)
    texts, _ = gpt.complete(FAKE_MODEL, enc, "x", 4, num_samples=2)
    assert texts == [" one two", " one two three three"]
    assert script.pulled == 4


# ---------------------------------------------------------------------------------------------
# The strict checkpoint mapper
# ---------------------------------------------------------------------------------------------


def tiny_checkpoint() -> dict:
    """The fixture's tensors as a plain dict, in memory, so each test can edit its own copy."""
    return {k: np.array(v) for k, v in gpt.read_checkpoint(SAFETENSORS).items()}


def tiny_model():
    config = gpt.config_from_hf(TINY_DIR / "config.json", gpt.gpt2_config("gpt2"))
    return transformer.Transformer(config)


def mapping_error(ckpt) -> str:
    with pytest.raises(flags.UserError) as caught:
        gpt.map_checkpoint(ckpt, tiny_model())
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_hugging_face_lm_head_layout_loads_and_matches(tmp_path, tiny):
    # GPT2LMHeadModel.save_pretrained writes "transformer."-prefixed names, the tied output head
    # as lm_head.weight, and in transformers < 4.x each layer's masked_bias constant as well.
    ckpt = {"transformer." + k: v for k, v in tiny_checkpoint().items()}
    ckpt["lm_head.weight"] = ckpt["transformer.wte.weight"]
    for n in range(2):
        ckpt[f"transformer.h.{n}.attn.masked_bias"] = np.array([-1e4], dtype=np.float32)
    folder = tmp_path / "lm-head"
    folder.mkdir()
    safe_save({k: Tensor(v) for k, v in ckpt.items()}, str(folder / "model.safetensors"))
    shutil.copy(TINY_DIR / "config.json", folder)  # load_gpt2 reads the tiny shape from it

    model = gpt.load_gpt2("gpt2", weights=folder / "model.safetensors")
    ours = logits_of(model, REF["len5_ids"][0])[-1]
    np.testing.assert_allclose(ours, REF["len5_last_logits"][0], rtol=0, atol=LOGIT_TOL)


def test_mapper_skips_buffers_and_the_tied_head():
    ckpt = tiny_checkpoint()
    ckpt["lm_head.weight"] = ckpt["wte.weight"]
    ckpt["h.1.attn.masked_bias"] = np.array([-1e4], dtype=np.float32)
    mapped = gpt.map_checkpoint(ckpt, tiny_model())
    assert set(mapped) == set(tiny_model().parameters())
    assert "h.0.attn.bias" in ckpt and "h.0.attn.bias" not in mapped


def test_mapper_names_a_missing_weight():
    ckpt = tiny_checkpoint()
    del ckpt["h.1.mlp.c_fc.bias"]
    message = mapping_error(ckpt)
    assert "missing" in message and "h.1.mlp.c_fc.bias" in message


def test_mapper_names_an_unexpected_tensor():
    ckpt = tiny_checkpoint()
    ckpt["h.0.foo"] = np.zeros(3, dtype=np.float32)
    message = mapping_error(ckpt)
    assert "unexpected" in message and "h.0.foo" in message


def test_mapper_names_a_wrong_shape_with_both_shapes():
    ckpt = tiny_checkpoint()
    ckpt["wpe.weight"] = np.zeros((64, 16), dtype=np.float32)
    message = mapping_error(ckpt)
    assert "wpe.weight" in message
    assert "(64, 16)" in message and "(128, 16)" in message


def test_mapper_names_weights_of_a_layer_the_model_lacks():
    # Regression: the skipped buffer "attn.bias" (the causal mask) is also the end of
    # "c_attn.bias", so a c_attn.bias the model had no place for was once dropped in silence
    # instead of reported.
    ckpt = tiny_checkpoint()
    ckpt["h.2.attn.c_attn.bias"] = ckpt["h.1.attn.c_attn.bias"]  # a third layer, in a 2-layer model
    message = mapping_error(ckpt)
    assert "h.2.attn.c_attn.bias" in message


# ---------------------------------------------------------------------------------------------
# The context window
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beside", ["config.json", "no config.json"])
def test_a_named_model_that_contradicts_the_checkpoint_is_one_error_line(tmp_path, beside):
    # --model gpt2-xl with the tiny checkpoint once ran the tiny model, as config.json says
    folder = tmp_path / "tiny"
    folder.mkdir()
    shutil.copy(SAFETENSORS, folder)
    if beside == "config.json":
        shutil.copy(TINY_DIR / "config.json", folder)
    done = run_main(gpt.main, "--model", "gpt2-xl", "--weights", folder / "model.safetensors",
                    "-p", PROMPT, "-n", "1")
    err = done.stderr
    assert done.returncode == flags.USER_ERROR and done.stdout == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
    # both shapes, named: gpt2-xl's from gpt.SIZES' source (the hub's config.json) and the fixture's
    assert "gpt2-xl (48 layers, 25 heads, 1600 dims)" in err
    tiny = json.loads((TINY_DIR / "config.json").read_text())
    assert f"{tiny['n_layer']} layers" in err and f"{tiny['n_embd']} dims" in err
    assert str(folder / "model.safetensors") in err


def test_a_named_model_that_fits_the_checkpoint_passes():
    # gpt2's shape from its tensors: 12 blocks and a 768-wide embedding (zero-copy stand-ins)
    ckpt = {"wte.weight": np.broadcast_to(np.float32(0), (50257, 768)),
            **{f"h.{i}.ln_1.weight": np.zeros(768, np.float32) for i in range(12)}}
    gpt.check_named_model("gpt2", gpt.gpt2_config("gpt2"), False, ckpt, Path("x"))
    with pytest.raises(flags.UserError, match=r"gpt2-medium .*\(12 layers, 768 dims"):
        gpt.check_named_model("gpt2-medium", gpt.gpt2_config("gpt2"), False, ckpt, Path("x"))
    # and from a config.json: the named size's own
    gpt.check_named_model("gpt2-large", gpt.gpt2_config("gpt2-large"), True, {}, Path("x"))


def test_without_model_the_checkpoint_decides(tiny):
    done = run_main(gpt.main, *TINY_ARGS, "-p", PROMPT, *GREEDY_ARGS, text=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == EXPECTED_STDOUT


def test_prompt_longer_than_the_context(tiny, enc, monkeypatch):
    n_ctx = tiny.config.n_ctx
    prompt = enc.decode(np.random.default_rng(5).integers(0, EOT, 200).tolist())
    prompt_ids = enc.encode(prompt)
    assert len(prompt_ids) > n_ctx
    seen = record_sampled_logits(monkeypatch)
    notes = []
    texts, stats = gpt.complete(tiny, enc, prompt, 6, temperature=0.0, ignore_eos=True,
                                log=notes.append)
    assert stats["new_tokens"] == 6 and len(seen) == 6
    assert len(notes) == 1 and str(n_ctx) in notes[0]  # the user is told
    # the model saw the prompt's last n_ctx tokens
    expected = logits_of(tiny, prompt_ids[-n_ctx:])[-1]
    np.testing.assert_allclose(seen[0][0], expected, rtol=0, atol=LOGIT_TOL)


def test_window_slides_when_generation_fills_the_context(tiny, monkeypatch):
    n_ctx = tiny.config.n_ctx
    prompt = np.random.default_rng(6).integers(0, EOT, n_ctx // 2).tolist()
    steps = 70  # the 65th token fills the context: 64 + 65 = 129 > 128
    seen = record_sampled_logits(monkeypatch)
    new = [int(t[0]) for t in generate.generate(tiny, np.array([prompt]), steps)]
    assert len(new) == steps
    tokens = prompt + new
    # Documented policy: when full, keep the newest n_ctx // 2 tokens and go on from there.
    # Step i is chosen from the logits after tokens[: len(prompt) + i].
    slide = n_ctx + 1 - len(prompt)  # first step that follows a slide
    checks = {
        slide - 1: tokens[: len(prompt) + slide - 1],  # the context full, no slide yet
        slide: tokens[len(prompt) + slide - n_ctx // 2 : len(prompt) + slide],  # re-prefilled
        steps - 1: tokens[len(prompt) + slide - n_ctx // 2 : -1],  # cached decoding after it
    }
    for step, seen_tokens in checks.items():
        expected = logits_of(tiny, seen_tokens)[-1]
        np.testing.assert_allclose(seen[step][0], expected, rtol=0, atol=LOGIT_TOL,
                                   err_msg=f"step {step}")


# ---------------------------------------------------------------------------------------------
# The command line, end to end
# ---------------------------------------------------------------------------------------------

EXPECTED_STDOUT = (PROMPT + GREEDY_TEXT + "\n").encode()
GREEDY_ARGS = ["-t", "0", "-n", N_GREEDY, "--ignore-eos"]
TINY_ARGS = ["--weights", SAFETENSORS]


def run_cli(*args, stdin: bytes = b"", env: dict | None = None, timeout=300):
    """Run `python gpt.py ARGS` in a fresh process on the CPU backend and capture its output.

    HF_ENDPOINT points at a closed port unless a test says otherwise, so no run can reach the
    real hub. PARALLEL=0 keeps tinygrad from starting compile worker processes: the runs here
    go side by side anyway, and on 2 cores the workers' start-up costs more than they save."""
    full_env = {**os.environ, "DEV": "CPU", "PARALLEL": "0",
                "TIKTOKEN_CACHE_DIR": str(TIKTOKEN_DIR), "HF_ENDPOINT": CLOSED_ENDPOINT,
                "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "gpt.py"), *map(str, args)], input=stdin,
                          capture_output=True, env=full_env, timeout=timeout, cwd=ROOT)


def run_cli_on(device: str, *extra):
    """The greedy run with --device DEVICE, or why tinygrad cannot compute on it here (str)."""
    compute = "from tinygrad import Tensor; (Tensor([1.0]) * 2).tolist()"  # compiles a kernel
    probe = subprocess.run([sys.executable, "-c", compute], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "DEV": device})
    if probe.returncode != 0:
        lines = probe.stderr.strip().splitlines() or ["no error text"]
        return f"tinygrad cannot compute on {device} here: {lines[-1]}"
    return run_cli(*TINY_ARGS, *GREEDY_ARGS, "-p", PROMPT, "--device", device, *extra, timeout=480)


@pytest.fixture(scope="module", autouse=True)
def cli_runs(request, tmp_path_factory):
    """The slow command-line runs, started in the background as the module starts.

    Each is a fresh Python that builds and compiles its kernels again: about 10 s of CPU, much
    of it waiting on one core. Side by side, and beside the in-process tests, they cost far less
    time than one after another. A test takes its run's result with cli_runs[name].result().
    Nothing starts when no selected test reads them (pytest -k ...)."""
    if not any(reads_cli_runs(item) for item in request.session.items):
        yield {}
        return
    folder = tmp_path_factory.mktemp("cli")
    prompt_file = folder / "prompt.txt"
    prompt_file.write_text(PROMPT, encoding="utf-8")
    empty_weights = folder / "weights"
    empty_weights.mkdir()
    tiny = [*TINY_ARGS, *GREEDY_ARGS]
    # PoCL's kernel cache is not safe for two processes that compile one kernel at once: on an
    # empty cache (CI) one read the other's half-written binary and aborted. So the two OpenCL
    # runs go one after the other, in one job, which hands the second its own future.
    opencl_half = Future()

    def opencl_runs():
        try:
            return run_cli_on("CL")
        finally:  # whatever became of the first, the second's future gets an answer
            try:
                opencl_half.set_result(run_cli_on("CL", "--half"))
            except Exception as e:
                opencl_half.set_exception(e)

    jobs = {  # the longest first, so it never waits behind the others
        "CL": opencl_runs,
        "CPU:LLVM": partial(run_cli_on, "CPU:LLVM"),
        "CPU:LLVM --half": partial(run_cli_on, "CPU:LLVM", "--half"),
        "prompt": partial(run_cli, *tiny, "-p", PROMPT, "--timing"),
        "file": partial(run_cli, *tiny, "-f", prompt_file),
        "stdin": partial(run_cli, *tiny, stdin=PROMPT.encode()),
        "two samples": partial(run_cli, *tiny, "-p", PROMPT, "--num-samples", 2),
        "offline": partial(run_cli, "--weights-dir", empty_weights, "-p", PROMPT, "-n", 2),
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        yield {**futures, "CL --half": opencl_half, "empty_weights": empty_weights}


def reads_cli_runs(item) -> bool:
    """Does this collected test take cli_runs as an argument (not just through autouse)?"""
    function = getattr(item, "function", None)
    return function is not None and "cli_runs" in inspect.signature(function).parameters


def test_cli_prints_prompt_and_greedy_continuation_and_timing_on_stderr(cli_runs):
    done = cli_runs["prompt"].result()
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == EXPECTED_STDOUT
    err = done.stderr.decode()
    assert "tok/s" in err and "prefill" in err and "decode" in err


def test_cli_reads_the_prompt_from_a_file(cli_runs):
    done = cli_runs["file"].result()
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == EXPECTED_STDOUT


def test_cli_reads_the_prompt_from_stdin(cli_runs):
    done = cli_runs["stdin"].result()
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == EXPECTED_STDOUT


def test_cli_num_samples_runs_a_batch_and_separates_the_samples(cli_runs):
    # Two greedy samples run as one batch of 2, so both must be the fixture's continuation.
    done = cli_runs["two samples"].result()
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    sample = PROMPT + GREEDY_TEXT
    assert out.startswith(sample) and out.endswith(sample + "\n")
    separator = out[len(sample) : -len(sample) - 1]
    assert separator.strip() != "" and "2" in separator


# OpenCL (PoCL in CI) and tinygrad's LLVM code generator for the CPU (libLLVM 19 in CI), each in
# float32 and with --half
@pytest.mark.parametrize("run", ["CL", "CL --half", "CPU:LLVM", "CPU:LLVM --half"])
def test_cli_on_other_backends_prints_the_same(cli_runs, run):
    done = cli_runs[run].result()
    if isinstance(done, str):
        pytest.skip(done)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == EXPECTED_STDOUT  # what the CPU run prints, and Hugging Face's tokens


BAD_INPUTS = {
    "unknown model": (["--model", "gpt5", "-p", PROMPT], "gpt5"),
    "top-p zero": (["--top-p", "0", "-p", PROMPT], "--top-p"),
    "top-p above one": (["--top-p", "1.5", "-p", PROMPT], "1.5"),
    "negative temperature": (["-t", "-1", "-p", PROMPT], "-1"),
    "negative beam": (["--beam", "-2", "-p", PROMPT], "-2"),
    "zero top-k": (["--top-k", "0", "-p", PROMPT], "--top-k"),
    "no samples": (["--num-samples", "0", "-p", PROMPT], "--num-samples"),
    "negative token budget": (["-n", "-1", "-p", PROMPT], "--max-new-tokens"),
    "negative seed": (["--seed", "-3", "-p", PROMPT], "--seed"),
    "infinite temperature": (["-t", "inf", "-p", PROMPT], "inf"),
    "zero stride": (["--perplexity", "{text_file}", "--stride", "0"], "--stride"),
    "no similarity flag": (["--similarity", "dot", "-p", PROMPT], "--similarity"),
    "weights is a text file": (["--weights", "{text_file}", "-p", PROMPT], "{text_file}"),
    "missing weights file": (["--weights", "{missing}", "-p", PROMPT], "{missing}"),
    "missing prompt file": ([*TINY_ARGS, "-f", "{missing}"], "{missing}"),
    "unknown device": (["--device", "NOPE", "-p", PROMPT], "NOPE"),
    # Regression: --device CPU:LLVM once opened a device named "CPU:LLVM" beside CPU, and on an
    # early error tinygrad's exit handler printed a traceback while finalizing them
    "early error with --device CPU:LLVM": (["--device", "CPU:LLVM", "-f", "{missing}"], "error:"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_cli_bad_input_is_one_error_line(tmp_path, monkeypatch, case):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("just some words, not a checkpoint\n" * 10)
    paths = {"text_file": text_file, "missing": tmp_path / "no-such-file"}
    args, named = BAD_INPUTS[case]
    args = [str(a).format(**paths) for a in args]
    if "--device" in args:  # a process of its own: a device chosen here would stay chosen
        done = run_cli(*args)
    else:  # in this process (conftest.run_main): the same main, without the start-up
        monkeypatch.setenv("HF_ENDPOINT", CLOSED_ENDPOINT)
        done = run_main(gpt.main, *args, text=False)
    err = done.stderr.decode()
    assert done.returncode == flags.USER_ERROR  # 2, as argparse's own errors
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
    assert named.format(**paths) in err
    assert done.stdout == b""



def test_cli_into_a_pipe_closed_early_ends_quietly():
    # `python gpt.py ... | head -2`: the prompt's two lines reach the reader, which then closes
    # the pipe while the model loads; every later write finds no reader (EPIPE). That ends the
    # run quietly, with status 0, as `cat big | head` does, not with a BrokenPipeError traceback.
    env = {**os.environ, "DEV": "CPU", "PARALLEL": "0", "TIKTOKEN_CACHE_DIR": str(TIKTOKEN_DIR),
           "HF_ENDPOINT": CLOSED_ENDPOINT}
    prompt = b"one\ntwo\nthree\n"
    proc = subprocess.Popen([sys.executable, str(ROOT / "gpt.py"), "--weights", TRAINED,
                             "-n", "40", "-t", "0", "--ignore-eos"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    proc.stdin.write(prompt)
    proc.stdin.close()
    assert [proc.stdout.readline() for _ in range(2)] == [b"one\n", b"two\n"]
    proc.stdout.close()  # head -2 exits
    try:
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=300) == 0, err
    finally:
        proc.kill()
    assert err == "", err


def test_cli_offline_without_weights_fails_cleanly(cli_runs):
    # Regression: the download's retry notes once came before the error line. In a pipe (not a
    # terminal) the download shows no progress, so the one line is all there is.
    done = cli_runs["offline"].result()
    err = done.stderr.decode()
    assert done.returncode == flags.USER_ERROR
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
    assert CLOSED_ENDPOINT in err
    # a download that got no byte leaves nothing: no empty weights/gpt2/, no empty partial file
    assert list(cli_runs["empty_weights"].iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Downloading the weights, from a local stand-in for the Hugging Face hub
# ---------------------------------------------------------------------------------------------

HUB_FILE = "/openai-community/gpt2/resolve/main/model.safetensors"
BLOB = "/cdn/tiny-gpt2"


class HubHandler(BaseHTTPRequestHandler):
    """Like huggingface.co: the resolve URL redirects to a CDN and carries the file's sha256 and
    size in X-Linked-ETag and X-Linked-Size (read by huggingface_hub's get_hf_file_metadata)."""

    def log_message(self, format, *args):
        pass  # the default logs every request to stderr

    def do_HEAD(self):
        self.answer(send_body=False)

    def do_GET(self):
        self.answer(send_body=True)

    def answer(self, send_body):
        hub = self.server.hub
        hub.requests.append((self.command, self.path))
        if self.path == HUB_FILE:
            self.send_response(302)
            self.send_header("Location", BLOB)
            self.send_header("X-Linked-ETag", f'"{hub.sha256}"')
            self.send_header("X-Linked-Size", str(len(hub.body)))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == BLOB:
            self.send_response(200)
            self.send_header("Content-Length", str(len(hub.body)))
            self.end_headers()
            if send_body:
                self.wfile.write(hub.body)
        else:
            self.send_error(404)


@pytest.fixture
def hub(monkeypatch):
    body = SAFETENSORS.read_bytes()
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    server.hub = SimpleNamespace(body=body, sha256=hashlib.sha256(body).hexdigest(), requests=[])
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    host, port = server.server_address
    monkeypatch.setenv("HF_ENDPOINT", f"http://{host}:{port}")
    # a proxy set in the environment must not intercept 127.0.0.1
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    yield server.hub
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_fetch_weights_downloads_once_then_the_cli_uses_the_cache(hub, tmp_path):
    weights_dir = tmp_path / "weights"
    path = gpt.fetch_weights("gpt2", weights_dir)
    assert path == weights_dir / "gpt2" / "model.safetensors"
    assert path.read_bytes() == hub.body
    assert ("GET", BLOB) in hub.requests
    before = len(hub.requests)
    assert gpt.fetch_weights("gpt2", weights_dir) == path
    assert len(hub.requests) == before  # the cached file needs no request

    # fetch_weights gets only the checkpoint; the real gpt2's shape is built into gpt.py, but
    # this tiny stand-in's shape comes from the config.json that load_gpt2 reads beside it.
    shutil.copy(TINY_DIR / "config.json", path.parent)
    done = run_cli("--weights-dir", weights_dir, "-p", PROMPT, *GREEDY_ARGS)  # hub unreachable
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == EXPECTED_STDOUT
    assert len(hub.requests) == before


def test_cli_without_the_tokenizer_names_tiktoken_cache_dir(tmp_path):
    # A fresh clone offline: tiktoken finds no r50k_base in an empty cache and tries to download
    # it. A proxy on a closed local port makes that fail at once, with or without a network.
    empty = tmp_path / "tiktoken"
    empty.mkdir()
    closed = "http://127.0.0.1:9"
    done = run_cli(*TINY_ARGS, "-p", PROMPT, "-n", "1", timeout=120,
                   env={"TIKTOKEN_CACHE_DIR": str(empty), "HTTPS_PROXY": closed,
                        "https_proxy": closed, "HTTP_PROXY": closed, "http_proxy": closed})
    err = done.stderr.decode()
    assert done.returncode == flags.USER_ERROR, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:"), err
    assert "TIKTOKEN_CACHE_DIR" in err and str(empty) in err
    assert list(empty.iterdir()) == []


def test_fetch_weights_offline_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_ENDPOINT)
    monkeypatch.setattr("download.BACKOFF_BASE", 0.0)
    weights_dir = tmp_path / "weights"
    with pytest.raises(flags.UserError, match="--weights FILE"):
        gpt.fetch_weights("gpt2", weights_dir)
    assert not weights_dir.exists()


# 🐍 and 😀 are four UTF-8 bytes, 猫 and 語 three: GPT-2's BPE cuts each into byte pieces
SPLIT_TEXT = "I love 🐍 and 猫, 日本語 😀!"
SHOWN = {"·": " ", "↵": "\n", "␍": "\r", "⇥": "\t"}  # heads.readable's substitutions


def label_bytes(label: str) -> bytes:
    """Undo heads.readable: its symbols back to whitespace, its \\xNN escapes back to bytes."""
    text = "".join(SHOWN.get(c, c) for c in label)
    parts = re.split(r"\\x([0-9a-f]{2})", text)  # text, hex, text, hex, ..., text
    return b"".join(bytes.fromhex(p) if i % 2 else p.encode() for i, p in enumerate(parts))


def test_labels_of_emoji_and_cjk_pieces_spell_the_original_bytes(enc):
    ids = enc.encode(SPLIT_TEXT)
    labels = gpt.token_labels(enc, ids)
    assert len(labels) == len(ids)
    assert not any("\ufffd" in label for label in labels), labels
    assert sum("\\x" in label for label in labels) >= 6, labels  # pieces, not whole characters
    assert b"".join(label_bytes(label) for label in labels) == SPLIT_TEXT.encode()
    # and each label is its own token's bytes, tiktoken's oracle
    assert [label_bytes(label) for label in labels] == [enc.decode_single_token_bytes(i)
                                                         for i in ids]


def test_logit_lens_and_attention_page_show_pieces_as_bytes(tiny, tmp_path):
    lens = run_main(gpt.main, *TINY_ARGS, "--logit-lens", SPLIT_TEXT, "--out", tmp_path)
    assert lens.returncode == 0, lens.stderr
    # the table's input and next-token columns: 🐍's first piece, then its second
    assert "\ufffd" not in lens.stdout and "·\\xf0\\x9f -> \\x90:" in lens.stdout, lens.stdout
    done = run_main(gpt.main, *TINY_ARGS, "--attention", SPLIT_TEXT, "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "attention.html").read_text(encoding="utf-8")
    data = json.loads(re.search(r'id="data">(.*?)</script>', page, re.S).group(1))
    assert "\ufffd" not in "".join(data["tokens"])
    assert b"".join(label_bytes(t) for t in data["tokens"]) == SPLIT_TEXT.encode()


def test_tiktoken_is_the_offline_r50k_base(enc):
    # guards the setup every test above relies on: the cached ranks, not a download
    assert enc.name == "r50k_base" and enc.n_vocab == 50257
    assert tiktoken.get_encoding("r50k_base").encode(PROMPT) == REF["greedy1_prompt"].tolist()
    assert any(TIKTOKEN_DIR.iterdir())


# ---------------------------------------------------------------------------------------------
# Bucketed prefill: prompts padded on the right to a few lengths
# ---------------------------------------------------------------------------------------------


def test_prefill_buckets_are_powers_of_two_up_to_the_context():
    buckets = [generate.prefill_bucket(T, 1024) for T in (1, 8, 9, 14, 16, 17, 40, 513, 1024)]
    assert buckets == [8, 8, 16, 16, 16, 32, 64, 1024, 1024]
    assert generate.prefill_bucket(70, 100) == 100  # a context that is no power of two
    assert generate.prefill_bucket(3, 7) == 7
    with pytest.raises(ValueError):
        generate.prefill_bucket(129, 128)


def test_padded_prefill_equals_the_unpadded_forward(tiny):
    """Every real position's logits and the first token generate() picks, with and without the
    padding: causal attention never lets a real position see a padded one."""
    rng = np.random.default_rng(7)
    for T in (1, 2, 5, 9, 13, 100):
        ids = rng.integers(0, EOT, (1, T)).astype(np.int32)
        size = generate.prefill_bucket(T, tiny.config.n_ctx)
        padded = np.zeros((1, size), dtype=np.int32)
        padded[:, :T] = ids
        plain = tiny(Tensor(ids)).numpy()
        assert_padding_changes_nothing(tiny(Tensor(padded)).numpy()[:, :T], plain, T)
        first = next(generate.generate(tiny, ids, 1))
        assert first.tolist() == plain[:, -1].argmax(-1).tolist()


def kernels_made() -> int:
    """How many kernels this process has generated (or read back from disk) so far."""
    import tinygrad.engine.realize

    return len(tinygrad.engine.realize.to_program_cache)


@pytest.mark.skipif(PLAIN, reason="runtime.kept_jits keeps the steps; TINYGPT_PLAIN=1 "
                    "installs no runtime piece")
def test_prompts_of_three_lengths_in_one_bucket_build_one_graph(tiny, monkeypatch):
    """The first prompt of a bucket traces the prefill and the decode step once; two more prompts
    of other lengths in that bucket, each a generate() of its own, replay them: no pass through
    the model's Python, no kernel made, and each prompt gets its own logits."""
    seen = record_sampled_logits(monkeypatch)
    monkeypatch.setattr(tiny, "_kept_jits", None, raising=False)  # no steps kept from other tests
    traced = []
    real_call = transformer.Transformer.final_stream
    monkeypatch.setattr(transformer.Transformer, "final_stream",
                        lambda self, idx, *a: traced.append(idx.shape) or real_call(self, idx, *a))
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, EOT, (1, T)).astype(np.int32) for T in (9, 12, 15)]  # bucket 16
    made = []
    for prompt in prompts:
        list(generate.generate(tiny, prompt, 3))
        made.append(kernels_made())
    assert traced == [(1, 16), (1, 1)]  # one prefill and one decode step traced, for all three
    assert made[0] > 0 and made[1] == made[0] == made[2], made  # no kernel built after the first
    for i, prompt in enumerate(prompts):  # and each prompt got its own logits
        expected = logits_of(tiny, prompt[0])[-1]
        np.testing.assert_allclose(seen[3 * i][0], expected, rtol=0, atol=LOGIT_TOL)


def test_kept_steps_are_traced_again_for_new_weights_or_another_batch(monkeypatch):
    """generate keeps its compiled prefill and decode step on the model, and they replay the
    buffers they were captured with: new weights, or another batch (new KV caches), must trace
    them again. Every step's logits against the plain forward pass of the same tokens."""
    model = gpt.load_gpt2("gpt2", weights=SAFETENSORS)  # its own: the other tests' stays as is
    seen = record_sampled_logits(monkeypatch)

    def check(prompt: np.ndarray) -> np.ndarray:
        first = len(seen)
        new = np.stack(list(generate.generate(model, prompt, 3)), 1)  # (B, 3)
        for b, row in enumerate(prompt):
            want = logits_of(model, np.concatenate([row, new[b, :-1]]))[len(row) - 1 :]
            got = np.stack([logits[b] for logits in seen[first:]])  # (3, V)
            np.testing.assert_allclose(got, want, rtol=0, atol=LOGIT_TOL)
        return new

    prompt = np.random.default_rng(9).integers(0, EOT, (1, 6)).astype(np.int32)
    before = check(prompt)
    assert np.array_equal(check(prompt), before)  # replayed
    for t in model.parameters().values():  # other weights, in new buffers
        t.replace(Tensor(np.ascontiguousarray(t.numpy()[..., ::-1])))
    assert not np.array_equal(check(prompt), before)
    check(np.concatenate([prompt, prompt[:, ::-1]]))  # a batch of two: caches made again
    check(prompt[:, :5])  # one again, in a bucket seen with one before the batch of two
    check(prompt[:, :5])


def test_decode_overwrites_the_keys_the_padding_left_in_the_cache(tiny):
    """A 5-token prompt is prefilled as 8: cache positions 5 to 7 get the padding's keys and
    values. Each decode step writes its position before it reads it, so after 4 steps the cache
    holds exactly what an unpadded prefill of the 8 real tokens writes."""
    prompt = np.array([REF["greedy1_prompt"]], dtype=np.int32)  # 5 tokens
    steps = generate.generate(tiny, prompt, 4)
    new = [next(steps)]
    cache = tiny.h[0].attn.cache_kv
    after_prefill = cache.numpy()[:, :, :, 5:8].copy()
    new += list(steps)
    decoded = cache.numpy()[:, :, :, :8].copy()
    tokens = np.concatenate([prompt, np.stack(new, 1)[:, :3]], axis=1).astype(np.int32)  # (1, 8)
    tiny(Tensor(tokens), 0).realize()
    fresh = tiny.h[0].attn.cache_kv.numpy()[:, :, :, :8]
    np.testing.assert_allclose(decoded, fresh, rtol=0, atol=1e-5)
    assert np.abs(after_prefill - fresh[:, :, :, 5:8]).max() > 1e-2  # the padding did write there


def test_safetensors_reader_equals_tinygrads(tmp_path):
    """read_safetensors (NumPy over a memory map) against tinygrad's own safe_load."""
    rng = np.random.default_rng(3)
    tensors = {"f32": Tensor(rng.standard_normal((3, 5)).astype(np.float32)),
               "f16": Tensor(rng.standard_normal(7).astype(np.float16)),
               "i64": Tensor(np.arange(4, dtype=np.int64))}
    safe_save(tensors, str(tmp_path / "t.safetensors"))
    ours = gpt.read_safetensors(tmp_path / "t.safetensors")
    for name, t in safe_load(str(tmp_path / "t.safetensors")).items():
        assert ours[name].dtype == t.numpy().dtype and np.array_equal(ours[name], t.numpy())


def test_safetensors_reader_widens_bfloat16_exactly(tmp_path):
    """bfloat16 is the upper half of a float32's bits, written here by hand (tinygrad's CPU
    backend cannot compile a bfloat16 kernel to make the file)."""
    values = np.array([[1.5, -2.0], [0.15625, 3.0e38]], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype("<u2")
    head = json.dumps({"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "b.safetensors").write_bytes(len(head).to_bytes(8, "little") + head
                                             + bits.tobytes())
    ours = gpt.read_safetensors(tmp_path / "b.safetensors")["w"]
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, (bits.astype(np.uint32) << 16).view(np.float32))
    np.testing.assert_allclose(ours, values, rtol=1e-2)


def test_a_model_without_the_mask_is_never_padded(monkeypatch):
    """--ablate no-mask lets every position see every other, the padding too: its passes keep
    their length, and generate's first logits are the unpadded forward's."""
    Tensor.manual_seed(2)
    model = transformer.Transformer(transformer.Config(vocab_size=11, n_ctx=16, causal=False))
    ids = np.random.default_rng(4).integers(0, 11, (1, 5)).astype(np.int32)
    assert generate.padded_length(model, 5) == 5
    want = model(Tensor(ids)).numpy()[:, -1]
    seen = record_sampled_logits(monkeypatch)
    next(generate.generate(model, ids, 1))
    np.testing.assert_allclose(seen[0], want, rtol=0, atol=1e-6)
    att = heads.attention_maps(model, Tensor(ids))[1].numpy()[0]
    np.testing.assert_allclose(heads.padded_attention(model, ids[0]), att, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# One progress bar (flags.Progress), one temporary-file-then-rename (flags.atomic_write)
# ---------------------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_perplexity_progress_is_the_shared_bar_on_a_terminal(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    draw = gpt.progress_bar("perplexity")
    assert isinstance(draw.__self__, flags.Progress)  # the bar download.py draws too
    for done in range(1, 5):
        draw(done, 4)
    lines = terminal.getvalue().split("\n")
    assert lines[-1] == "" and len(lines) == 2  # one line, ended once
    last = lines[0].split("\r")[-1]
    assert last.startswith("perplexity: [" + "#" * 20 + "] 4/4 windows 100.0%"), last
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a pipe: no bar at all
    assert gpt.progress_bar("perplexity") is None


def test_a_figure_that_fails_to_save_leaves_the_old_file(tmp_path):
    import plots

    path = tmp_path / "heads.png"
    path.write_bytes(b"the old picture")
    broken = SimpleNamespace(get_suptitle=lambda: "", savefig=lambda f, **kw: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        plots.save(broken, path)
    assert path.read_bytes() == b"the old picture"
    assert [p.name for p in tmp_path.iterdir()] == ["heads.png"]


def test_help_names_every_default():
    done = run_main(gpt.main, "--help")
    assert done.returncode == 0 and done.stderr == ""
    shown = " ".join(done.stdout.split())  # argparse wraps lines
    actions = [a for a in gpt.parser()._actions if a.help and a.dest != "help"]
    # what to do (-p, --attention, ...), the one head or heads to look at, a mean ablation
    # and what patching compares default to nothing
    nothing = {"prompt", "file", "attention", "perplexity", "head_ablation", "logit_lens",
               "layer", "head", "heads", "mean", "mean_from", "patch", "dla", "corrupt", "answer",
               "wrong"}
    for action in actions:
        help_text = " ".join(action.help.split())
        if action.default is not None and action.default is not False:  # (0 == False)
            assert f"{help_text} (default: {action.default})" in shown, action.dest
        elif action.nargs != 0 and action.dest not in nothing:  # a value, without a default
            assert "(default: " in help_text, action.dest
    assert len(actions) == 38  # --serve, --port and --host among them
    assert "(default: None)" not in shown and "(default: False)" not in shown
    assert "tokens to generate (default: 100)" in shown
