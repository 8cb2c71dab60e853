"""Benchmark: this project's tinygrad transformer against PyTorch, on the same machine, in one run.

What it measures (GPT-2 124M with random weights in the real shapes, so no download is needed;
both libraries load them from one checkpoint that this script writes in the hub's layout):

  decode     tokens/s of greedy generation in steady state (tokens 10..N, N = --tokens), time to
             first token (loading the checkpoint from disk + prefill of a 16-token prompt, and
             each of the two on its own), the JIT warm-up (tokens 2 and 3: the capture, then
             the first replay), kernels launched per decode step, peak RSS. Peer: Hugging Face
             GPT2LMHeadModel, fp32, a manual greedy loop with past_key_values. And decode
             tokens/s after prompts of 30, 300 and 900 tokens (issue 34: it should hold).
  half       the same with 16-bit weights: tinygrad float16 against PyTorch bfloat16, and the
             512-token prefill in 16 bits (against tinygrad's fp32 one, too).
  beam       decode fp32 and 16-bit again, with gpt.py --beam 2: the decode step's kernels come
             from tinygrad's kernel search. The first run on a machine searches (on two cores:
             about a minute per precision for CPU, 4 to 10 for CL) and tinygrad caches the result.
  prefill    tokens/s for a 512-token prompt after a first one of the same length (which
             traces the bucket's graph; its time is reported too).
  lab        issue 20's commands, whole processes: `gpt.py --attention TEXT` on texts of 14 to
             45 tokens (after one run that fills the caches), `gpt.py -p PROMPT -n 32` against
             a process that runs GPT2LMHeadModel.from_pretrained and generate, and
             `--perplexity` on tinyshakespeare's first 6,000 characters (stride 512) against
             the loop of Hugging Face's perplexity guide: tokens/s after loading, and whole
             processes; decode tokens/s of whole processes, `gpt.py -n 144` minus `-n 16`
             against generate the same way (issue 34). Peer for --attention: a forward with
             output_attentions after loading.
             And issue 31's patching of an 18-token pair, twice in one process: the resid_pre
             grid and attribution patching, against TransformerLens (if installed).
  serve      the workbench (issue 32), over HTTP on loopback: /api/run on the lab's texts of 14
             to 45 tokens after a first request of each, /api/ablate of two heads, /api/patch
             of a 15-token pair, the resid_pre grid of a 20-token pair with its progress
             streamed (the second scan), and the start (load + warm). Peer: a forward with
             output_attentions after loading, as for --attention.
  train      four training workloads (TRAIN_WORKLOADS: the reversal demo, modular addition at
             p=113 and p=59 full batch, nanoGPT's CPU shakespeare_char): steady ms per optimizer
             step (AdamW, clip 1.0), time from building the model to the first finished step,
             kernels per step, and each step's kernels timed one by one (DEBUG=2), the slowest
             matmul beside the fastest. Peer: Hugging Face GPT2LMHeadModel in the same shape.
  finetune   a step of fine-tuning GPT-2 124M at batch 4 x 128 (issue 33): steady ms per step
             (AdamW, betas (0.9, 0.95), clip 1.0), peak RSS, and the first step's time (load
             the checkpoint + one step) on an empty kernel cache (cold: a fresh tinygrad
             cache.db) and on the one it filled (warm). Peer: Hugging Face GPT2LMHeadModel from
             the same checkpoint and torch.optim.AdamW.
  demo       the wall time of the whole `python transformer.py -v`, first on an empty kernel cache
             (a fresh tinygrad cache.db and PoCL cache), then again on the cache it filled.
  bandwidth  the machine's streaming read bandwidth (NumPy sums over 1 GiB), and decode speed as a
             percentage of the bound it sets: every weight is read once per token. Each decode
             child also reads it between stretches of its tokens (another process holds the
             memory it reads), and sets each stretch against the reads on either side.

Every measurement runs in its own Python process, so imports, caches and peak memory do not mix;
the child prints one JSON line and this script collects them into a table whose ratio column is
tinygrad / PyTorch. Imports are not timed. The PyTorch rows need torch and transformers; without
them those cells stay empty; --torch-python runs those children with another interpreter (one
with torch, when the project's own has none).

    .venv/bin/python bench.py                        # everything, on the default backend or DEV
    .venv/bin/python bench.py --quick                # fewer tokens and steps: a smoke run
    .venv/bin/python bench.py --only decode,half --tokens 128 --json out.json
    .venv/bin/python bench.py --only lab,prefill --torch-python /tmp/tv/bin/python
    .venv/bin/python bench.py --only serve --torch-python /tmp/tv/bin/python
    .venv/bin/python bench.py --only decode,beam     # default kernels beside searched ones
    JITBEAM=2 .venv/bin/python bench.py --only train # search the step's kernels (~17 min)

A search makes the first run slow; tinygrad caches what it found in ~/.cache/tinygrad, so later
runs start fast. The machine is often shared: run twice and trust what repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

import flags

GROUPS = ("decode", "half", "beam", "prefill", "lab", "serve", "train", "finetune", "demo",
          "bandwidth")
GPT2_VOCAB = 50257  # token ids are drawn below this, whatever padding an implementation adds
PROMPT_TOKENS = 16  # the short prompt before decoding
PREFILL_TOKENS = 512
# --attention's texts: lengths 14, 15, 24 and 45 in GPT-2's tokens (the issue's, and longer)
LAB_TEXTS = (
    "The cat sat on the mat because it was tired of chasing mice.",
    "A dog ran into the garden and barked at the old grey cat.",
    "When Mary and John went to the store, John gave a drink to Mary because she was thirsty "
    "after the long walk.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity.",
)
LAB_PROMPT, LAB_NEW_TOKENS = "Hello there", 32
PROCESS_TOKENS, PROCESS_ROUNDS = (16, 144), 3  # issue 34: whole processes' decode speed
# issue 31's patching pair (18 tokens): the answer " John" against " Mary"
PATCH_CLEAN = "When John and Mary went to the store, Mary gave a drink to the man at the"
PATCH_CORRUPT = "When John and Mary went to the store, John gave a drink to the man at the"
PATCH_ANSWER, PATCH_WRONG = " John", " Mary"
PPL_CHARS, PPL_STRIDE = 6000, 512
SHAKESPEARE = Path(__file__).resolve().parents[1] / "shared" / "data" / "tinyshakespeare.txt"
STEADY_FROM = 10  # decode speed is timed from this token on, after the JIT has settled
SEGMENT = 16  # tokens between two reads of the memory's bandwidth (timed_tokens)
# issue 34: decode speed at these lengths of context (a prompt of that many tokens, then
# CONTEXT_TOKENS more, timed from the fourth: the decode step is warm from the first run), in
# CONTEXT_ROUNDS rounds that take the lengths in turn
CONTEXTS, CONTEXT_TOKENS, CONTEXT_ROUNDS = (30, 300, 900), 20, 3
BENCH_BEAM = 2  # the search width of the beam row
DEFAULT_TOKENS, QUICK_TOKENS = 64, 24
TRAIN_WARMUP = 3  # TinyJit captures on its second call; the third is the first replay
TRAIN_STEPS, QUICK_TRAIN_STEPS = 20, 8
# issue 33: a fine-tuning step of GPT-2 124M (from the checkpoint this script writes) at batch
# 4 x 128, AdamW with nanoGPT's betas, clip 1.0, as tasks.Text trains
FINETUNE_BATCH, FINETUNE_BLOCK, FINETUNE_LR = 4, 128, 1e-4
FINETUNE_STEPS, QUICK_FINETUNE_STEPS = 10, 5
CHILD_TIMEOUT_S = 3600  # a cold BEAM search on two cores can take tens of minutes
# --llama-cpp: llama-bench's tests (pp512, tg64), in rounds that alternate with ours, so that
# both see the same machine; the median of each. Its two ways of loading the weights (mapping
# the file, its default, or reading them into memory of its own) are both run; the faster counts.
LLAMA_ROUNDS, LLAMA_GEN_TOKENS, LLAMA_LOAD_MODES = 3, 64, "mmap,none"

# The training workloads of the speed issue: each is one model shape and batch, trained with
# AdamW and gradient clipping at 1.0 in both libraries. T is the sequence length of a batch;
# "scored" says which positions carry loss.
TRAIN_WORKLOADS = {
    # transformer.py -v: 8 digits, '>', 8 digits backwards (context 17, sequences of 16)
    "reverse": dict(vocab=11, n_ctx=17, T=16, n_layer=2, n_head=4, n_embd=64, batch=64, lr=3e-3,
                    wd=0.1, scored="all"),
    # modular addition "a b =" -> (a + b) mod p, full batch: Nanda et al.'s p=113, 30 % of pairs
    "grok113": dict(vocab=114, n_ctx=3, T=3, n_layer=1, n_head=4, n_embd=128, batch=3830, lr=1e-3,
                    wd=1.0, scored="last"),
    # the same at p=59, 50 % of pairs, 64 dims
    "grok59": dict(vocab=60, n_ctx=3, T=3, n_layer=1, n_head=4, n_embd=64, batch=1740, lr=1e-3,
                   wd=1.0, scored="last"),
    # nanoGPT's config/train_shakespeare_char.py, scaled down as its README suggests for a CPU
    "nanogpt": dict(vocab=65, n_ctx=64, T=64, n_layer=4, n_head=4, n_embd=128, batch=12, lr=1e-3,
                    wd=0.1, scored="all"),
}

# The goals of the speed issue, as the ratio tinygrad / PyTorch per table row: ">=" where more is
# better (speed), "<=" where less is (time, memory).
TARGETS = {
    "decode": (">=", 1.0),
    "decode16": (">=", 1.5),  # 16-bit weights read half the bytes of PyTorch's fp32 weights
    "prefill": (">=", 0.5),  # issue 20: half of PyTorch's
    "perplexity": (">=", 0.5),
    "train": ("<=", 2.0),
    "patch": ("<=", 1.0),  # issue 31: the grid within TransformerLens's time
    "finetune": ("<=", 1.5),  # issue 33: time per step, and peak memory within 1.3x
    "finetune_rss": ("<=", 1.3),
}
TRAIN_LABELS = {
    "reverse": "reversal (2 layers, 64 dims, batch 64 x 16)",
    "grok113": "modular addition p=113 (1 layer, 128 dims, 3,830 pairs)",
    "grok59": "modular addition p=59 (1 layer, 64 dims, 1,740 pairs)",
    "nanogpt": "nanoGPT shakespeare_char (4 layers, 128 dims, batch 12 x 64)",
}
FIRST_STEP_TARGET_S = 5.0  # the reversal model, warm kernel cache
DEMO_WARM_TARGET_S, DEMO_COLD_TARGET_S = 20.0, 60.0  # the whole `python transformer.py -v`
TTFT_TARGET_S = 10.0  # time to first token of GPT-2 124M on a warm kernel cache
ATTR_TARGET_S = 3.0  # issue 31: attribution patching of GPT-2 124M, 20 tokens
BOUND_TARGET = 85.0  # fp32 decode should reach this % of the memory-bandwidth bound (issue 34)


class ChildFailed(Exception):
    """A timed process of the lab group failed: its row says so, the other rows still stand.
    (A user's mistake, a bad flag, is argparse's error: flags.Parser, exit status 2.)"""


# ---------------------------------------------------------------------------------------------
# Children: each function runs in a fresh interpreter and returns a dict that becomes a JSON line
# ---------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident memory. ru_maxrss is in KiB on Linux (getrusage(2)), bytes on
    macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def random_ids(T: int, vocab: int, seed: int) -> np.ndarray:
    """(1, T) token ids; the same for every child, so both libraries see identical input."""
    return np.random.default_rng(seed).integers(0, vocab, (1, T), dtype=np.int32)


def train_batches(workload: str, n: int, ignore: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n batches of random token ids; "last" workloads score only the last position, as
    grokking's answer after "a b =", the other positions get the ignore id."""
    w = TRAIN_WORKLOADS[workload]
    rng = np.random.default_rng(0)
    shape = (w["batch"], w["T"])
    batches = []
    for _ in range(n):
        x = rng.integers(0, w["vocab"], shape, dtype=np.int32)
        y = rng.integers(0, w["vocab"], shape, dtype=np.int32)
        if w["scored"] == "last":
            y[:, :-1] = ignore
        batches.append((x, y))
    return batches


def decode_summary(stamps: list[float], t_start: float, t_loaded: float) -> dict:
    """Times from the moment each token came out. stamps[i] is when token i + 1 was ready; the
    model was loaded from t_start to t_loaded."""
    n = len(stamps)
    return {
        "tokens": n,
        "ttft_s": stamps[0] - t_start,
        "load_s": t_loaded - t_start,
        "first_prefill_s": stamps[0] - t_loaded,  # the first token, compilation included
        "warmup_s": stamps[2] - stamps[0],  # tokens 2 and 3
        "decode_tok_s": (n - STEADY_FROM) / (stamps[n - 1] - stamps[STEADY_FROM - 1]),
    }


def context_speeds(decode, reads, clock=time.perf_counter) -> dict:
    """Decode tokens/s after prompts of each of CONTEXTS' lengths: decode(prompt (1, T)) yields
    as each new token comes out. The first three tokens (the prefill's, and the steps right
    after a new prompt) are not timed. CONTEXT_ROUNDS rounds, each of every length in turn, as
    this machine's speed moves from one minute to the next, with a read of the memory's
    bandwidth (reads()) before the first and after each: each length's median, each round's
    speeds and the faster read beside it (for bound_percent), and the median of each round's
    speed at the longest against at the shortest."""
    speeds = {str(n): [] for n in CONTEXTS}
    gb_s = [reads()]
    for _ in range(CONTEXT_ROUNDS):
        for n in CONTEXTS:
            stamps = [clock() for _ in decode(random_ids(n, GPT2_VOCAB, seed=n))][3:]
            speeds[str(n)].append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        gb_s.append(reads())
    first, last = speeds[str(CONTEXTS[0])], speeds[str(CONTEXTS[-1])]
    return {"context_tok_s": {n: statistics.median(v) for n, v in speeds.items()},
            "context_rounds": speeds, "context_gb_s": [max(a, b) for a, b in zip(gb_s, gb_s[1:])],
            "context_held": statistics.median(b / a for a, b in zip(first, last))}


def tinygrad_info() -> dict:
    from tinygrad import Device

    renderer = type(Device[Device.DEFAULT].renderer).__name__
    return {"device": Device.DEFAULT, "renderer": renderer}


def write_random_gpt2(folder: Path) -> Path:
    """GPT-2 124M with random weights, saved as the hub serves it: model.safetensors (Conv1D
    weights (in, out), no "transformer." prefix) and config.json. Written with NumPy, so it needs
    neither torch nor tinygrad; returns the folder."""
    C, L, V, n_ctx = 768, 12, GPT2_VOCAB, 1024
    shapes = {"wte.weight": (V, C), "wpe.weight": (n_ctx, C)}
    for i in range(L):
        for name, shape in (("ln_1.weight", (C,)), ("ln_1.bias", (C,)),
                            ("attn.c_attn.weight", (C, 3 * C)), ("attn.c_attn.bias", (3 * C,)),
                            ("attn.c_proj.weight", (C, C)), ("attn.c_proj.bias", (C,)),
                            ("ln_2.weight", (C,)), ("ln_2.bias", (C,)),
                            ("mlp.c_fc.weight", (C, 4 * C)), ("mlp.c_fc.bias", (4 * C,)),
                            ("mlp.c_proj.weight", (4 * C, C)), ("mlp.c_proj.bias", (C,))):
            shapes[f"h.{i}.{name}"] = shape
    shapes |= {"ln_f.weight": (C,), "ln_f.bias": (C,)}
    rng = np.random.default_rng(0)
    header, blobs, offset = {}, [], 0
    for name, shape in shapes.items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):  # LayerNorm gains
            array = np.ones(shape, np.float32)
        else:
            array = rng.standard_normal(shape, np.float32) * np.float32(0.02)
        header[name] = {"dtype": "F32", "shape": list(shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        blobs.append(array)
        offset += array.nbytes
    # safetensors: an 8-byte little-endian header length, the JSON header, then the raw tensors
    head = json.dumps(header).encode()
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for array in blobs:
            f.write(array.tobytes())
    # n_ctx beside n_positions: llama.cpp's converter reads it (--llama-cpp)
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": V,
              "n_positions": n_ctx, "n_ctx": n_ctx, "n_embd": C, "n_layer": L, "n_head": 12,
              "layer_norm_epsilon": 1e-5}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def load_gpt2_tinygrad(folder: Path, half: bool):
    """The path gpt.py takes: read the checkpoint, map it, copy it to the device."""
    from gpt import load_gpt2

    return load_gpt2(weights=folder / "model.safetensors", half=half)


def child_tinygrad_decode(folder: Path, tokens: int, half: bool, beam: int = 0) -> dict:
    from tinygrad import Device, GlobalCounters, Tensor, Variable

    from generate import generate

    reads = ReadsBeside()  # before the clock starts: writing its 2 GiB takes seconds
    t_start = time.perf_counter()
    model = load_gpt2_tinygrad(folder, half)
    t_loaded = time.perf_counter()
    prompt = random_ids(PROMPT_TOKENS, GPT2_VOCAB, seed=0)
    counts, kept = [], []

    def counted():
        for tok in generate(model, prompt, tokens, temperature=0.0, beam=beam):
            counts.append(GlobalCounters.kernel_count)
            kept[:] = [tok]
            yield tok

    with reads:
        stamps, beside = timed_tokens(counted(), reads)
        contexts = context_speeds(lambda ids: generate(model, ids, CONTEXT_TOKENS, 0.0,
                                                       beam=beam), reads)
    last = kept[0]
    # kernels between two yields in steady state, as GlobalCounters sees them: TinyJit's replay
    # of the step, plus the copies of the token in and the logits out
    per_step = [b - a for a, b in zip(counts[STEADY_FROM - 1 :], counts[STEADY_FROM:])]
    # The same step outside the JIT: every kernel goes through the scheduler and is counted one by
    # one, so a difference from the line above means the JIT counts a batched graph as fewer.
    x = Tensor(last[:, None].astype(np.int32)).realize()
    pos = Variable("pos", 1, model.config.n_ctx - 1).bind(PROMPT_TOKENS + STEADY_FROM)
    before = GlobalCounters.kernel_count
    model(x, pos)[:, -1].realize()
    Device[Device.DEFAULT].synchronize()
    unjitted = GlobalCounters.kernel_count - before
    n_params = sum(p.numel() for p in model.parameters().values())
    return {**decode_summary(stamps, t_start, t_loaded), **contexts,
            "kernels_per_step": min(per_step),
            "kernels_per_step_max": max(per_step), "kernels_unjitted": unjitted,
            "n_params": n_params, "rss_mb": peak_rss_mb(), **tinygrad_info(), **beside}


def prefill_seconds(model) -> tuple[float, float]:
    """generation's own prefill of PREFILL_TOKENS, which gives the first token (PyTorch's peer
    keeps one row of logits too): the first prompt of the process, which traces the bucket's
    graph (its kernels come from the disk cache), then a second prompt, another text of the same
    length, which replays it. -> (first s, second s)"""
    from generate import generate

    seconds = []
    for seed in (1, 2):
        t0 = time.perf_counter()
        next(generate(model, random_ids(PREFILL_TOKENS, GPT2_VOCAB, seed=seed), 1))
        seconds.append(time.perf_counter() - t0)
    return seconds[0], seconds[1]


def child_tinygrad_prefill(folder: Path, half: bool) -> dict:
    first, seconds = prefill_seconds(load_gpt2_tinygrad(folder, half))
    return {"prefill_tok_s": PREFILL_TOKENS / seconds, "prefill_s": seconds,
            "prefill_first_s": first, "rss_mb": peak_rss_mb(), **tinygrad_info()}


def child_tinygrad_peer(folder: Path, half: bool) -> dict:
    """llama-bench's two tests, for time_llama's rounds: pp512 (a second prompt of the bucket,
    prefill_seconds) and tg64 (greedy tokens after a one-token prompt, as llama-bench decodes
    from an empty context; the capture and first replay not timed, as its warm-up run is
    not)."""
    from generate import generate

    model = load_gpt2_tinygrad(folder, half)
    _, prefill_s = prefill_seconds(model)
    stamps = [time.perf_counter() for _ in generate(
        model, random_ids(1, GPT2_VOCAB, seed=3), LLAMA_GEN_TOKENS + 3)][2:]
    return {"prefill_tok_s": PREFILL_TOKENS / prefill_s,
            "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def lab_ids() -> np.ndarray:
    """The perplexity text's tokens: tinyshakespeare's first PPL_CHARS characters (TEXT env var
    names another file)."""
    import tiktoken

    text = Path(os.environ.get("TEXT", SHAKESPEARE)).read_text()[:PPL_CHARS]
    return np.array(tiktoken.get_encoding("r50k_base").encode(text), dtype=np.int64)


def child_tinygrad_perplexity(folder: Path) -> dict:
    import gpt

    t0 = time.perf_counter()
    model = load_gpt2_tinygrad(folder, False)
    t1 = time.perf_counter()
    ids = lab_ids()
    _, losses, weights = gpt.token_losses(model, ids, PPL_STRIDE)
    seconds = time.perf_counter() - t1
    return {"load_s": t1 - t0, "ppl_s": seconds, "ppl_tok_s": len(losses) / seconds,
            "nll": gpt.perplexity_nll(losses, weights), "tokens": len(losses),
            "rss_mb": peak_rss_mb(), **tinygrad_info()}


def child_torch_perplexity(folder: Path) -> dict:
    """The loop of Hugging Face's perplexity guide, as tests/make_fixtures.py runs it."""
    torch, transformers = torch_setup()
    t0 = time.perf_counter()
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    t1 = time.perf_counter()
    encodings = torch.from_numpy(lab_ids())[None]
    max_length, seq_len = model.config.n_positions, encodings.size(1)
    nll_sum, n_tokens, prev_end, scored = 0.0, 0, 0, 0
    for begin in range(0, seq_len, PPL_STRIDE):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = encodings[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        valid = (target_ids != -100).sum().item()
        nll_sum += float(loss) * (valid - 1)
        n_tokens += valid - 1
        scored += (target_ids[:, 1:] != -100).sum().item()
        prev_end = end
        if end == seq_len:
            break
    seconds = time.perf_counter() - t1
    return {"load_s": t1 - t0, "ppl_s": seconds, "ppl_tok_s": scored / seconds,
            "nll": nll_sum / n_tokens, "tokens": scored, "rss_mb": peak_rss_mb()}


def child_torch_attention(folder: Path) -> dict:
    """What --attention computes, in transformers: one forward with output_attentions per text
    (after one on the first text, as a warm-up), and the induction probe's 4 x 100 tokens."""
    torch, transformers = torch_setup()
    import tiktoken

    enc = tiktoken.get_encoding("r50k_base")
    t0 = time.perf_counter()
    model = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager")
    model.eval()
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    probe = np.concatenate([np.stack([rng.choice(GPT2_VOCAB, 50, replace=False)
                                      for _ in range(4)])] * 2, axis=1)
    seconds = []
    with torch.no_grad():
        for ids in [enc.encode(LAB_TEXTS[0])] + [enc.encode(t) for t in LAB_TEXTS]:
            t1 = time.perf_counter()
            model(torch.tensor([ids]), output_attentions=True)
            seconds.append(time.perf_counter() - t1)
        t1 = time.perf_counter()
        model(torch.from_numpy(probe).long(), output_attentions=True)
        probe_s = time.perf_counter() - t1
    return {"load_s": load_s, "attention_s_max": max(seconds[1:]), "probe_s": probe_s}


def patch_pair() -> tuple[np.ndarray, np.ndarray, int, int]:
    import tiktoken

    enc = tiktoken.get_encoding("r50k_base")
    clean, corrupt = (np.array(enc.encode(t), np.int64) for t in (PATCH_CLEAN, PATCH_CORRUPT))
    return clean, corrupt, enc.encode(PATCH_ANSWER)[0], enc.encode(PATCH_WRONG)[0]


def child_tinygrad_patching(folder: Path) -> dict:
    """The resid_pre grid (n_layer x T patched runs) and attribution patching's every grid, each
    twice in one process: the first call compiles."""
    from tinygrad import Tensor

    import patching

    model = load_gpt2_tinygrad(folder, False)
    clean, corrupt, answer, wrong = patch_pair()
    clean, corrupt = clean.astype(np.int32), corrupt.astype(np.int32)
    T = len(clean)
    by_position = Tensor(np.eye(T, dtype=bool)[:, :, None])  # (T, T, 1), row b: position b
    result = {}
    for run in ("first", "again"):
        t0 = time.perf_counter()
        acts = patching.cache_pair(model, clean, corrupt, answer, wrong)
        grid = np.stack([patching.patch(model, acts, answer, wrong,
                                        f"blocks.{layer}.hook_resid_pre", by_position)
                         for layer in range(model.config.n_layer)])
        t1 = time.perf_counter()
        patching.attribution_patching(model, clean, corrupt, answer, wrong)
        t2 = time.perf_counter()
        result |= {f"grid_{run}_s": t1 - t0, f"attr_{run}_s": t2 - t1}
    return {**result, "grid_s": result["grid_again_s"], "attr_s": result["attr_again_s"],
            "tokens": T, "corner": float(grid[0, 0])}


def child_torch_patching(folder: Path) -> dict:
    """The same two in TransformerLens 3.9 (weights from Hugging Face's model by
    convert_gpt2_weights, no processing): get_act_patch_resid_pre, one forward pass per cell;
    attribution patching as Nanda's recipe runs it, forward and backward hooks on the corrupted
    run, each twice."""
    torch, transformers = torch_setup()
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import patching as tl_patching
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    c = hf.config
    cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head,
                                  d_head=c.n_embd // c.n_head, d_mlp=4 * c.n_embd,
                                  d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new",
                                  normalization_type="LN", default_prepend_bos=False)
    tl = HookedTransformer(cfg)
    tl.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    tl.eval()
    clean, corrupt, answer, wrong = patch_pair()
    clean, corrupt = torch.from_numpy(clean)[None], torch.from_numpy(corrupt)[None]
    metric = lambda logits: logits[0, -1, answer] - logits[0, -1, wrong]
    points = lambda name: name.endswith(("hook_resid_pre", "hook_attn_out", "hook_mlp_out",
                                         "hook_z"))

    def attribution():
        _, clean_cache = tl.run_with_cache(clean, names_filter=points)
        acts, grads = {}, {}
        keep = lambda store: lambda x, hook: store.__setitem__(hook.name, x.detach())
        tl.add_hook(points, keep(acts), "fwd")
        tl.add_hook(points, keep(grads), "bwd")
        try:
            metric(tl(corrupt)).backward()
        finally:
            tl.reset_hooks()
        return {n: ((clean_cache[n] - acts[n]) * grads[n]).sum(-1) for n in acts}

    result = {}
    for run in ("first", "again"):
        t0 = time.perf_counter()
        with torch.no_grad():
            _, cache = tl.run_with_cache(clean)
            grid = tl_patching.get_act_patch_resid_pre(tl, corrupt, cache, metric)
        t1 = time.perf_counter()
        attribution()
        t2 = time.perf_counter()
        result |= {f"grid_{run}_s": t1 - t0, f"attr_{run}_s": t2 - t1}
    return {**result, "grid_s": result["grid_again_s"], "attr_s": result["attr_again_s"],
            "tokens": clean.shape[1], "corner": float(grid[0, 0])}
def child_tinygrad_serve(folder: Path) -> dict:
    """The workbench (serve.py) over HTTP on loopback, end to end (JSON included): the start
    (load + warm), then per text of LAB_TEXTS a first /api/run (which may compile its length's
    pass) and a timed second one, /api/ablate of two heads (after the /api/run of its text, as
    the page asks, and on a text not run before), /api/patch of a 15-token pair, and the
    resid_pre grid of a 20-token pair with its progress streamed."""
    import http.client
    import threading

    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHAKESPEARE.parents[1] / "tiktoken"))
    import gpt
    import serve

    t0 = time.perf_counter()
    model = load_gpt2_tinygrad(folder, False)
    bench = serve.Workbench(model, serve.gpt2_vocab(gpt.tokenizer()), "bench", LAB_TEXTS[0])
    bench.warm()
    start_s = time.perf_counter() - t0
    server = serve.make_server(bench, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def post(path: str, body: dict) -> float:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=600)
        t1 = time.perf_counter()
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        reply = conn.getresponse()
        reply.read()
        if reply.status != 200:
            raise ChildFailed(f"{path} answered {reply.status}")
        return time.perf_counter() - t1

    first, run, ablate, bare = [], [], [], []
    for text in LAB_TEXTS:
        first.append(post("/api/run", {"text": text}))
        run.append(post("/api/run", {"text": text}))
        post("/api/ablate", {"text": text, "heads": ["5.1", "9.6"]})
        ablate.append(post("/api/ablate", {"text": text, "heads": ["5.1", "9.6"]}))
        bare.append(post("/api/ablate", {"text": text, "heads": ["5.1", "9.6"], "views": False}))
    # texts no /api/run read first (a link opened with heads knocked out): the whole lens is
    # read. Windows of the brief's 40 tokens: the first compiles the lens of that length, the
    # median of the next three is timed
    ids = gpt.tokenizer().encode(LAB_TEXTS[-1])
    unseen_s = statistics.median([post("/api/ablate", {
        "text": gpt.tokenizer().decode(ids[i:i + 40]), "heads": ["5.1", "9.6"]})
        for i in range(4)][1:])
    pair = {"clean": "When Mary and John went to the store, John gave a drink to",
            "corrupt": "When Mary and John went to the store, Mary gave a drink to",
            "answer": " Mary", "wrong": " John"}
    patch_s = post("/api/patch", pair)

    def scan(body: dict) -> tuple[float, float, int]:
        """/api/patch with its progress streamed: -> (s to the grid's last batch, s to the
        answer, the grid's progress lines read: one per layer)."""
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=600)
        t1 = time.perf_counter()
        conn.request("POST", "/api/patch", json.dumps({**body, "progress": True}),
                     {"Content-Type": "application/json"})
        reply, lines, grid_s = conn.getresponse(), 0, None
        while line := reply.readline():
            got = json.loads(line)
            if "done" not in got:
                if "tokens" not in got:
                    raise ChildFailed(f"/api/patch answered {got}")
                return grid_s, time.perf_counter() - t1, lines
            if got["step"].endswith("hook_resid_pre"):
                grid_s, lines = time.perf_counter() - t1, lines + 1
        raise ChildFailed("/api/patch ended without its answer")

    # the brief's grid: a 20-token pair, its resid_pre grid alone, after a first scan compiles
    grid = {"clean": "When Mary and John went to the store on a sunny day, John gave a big cold "
                     "drink to",
            "corrupt": "When Mary and John went to the store on a sunny day, Mary gave a big cold "
                       "drink to",
            "answer": " Mary", "wrong": " John", "grids": ["resid_pre"]}
    grid_first_s = scan(grid)[1]
    grid_s, grid_all_s, grid_lines = scan(grid)
    server.shutdown()
    return {"start_s": start_s, "run_first_s": first, "run_s": run, "run_s_max": max(run),
            "ablate_s": ablate, "ablate_s_max": max(ablate), "bare_s": bare,
            "bare_s_max": max(bare), "unseen_s": unseen_s, "patch_s": patch_s, "grid_s": grid_s,
            "grid_all_s": grid_all_s, "grid_first_s": grid_first_s, "grid_lines": grid_lines,
            "rss_mb": peak_rss_mb(), **tinygrad_info()}


def child_tinygrad_train(workload: str, steps: int) -> dict:
    from tinygrad import Context, GlobalCounters, Tensor

    import train
    import transformer as tr
    from tasks import IGNORE

    w = TRAIN_WORKLOADS[workload]
    Tensor.manual_seed(0)
    t_start = time.perf_counter()
    config = tr.Config(vocab_size=w["vocab"], n_ctx=w["n_ctx"], n_layer=w["n_layer"],
                       n_head=w["n_head"], n_embd=w["n_embd"])
    model = tr.Transformer(config)
    opt = train.make_optimizer(model, w["lr"], w["wd"])
    step_fn = train.make_train_step(model, opt)
    times, losses, kernels = [], [], []
    with Context(TRAINING=1):
        for x, y in train_batches(workload, TRAIN_WARMUP + steps, IGNORE):
            t0, k0 = time.perf_counter(), GlobalCounters.kernel_count
            loss, _ = step_fn(Tensor(x), Tensor(y), Tensor([w["lr"]]))
            losses.append(loss.item())  # waits for the step, as PyTorch's .item() does
            times.append(time.perf_counter() - t0)
            kernels.append(GlobalCounters.kernel_count - k0)
            if len(times) == 1:
                first_step_s = time.perf_counter() - t_start
        profile = kernel_profile(step_fn, x, y, w["lr"])
    return train_summary(times, losses, first_step_s) | {
        "kernels_per_step": kernels[-1], "rss_mb": peak_rss_mb(), **profile, **tinygrad_info()}


def finetune_batches(n: int) -> list[np.ndarray]:
    """n batches of FINETUNE_BATCH sequences of FINETUNE_BLOCK + 1 random GPT-2 token ids."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, GPT2_VOCAB, (FINETUNE_BATCH, FINETUNE_BLOCK + 1)).astype(np.int32)
            for _ in range(n)]


def child_tinygrad_finetune(folder: Path, steps: int) -> dict:
    """tasks.Text's step on GPT-2 124M: loaded as --init loads it, the step train.train runs."""
    from tinygrad import Context, Tensor

    import train
    from gpt import load_gpt2

    t_start = time.perf_counter()
    model = load_gpt2(weights=folder / "model.safetensors")
    opt = train.make_optimizer(model, FINETUNE_LR, 0.1, (0.9, 0.95))
    step_fn = train.make_train_step(model, opt)
    times, losses = [], []
    with Context(TRAINING=1):
        for batch in finetune_batches(TRAIN_WARMUP + steps):
            t0 = time.perf_counter()
            loss, _ = step_fn(Tensor(batch[:, :-1]), Tensor(batch[:, 1:]), Tensor([FINETUNE_LR]))
            losses.append(loss.item())
            times.append(time.perf_counter() - t0)
            if len(times) == 1:
                first_step_s = time.perf_counter() - t_start
    return train_summary(times, losses, first_step_s) | {"rss_mb": peak_rss_mb(),
                                                         **tinygrad_info()}


def child_torch_finetune(folder: Path, steps: int) -> dict:
    torch, transformers = torch_setup()
    t_start = time.perf_counter()
    model = transformers.GPT2LMHeadModel.from_pretrained(
        folder, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).train()
    batches = ((b[:, :-1], b[:, 1:]) for b in finetune_batches(TRAIN_WARMUP + steps))
    return torch_training(torch, model, batches, FINETUNE_LR, 0.1, (0.9, 0.95), t_start)


def kernel_profile(step_fn, x, y, lr: float) -> dict:
    """Run the step once more without TinyJit and with DEBUG=2, which makes tinygrad wait for each
    kernel and print its name, time, GFLOP/s and GB/s. A matmul here is runtime.cpu_matmul's
    kernel, or a reduce kernel, of at least 1 MFLOP that does at least 2 flops per byte it moves:
    a LayerNorm's or a softmax's sums do about 0.25, a matmul of these shapes 10 to 50."""
    import contextlib
    import io
    import re

    from tinygrad import Context, Tensor

    out = io.StringIO()
    with Context(DEBUG=2), contextlib.redirect_stdout(out):
        step_fn.fxn(Tensor(x), Tensor(y), Tensor([lr]))
    line = re.compile(r"\*\*\*\s+\S+\s+\d+\s+(\S+)\s.*?tm\s+([\d.]+)(us|ms)/.*?"
                      r"\(\s*(\d+) GFLOPS\s+(\d+)\|")
    kernels = []
    for text in re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue()).splitlines():
        if (m := line.search(text)) and not m.group(1).startswith("copy"):
            ms = float(m.group(2)) / (1000 if m.group(3) == "us" else 1)
            kernels.append({"name": m.group(1), "ms": ms, "gflops": int(m.group(4)),
                            "gb_s": int(m.group(5))})
    # GB/s is printed rounded; the gradient norm, one sum over every parameter, is a reduce with
    # an axis per buffer in its name and no matmul; runtime.cpu_matmul's kernels are "matmul_"
    matmuls = [k for k in kernels if k["name"].startswith(("r_", "matmul_"))
               and k["gflops"] * k["ms"] >= 1
               and k["gflops"] >= 2 * max(k["gb_s"], 0.5) and k["name"].count("_") <= 8]
    slowest = min(matmuls, key=lambda k: k["gflops"], default=None)
    fastest = max(matmuls, key=lambda k: k["gflops"], default=None)
    return {"kernel_ms_sum": sum(k["ms"] for k in kernels),
            "matmul_ms_sum": sum(k["ms"] for k in matmuls),
            "matmul_gflops_min": slowest and slowest["gflops"],
            "matmul_gflops_max": fastest and fastest["gflops"],
            "matmul_slowest": slowest and slowest["name"],
            "profile": sorted(kernels, key=lambda k: -k["ms"])[:12]}


def train_summary(times: list[float], losses: list[float], first_step_s: float) -> dict:
    timed = times[TRAIN_WARMUP:]
    return {"train_ms": 1e3 * statistics.median(timed),
            "train_ms_mean": 1e3 * statistics.mean(timed),
            "train_ms_stdev": 1e3 * statistics.stdev(timed), "steps": len(timed),
            # from building the model to the first finished step: what a learner waits for
            "first_step_s": first_step_s,
            "jit_warmup_s": times[1] + times[2],  # TinyJit's plain run and its capture
            "first_loss": losses[0], "last_loss": losses[-1]}


def torch_setup():
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    return torch, transformers


def child_torch_probe() -> dict:
    torch, transformers = torch_setup()
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads()}


def child_torch_decode(folder: Path, tokens: int, bf16: bool) -> dict:
    torch, transformers = torch_setup()
    reads = ReadsBeside()  # before the clock starts: writing its 2 GiB takes seconds
    t_start = time.perf_counter()
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    if bf16:
        model = model.to(torch.bfloat16)
    t_loaded = time.perf_counter()
    ids = random_ids(PROMPT_TOKENS, GPT2_VOCAB, seed=0)
    def decode(ids, tokens: int):
        with torch.no_grad():
            # logits_to_keep=1: only the last position's logits, as tinygrad's [:, -1] asks for
            out = model(input_ids=torch.from_numpy(ids).long(), use_cache=True, logits_to_keep=1)
            for i in range(tokens):
                tok = out.logits[:, -1].argmax(-1)  # greedy, as generate(temperature=0.0)
                yield tok
                if i + 1 < tokens:
                    out = model(input_ids=tok[:, None], past_key_values=out.past_key_values,
                                use_cache=True)

    with reads:
        stamps, beside = timed_tokens(decode(ids, tokens), reads)
        contexts = context_speeds(lambda ids: decode(ids, CONTEXT_TOKENS), reads)
    n_params = sum(p.numel() for p in model.parameters())  # the tied wte is counted once
    return {**decode_summary(stamps, t_start, t_loaded), **contexts, "n_params": n_params,
            "rss_mb": peak_rss_mb(), "attn": model.config._attn_implementation, **beside}


def child_torch_prefill(folder: Path, bf16: bool = False) -> dict:
    torch, transformers = torch_setup()
    model = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    if bf16:
        model = model.to(torch.bfloat16)
    first, second = (torch.from_numpy(random_ids(PREFILL_TOKENS, GPT2_VOCAB, seed=s)).long()
                     for s in (1, 2))
    with torch.no_grad():
        t0 = time.perf_counter()
        model(input_ids=first, use_cache=True, logits_to_keep=1).logits.float().numpy()
        t1 = time.perf_counter()
        model(input_ids=second, use_cache=True, logits_to_keep=1).logits.float().numpy()
        seconds = time.perf_counter() - t1
    return {"prefill_tok_s": PREFILL_TOKENS / seconds, "prefill_s": seconds,
            "prefill_first_s": t1 - t0, "rss_mb": peak_rss_mb()}


def child_torch_train(workload: str, steps: int) -> dict:
    torch, transformers = torch_setup()
    w = TRAIN_WORKLOADS[workload]
    t_start = time.perf_counter()
    config = transformers.GPT2Config(vocab_size=w["vocab"], n_positions=w["n_ctx"],
                                     n_layer=w["n_layer"], n_head=w["n_head"], n_embd=w["n_embd"],
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).train()
    batches = train_batches(workload, TRAIN_WARMUP + steps, -100)
    return torch_training(torch, model, batches, w["lr"], w["wd"], (0.9, 0.99), t_start)


def torch_training(torch, model, batches, lr: float, wd: float, betas, t_start: float) -> dict:
    """PyTorch's side of a training row: AdamW with train.make_optimizer's split (decay the
    matrices and embeddings, not the rest), clip 1.0, a step per (x, y) batch (targets of -100
    carry no loss); times from t_start, when the model began to be built."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": wd},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas)
    times, losses = [], []
    for x, y in batches:
        t0 = time.perf_counter()
        x, y = torch.from_numpy(x).long(), torch.from_numpy(y).long()
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
        if len(times) == 1:
            first_step_s = time.perf_counter() - t_start
    return train_summary(times, losses, first_step_s) | {"rss_mb": peak_rss_mb()}


class ReadBandwidth:
    """Streaming read bandwidth: sum a 1 GiB float32 array, far larger than any cache. One thread
    rarely saturates memory, so the array is also summed in one slice per core; NumPy releases the
    GIL inside the reduction, so the threads run in parallel. In two memories: NumPy's own (small
    pages, unless the system gives every mapping huge ones) and one that asks for huge pages
    (MADV_HUGEPAGE), as the weights' memory does (runtime.host_memory). Both are made once, so a
    decode child can read them again between its tokens."""

    def __init__(self):
        import mmap

        self.cores = os.cpu_count() or 1
        n = 2**28
        self.arrays = {"": np.ones(n, dtype=np.float32)}  # np.ones writes every page
        if hasattr(mmap, "MADV_HUGEPAGE"):
            memory = mmap.mmap(-1, 4 * n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            memory.madvise(mmap.MADV_HUGEPAGE)
            self.arrays["huge_"] = np.frombuffer(memory, np.float32)
            self.arrays["huge_"].fill(1)
        self.pool = ThreadPoolExecutor(self.cores)

    def speeds(self, repeats: int) -> dict:
        """GB/s of each way, the best of repeats: {single_gb_s, threaded_gb_s, huge_...}."""
        out = {}
        for prefix, a in self.arrays.items():
            threaded = partial(lambda parts: sum(self.pool.map(np.sum, parts)),
                               np.array_split(a, self.cores))
            for way, fn in (("threaded", threaded), ("single", a.sum)):
                seconds = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    fn()
                    seconds.append(time.perf_counter() - t0)
                out[f"{prefix}{way}_gb_s"] = a.nbytes / min(seconds) / 1e9
        return out

    def __call__(self, repeats: int = 3) -> float:
        """The bound's bandwidth now: the fastest way."""
        return max(self.speeds(repeats).values())


def child_bandwidth(repeats: int) -> dict:
    """The bandwidth group: every way of ReadBandwidth, and the fastest (the bound's)."""
    reads = ReadBandwidth()
    speeds = reads.speeds(repeats)
    return {**speeds, "gb_s": max(speeds.values()), "threads": reads.cores}


class ReadsBeside:
    """ReadBandwidth in a process of its own (bench.py --child reads), so that its 2 GiB stay out
    of a decode child's memory and peak RSS: each call asks it for one reading and waits."""

    def __init__(self):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "reads"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        self.proc.stdout.readline()  # "ready": its memory is written

    def __call__(self) -> float:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.stdin.close()
        self.proc.stdout.read()
        self.proc.wait()


def child_reads() -> dict:
    """ReadsBeside's process: a reading for each line on stdin, until it closes."""
    reads = ReadBandwidth()
    print("ready", flush=True)
    for _ in sys.stdin:
        print(reads(), flush=True)
    return {}


def timed_tokens(tokens, reads, clock=time.perf_counter) -> tuple[list[float], dict]:
    """Stamps of each token as it comes out of the generator tokens, and the memory's read
    bandwidth between them: this machine's bandwidth moves by half from one minute to the next,
    so each stretch of SEGMENT tokens from STEADY_FROM on is set against reads on either side of
    it, taken while the generator waits. The reads' time is left out of the later stamps.
    -> stamps, {"segments": [[tok/s, GB/s of the faster read beside it], ...],
    "bound_gb_s": the reads' median}"""
    stamps, gb_s, segments = [], [], []
    paused = 0.0  # seconds spent reading, taken off the stamps after them
    start = None
    for i, _ in enumerate(tokens):
        stamps.append(clock() - paused)
        if i + 1 < STEADY_FROM or (i + 1 - STEADY_FROM) % SEGMENT:
            continue
        t0 = clock()
        gb_s.append(reads())
        paused += clock() - t0
        if start is not None:
            segments.append([SEGMENT / (stamps[-1] - stamps[start]), max(gb_s[-2:])])
        start = i
    return stamps, {"segments": segments, "bound_gb_s": statistics.median(gb_s) if gb_s else None}


def run_child(name: str, folder: Path, tokens: int, quick: bool) -> dict:
    """Dispatch on the child's name: MODE-WHAT[-PRECISION]. folder holds the GPT-2 checkpoint."""
    if name.startswith("tinygrad"):
        import runtime

        runtime.install()  # DEV if set, else the project's default backend
    steps = QUICK_TRAIN_STEPS if quick else TRAIN_STEPS
    children = {
        "tinygrad-decode": lambda: child_tinygrad_decode(folder, tokens, half=False),
        "tinygrad-decode-half": lambda: child_tinygrad_decode(folder, tokens, half=True),
        "tinygrad-decode-beam": lambda: child_tinygrad_decode(folder, tokens, False, BENCH_BEAM),
        "tinygrad-decode-half-beam": lambda: child_tinygrad_decode(folder, tokens, True,
                                                                   BENCH_BEAM),
        "tinygrad-prefill": lambda: child_tinygrad_prefill(folder, half=False),
        "tinygrad-prefill-half": lambda: child_tinygrad_prefill(folder, half=True),
        "tinygrad-peer": lambda: child_tinygrad_peer(folder, half=False),
        "tinygrad-peer-half": lambda: child_tinygrad_peer(folder, half=True),
        "torch-prefill-bf16": lambda: child_torch_prefill(folder, bf16=True),
        "tinygrad-perplexity": lambda: child_tinygrad_perplexity(folder),
        "tinygrad-serve": lambda: child_tinygrad_serve(folder),
        "torch-perplexity": lambda: child_torch_perplexity(folder),
        "torch-attention": lambda: child_torch_attention(folder),
        "tinygrad-patching": lambda: child_tinygrad_patching(folder),
        "torch-patching": lambda: child_torch_patching(folder),
        "torch-probe": child_torch_probe,
        "torch-decode": lambda: child_torch_decode(folder, tokens, bf16=False),
        "torch-decode-bf16": lambda: child_torch_decode(folder, tokens, bf16=True),
        "torch-prefill": lambda: child_torch_prefill(folder),
        "bandwidth": lambda: child_bandwidth(3 if quick else 5),
        "reads": child_reads,
    }
    tune_steps = QUICK_FINETUNE_STEPS if quick else FINETUNE_STEPS
    for child in ("tinygrad-finetune", "tinygrad-finetune-cold"):
        children[child] = lambda: child_tinygrad_finetune(Path(folder), tune_steps)
    children["torch-finetune"] = lambda: child_torch_finetune(Path(folder), tune_steps)
    for workload in TRAIN_WORKLOADS:
        children[f"tinygrad-train-{workload}"] = lambda w=workload: child_tinygrad_train(w, steps)
        children[f"torch-train-{workload}"] = lambda w=workload: child_torch_train(w, steps)
    return children[name]()


# ---------------------------------------------------------------------------------------------
# Parent: start the children, collect their lines, print the table
# ---------------------------------------------------------------------------------------------


def spawn(name: str, args, env: dict) -> dict:
    """Run one child and return its result, or {"error": one line} if it failed."""
    python = args.torch_python if name.startswith("torch") and args.torch_python else sys.executable
    cmd = [str(python), str(Path(__file__).resolve()), "--child", name, "--tokens",
           str(args.tokens), "--checkpoint", str(args.checkpoint)] + (
               ["--quick"] if args.quick else [])
    print(f"  {name} ...", end="", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT_S, cwd=Path(__file__).parent)
    except subprocess.TimeoutExpired:
        print(" timed out", file=sys.stderr)
        return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
    print(f" {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        print(f"  {name} failed: {why}", file=sys.stderr)
        return {"error": why}
    return json.loads(lines[-1])


# A whole Hugging Face process for `gpt.py -p PROMPT -n N -t 0`: load, then greedy generate
HF_GENERATE = """
import sys, tiktoken, torch, transformers
enc = tiktoken.get_encoding("r50k_base")
model = transformers.GPT2LMHeadModel.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor([enc.encode(sys.argv[2])])
n = int(sys.argv[3])
out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                     min_new_tokens=n, pad_token_id=50256)
print(sys.argv[2] + enc.decode(out[0, ids.shape[1]:].tolist()))
"""


def wall(cmd: list[str], env: dict) -> tuple[float, str]:
    """Wall seconds of one whole process, and its stderr; raises ChildFailed if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                          cwd=Path(__file__).parent)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise ChildFailed(f"{' '.join(cmd[1:3])} failed: {why}")
    return seconds, proc.stderr


def time_lab(env: dict, args) -> dict:
    """Issue 20's commands as a user runs them: whole processes, warm page and kernel caches."""
    import re

    ckpt = Path(args.checkpoint)
    gpt_py = [sys.executable, str(Path(__file__).with_name("gpt.py")), "--weights",
              str(ckpt / "model.safetensors")]
    env = {"TIKTOKEN_CACHE_DIR": str(SHAKESPEARE.parents[1] / "tiktoken"), **env}
    result = {}
    with tempfile.TemporaryDirectory(prefix="bench-lab-") as tmp:
        att = gpt_py + ["--out", f"{tmp}/att", "--attention"]
        print("  lab: --attention ...", end="", file=sys.stderr, flush=True)
        # The first run on a checkpoint measures the induction probe and keeps its scores, and
        # the first text of a bucket length may generate that bucket's kernels: one run of each
        # text, then the timed ones
        first = [wall(att + [text], env)[0] for text in LAB_TEXTS]
        result["attention_first_s"], result["attention_first_each_s"] = first[0], first
        each = [wall(att + [text], env)[0] for text in LAB_TEXTS]
        result["attention_s"], result["attention_s_max"] = each, max(each)
        print(f" {' '.join(f'{x:.1f}' for x in each)} s", file=sys.stderr)
        gen = gpt_py + ["-p", LAB_PROMPT, "-n", str(LAB_NEW_TOKENS), "-t", "0", "--ignore-eos",
                        "--timing"]
        wall(gen, env)  # a new bucket's kernels are generated once, then kept
        result["generate_s"], err = wall(gen, env)
        for key, pattern in (("gen_prefill_s", r"in ([0-9.]+)s \(the first"),
                             ("gen_warmup_s", r"warm-up: \d+ steps? in ([0-9.]+)s"),
                             ("gen_decode_tok_s", r"\(([0-9.]+) tok/s\)")):
            found = re.search(pattern, err)
            result[key] = float(found.group(1)) if found else None
        # issue 34: decoding in whole processes, `-n 144` minus `-n 16`, against Hugging Face's
        # generate the same way; rounds interleaved, each process's fastest of them
        runs = {f"{n}": gpt_py + ["-p", LAB_PROMPT, "-n", str(n), "-t", "0", "--ignore-eos"]
                for n in PROCESS_TOKENS}
        if args.torch_python or getattr(args, "torch_ok", False):
            python = str(args.torch_python or sys.executable)
            runs |= {f"hf{n}": [python, "-c", HF_GENERATE, str(ckpt), LAB_PROMPT, str(n)]
                     for n in PROCESS_TOKENS}
        walls = {key: [] for key in runs}
        for _ in range(PROCESS_ROUNDS):
            for key, cmd in runs.items():
                walls[key].append(wall(cmd, env)[0])
        short, long = PROCESS_TOKENS
        for prefix, field in (("", "process_decode_tok_s"), ("hf", "hf_process_decode_tok_s")):
            if f"{prefix}{long}" in walls:
                spent = min(walls[f"{prefix}{long}"]) - min(walls[f"{prefix}{short}"])
                result[field] = (long - short) / spent
        text = Path(tmp) / "text.txt"
        text.write_text(Path(os.environ.get("TEXT", SHAKESPEARE)).read_text()[:PPL_CHARS])
        ppl = gpt_py + ["--perplexity", str(text), "--stride", str(PPL_STRIDE)]
        result["perplexity_process_s"] = wall(ppl, env)[0]
        if args.torch_python or getattr(args, "torch_ok", False):
            python = str(args.torch_python or sys.executable)
            hf = [python, "-c", HF_GENERATE, str(ckpt), LAB_PROMPT, str(LAB_NEW_TOKENS)]
            wall(hf, env)
            result["hf_generate_s"] = wall(hf, env)[0]
            child = [python, str(Path(__file__).resolve()), "--child", "torch-perplexity",
                     "--checkpoint", str(ckpt)]
            result["hf_perplexity_process_s"] = wall(child, env)[0]
    print(f"  lab: generate {result['generate_s']:.1f} s, perplexity "
          f"{result['perplexity_process_s']:.1f} s", file=sys.stderr)
    return result


def gpt2_tokenizer_files(folder: Path):
    """vocab.json and merges.txt of GPT-2's byte-level BPE beside a checkpoint (llama.cpp's
    converter reads them; bench's random checkpoint has none), from tiktoken's r50k_base ranks:
    each token of two or more bytes is the merge of the two parts that byte-pair encoding with
    only the earlier ranks leaves of it. flags.UserError where tiktoken has not got them."""
    from gpt import tokenizer

    enc = tokenizer()
    ranks = enc._mergeable_ranks  # bytes -> rank: GPT-2's ids, <|endoftext|> aside
    # GPT-2's printable stand-in for each byte (Radford et al.'s encoder.py, bytes_to_unicode)
    shown = [*range(33, 127), *range(161, 173), *range(174, 256)]
    stand_in = {b: chr(b) for b in shown}
    stand_in |= {b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in shown)}

    def text(token: bytes) -> str:
        return "".join(stand_in[b] for b in token)

    def parts(token: bytes, below: int) -> list[bytes]:
        pieces = [bytes([b]) for b in token]
        while len(pieces) > 1:
            pairs = [(ranks.get(a + b, below), i) for i, (a, b) in enumerate(zip(pieces,
                                                                                 pieces[1:]))]
            rank, i = min(pairs)
            if rank >= below:
                break
            pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
        return pieces

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = parts(token, rank)  # exactly two: the merge that made this token
            merges.append(f"{text(left)} {text(right)}")
    vocab = {text(token): rank for token, rank in ranks.items()} | {"<|endoftext|>": enc.eot_token}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def time_llama(folder: Path, args, env: dict) -> dict:
    """llama.cpp on the same checkpoint (issue 34): converted to GGUF in float32 and float16 by
    its converter (convert_hf_to_gguf.py in --llama-cpp's folder, run by --torch-python's
    interpreter, which needs the gguf package), then its llama-bench on all cores, decode (64
    tokens, tg64) and a 512-token prefill (pp512), in LLAMA_ROUNDS rounds that alternate with
    our child_tinygrad_peer: the median of each, both sides."""
    root = Path(args.llama_cpp)
    converter = root / "convert_hf_to_gguf.py"
    found = [p for p in (root / "build" / "bin" / "llama-bench", root / "llama-bench") if
             p.exists()] + [Path(p) for p in [shutil.which("llama-bench")] if p]
    if not converter.exists() or not found:
        return {"error": f"no convert_hf_to_gguf.py and build/bin/llama-bench in {root}"}
    try:
        gpt2_tokenizer_files(folder)
    except flags.UserError as e:  # offline without TIKTOKEN_CACHE_DIR: this row's error
        return {"error": str(e)}
    python = str(args.torch_python or sys.executable)
    models = {}
    for kind in ("f32", "f16"):
        models[kind] = folder / f"gpt2-{kind}.gguf"
        made = subprocess.run([python, str(converter), str(folder), "--outtype", kind,
                               "--outfile", str(models[kind])], capture_output=True, text=True)
        if made.returncode != 0:
            return {"error": f"converting to {kind}: " + made.stderr.strip().splitlines()[-1]}
    threads = str(os.cpu_count() or 1)
    runs = {side: {field: {kind: [] for kind in models} for field in ("decode_tok_s",
                                                                      "prefill_tok_s")}
            for side in ("llama.cpp", "tinygrad")}
    for _ in range(LLAMA_ROUNDS):
        for kind, model in models.items():
            print(f"  llama.cpp {kind} ...", file=sys.stderr)
            cmd = [str(found[0]), "-m", str(model), "-p", str(PREFILL_TOKENS), "-n",
                   str(LLAMA_GEN_TOKENS), "-t", threads, "-r", "1", "-o", "json"]
            ran = subprocess.run(cmd + ["-lm", LLAMA_LOAD_MODES], capture_output=True, text=True)
            if ran.returncode != 0:  # a llama.cpp from before --load-mode: its default alone
                ran = subprocess.run(cmd, capture_output=True, text=True)
            if ran.returncode != 0:
                return {"error": f"llama-bench {kind}: " + ran.stderr.strip()[-300:]}
            best = {}  # per test, the faster way of loading
            for test in json.loads(ran.stdout):
                field = "decode_tok_s" if test["n_gen"] else "prefill_tok_s"
                best[field] = max(best.get(field, 0.0), test["avg_ts"])
            ours = spawn("tinygrad-peer" + ("-half" if kind == "f16" else ""), args, env)
            if "error" in ours:
                return ours
            for field, value in best.items():
                runs["llama.cpp"][field][kind].append(value)
                runs["tinygrad"][field][kind].append(ours[field])
    ours = runs["tinygrad"]
    return {**{side: {field: {kind: statistics.median(v) for kind, v in kinds.items()}
                      for field, kinds in fields.items()} for side, fields in runs.items()},
            # f32 and f16 run side by side in each round: their ratio, as the machine was then
            "tinygrad_f16_over_f32": {
                field: statistics.median(b / a for a, b in zip(kinds["f32"], kinds["f16"]))
                for field, kinds in ours.items()}}


def time_demo(env: dict) -> dict:
    """Wall seconds of `python transformer.py -v`, cold then warm, on caches of its own."""
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        env = env | {"CACHEDB": f"{tmp}/cache.db", "POCL_CACHE_DIR": f"{tmp}/pocl"}
        cmd = [sys.executable, str(Path(__file__).with_name("transformer.py")), "-v", "--out",
               f"{tmp}/reverse"]
        result = {}
        for key in ("cold_s", "warm_s"):
            print(f"  demo, {key[:4]} cache ...", end="", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=CHILD_TIMEOUT_S)
            result[key] = time.perf_counter() - t0
            print(f" {result[key]:.0f} s", file=sys.stderr)
            if proc.returncode != 0:
                why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
                return {"error": f"transformer.py -v failed: {why}"}
            result["stderr_lines"] = len(proc.stderr.splitlines())  # compiler noise shows here
        return result


def plan(groups: set[str], torch_ok: bool) -> list[str]:
    names = []
    wanted = {
        "decode": ["tinygrad-decode", "torch-decode"],
        "half": ["tinygrad-decode-half", "torch-decode-bf16", "tinygrad-prefill-half",
                 "torch-prefill-bf16"],
        "beam": ["tinygrad-decode-beam", "torch-decode", "tinygrad-decode-half-beam",
                 "torch-decode-bf16"],
        "prefill": ["tinygrad-prefill", "torch-prefill"],
        "lab": ["tinygrad-perplexity", "torch-perplexity", "torch-attention",
                "tinygrad-patching", "torch-patching"],
        "serve": ["tinygrad-serve", "torch-attention"],
        "train": [f"{lib}-train-{w}" for w in TRAIN_WORKLOADS for lib in ("tinygrad", "torch")],
        # cold first: its empty kernel cache (bench's env_for) is what the warm one then reads
        "finetune": ["tinygrad-finetune-cold", "tinygrad-finetune", "torch-finetune"],
        "demo": [],
        "bandwidth": ["bandwidth"],
    }
    for group in GROUPS:
        if group in groups:
            names += [n for n in wanted[group]
                      if (torch_ok or not n.startswith("torch")) and n not in names]
    return names


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def get(results: dict, name: str, key: str):
    return results.get(name, {}).get(key)


def ratio_cell(tg, pt, target: tuple[str, float] | None) -> tuple[str, str]:
    """Ratio tinygrad / PyTorch, and the target with a mark for met or missed."""
    if tg is None or pt is None or pt == 0:
        return "", f"{target[0]} {target[1]:.2f}x" if target else ""
    r = tg / pt
    if target is None:
        return f"{r:.2f}x", ""
    sign, goal = target
    met = r >= goal if sign == ">=" else r <= goal
    return f"{r:.2f}x", f"{sign} {goal:.2f}x {'met' if met else 'missed'}"


def fmt(value, digits: int) -> str:
    return "" if value is None else f"{value:,.{digits}f}"


def gpt2_params(vocab=GPT2_VOCAB, n_ctx=1024, n_layer=12, n_embd=768) -> int:
    """GPT-2 124M's parameter count, 124,439,808: token and position embeddings (the output layer
    reuses the token embedding, so it is counted once), per block two LayerNorms (2 * 2C), c_attn
    (C x 3C + 3C), attn.c_proj (C x C + C), c_fc (C x 4C + 4C), mlp.c_proj (4C x C + C), and ln_f.
    Counted from the model, not from an implementation, which may pad the vocabulary."""
    C = n_embd
    per_block = 4 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    return vocab * C + n_ctx * C + n_layer * per_block + 2 * C


def bound_percent(results: dict, name: str, bytes_per_param: int,
                  context: int | None = None) -> float | None:
    """Decode speed as % of what memory bandwidth allows when each token reads every weight once
    (of the position embeddings, its own row): bound = bandwidth / bytes per token. The child's
    own stretches (timed_tokens), or with context its rounds at that length (context_speeds),
    each set against the reads beside it: their median. Else its speed against its reads'
    median, or the bandwidth group's."""
    per_token = gpt2_params(n_ctx=1) * bytes_per_param  # a token reads one position's row
    if context is None:
        pairs = get(results, name, "segments") or []
    else:
        pairs = list(zip((get(results, name, "context_rounds") or {}).get(str(context), []),
                         get(results, name, "context_gb_s") or []))
    if pairs:
        return statistics.median(100 * speed / (gb_s * 1e9 / per_token) for speed, gb_s in pairs)
    gb_s = get(results, name, "bound_gb_s") or get(results, "bandwidth", "gb_s")
    tok_s = (get(results, name, "decode_tok_s") if context is None
             else (get(results, name, "context_tok_s") or {}).get(str(context)))
    if gb_s is None or tok_s is None:
        return None
    return 100 * tok_s / (gb_s * 1e9 / per_token)


def table_rows(results: dict) -> list[list[str]]:
    r = results
    rows = []

    def add(label, key, tg_name, pt_name, field, digits):
        tg, pt = get(r, tg_name, field), get(r, pt_name, field)
        if tg is None and pt is None:
            return
        ratio, target = ratio_cell(tg, pt, TARGETS.get(key))
        rows.append([label, fmt(tg, digits), fmt(pt, digits), ratio, target])

    add("decode tok/s, fp32", "decode", "tinygrad-decode", "torch-decode", "decode_tok_s", 1)
    add("decode tok/s, 16-bit (fp16 / torch bf16)", "decode16", "tinygrad-decode-half",
        "torch-decode-bf16", "decode_tok_s", 1)
    tg, fp32 = (get(r, name, "decode_tok_s") for name in ("tinygrad-decode-half",
                                                          "tinygrad-decode"))
    if tg is not None and fp32 is not None:  # issue 34: --half 1.7x fp32 (llama.cpp: 1.8x)
        rows.append(["  against tinygrad's fp32 decode (two children, minutes apart)",
                     fmt(tg / fp32, 2), "", "", ""])
        # the machine's bandwidth may differ by half between the two children: at the same
        # bandwidth, the ratio of their speeds is that of their shares of the bound, twice
        half_share, fp32_share = (bound_percent(r, name, width) for name, width in (
            ("tinygrad-decode-half", 2), ("tinygrad-decode", 4)))
        if half_share is not None and fp32_share is not None:
            same = 2 * half_share / fp32_share
            rows.append(["  the same at the same read bandwidth (2 x its share of the bound / "
                         "fp32's)", fmt(same, 2), "", "", ">= 1.70 " + (
                             "met" if same >= 1.7 else "missed")])
    add(f"decode tok/s, fp32, --beam {BENCH_BEAM} (cached search)", "decode",
        "tinygrad-decode-beam", "torch-decode", "decode_tok_s", 1)
    add(f"decode tok/s, 16-bit, --beam {BENCH_BEAM} (cached search)", "decode16",
        "tinygrad-decode-half-beam", "torch-decode-bf16", "decode_tok_s", 1)
    add(f"decode tok/s, 16-bit, --beam {BENCH_BEAM}, against PyTorch fp32", "decode16",
        "tinygrad-decode-half-beam", "torch-decode", "decode_tok_s", 1)
    for name, peer, label, width in (("tinygrad-decode", "torch-decode", "fp32", 4),
                                     ("tinygrad-decode-beam", "torch-decode",
                                      f"fp32 --beam {BENCH_BEAM}", 4),
                                     ("tinygrad-decode-half", "torch-decode-bf16", "16-bit", 2),
                                     ("tinygrad-decode-half-beam", "torch-decode-bf16",
                                      f"16-bit --beam {BENCH_BEAM}", 2)):
        tg, pt = bound_percent(r, name, width), bound_percent(r, peer, width)
        if tg is not None or pt is not None:
            ratio, _ = ratio_cell(tg, pt, None)
            target = "" if tg is None or width != 4 else f">= {BOUND_TARGET:.0f}% " + (
                "met" if tg >= BOUND_TARGET else "missed")  # 16-bit's: 1.7x fp32's speed
            rows.append([f"decode % of bandwidth bound, {label}", fmt(tg, 1), fmt(pt, 1), ratio,
                         target])
            if get(r, name, "bound_gb_s") is not None:
                rows.append(["  the reads beside it GB/s, their median (the bound: tok/s = GB/s "
                             f"/ GB per token; its %: the median of {SEGMENT}-token stretches')",
                             fmt(get(r, name, "bound_gb_s"), 1),
                             fmt(get(r, peer, "bound_gb_s"), 1), "", ""])
    for name, peer, label, width in (("tinygrad-decode", "torch-decode", "fp32", 4),
                                     ("tinygrad-decode-half", "torch-decode-bf16", "16-bit", 2)):
        tg, pt = get(r, name, "context_tok_s") or {}, get(r, peer, "context_tok_s") or {}
        if not tg and not pt:
            continue
        for n in CONTEXTS:
            speed, peer_speed = tg.get(str(n)), pt.get(str(n))
            share = bound_percent(r, name, width, n) if speed is not None else None
            cell = fmt(speed, 1) + ("" if share is None else f" ({share:.0f} % of the bound)")
            rows.append([f"decode tok/s at {n} tokens of context, {label}", cell,
                         fmt(peer_speed, 1), ratio_cell(speed, peer_speed, None)[0], ""])
        first, last = str(CONTEXTS[0]), str(CONTEXTS[-1])
        held, peer_held = get(r, name, "context_held"), get(r, peer, "context_held")
        if held is not None:
            rows.append([f"  at {last} against at {first} tokens, {label} (the median of "
                         f"{CONTEXT_ROUNDS} rounds' ratios)", fmt(held, 2),
                         fmt(peer_held, 2), "", ">= 0.90 " + ("met" if held >= 0.9 else "missed")])
    add(f"prefill tok/s, {PREFILL_TOKENS} tokens, fp32 (a second prompt of the bucket)",
        "prefill", "tinygrad-prefill", "torch-prefill", "prefill_tok_s", 1)
    add("  the first prompt of a process s (tinygrad: traced; kernels from disk)", None,
        "tinygrad-prefill", "torch-prefill", "prefill_first_s", 2)
    add(f"prefill tok/s, {PREFILL_TOKENS} tokens, 16-bit (fp16 / torch bf16)", None,
        "tinygrad-prefill-half", "torch-prefill-bf16", "prefill_tok_s", 1)
    tg, fp32 = (get(r, name, "prefill_tok_s") for name in ("tinygrad-prefill-half",
                                                           "tinygrad-prefill"))
    if tg is not None and fp32 is not None:  # issue 34: --half's prefill as fast as fp32's
        rows.append(["  against tinygrad's fp32 prefill (two children, minutes apart)",
                     fmt(tg / fp32, 2), "", "", ">= 1.00 " + ("met" if tg >= fp32 else "missed")])
    llama = r.get("llama.cpp", {})
    for field, label in (("decode_tok_s", f"decode {LLAMA_GEN_TOKENS} tokens"),
                         ("prefill_tok_s", f"prefill {PREFILL_TOKENS}")):
        for kind in ("f32", "f16"):  # issue 34: llama.cpp's speed or better
            theirs = llama.get("llama.cpp", {}).get(field, {}).get(kind)
            if theirs is not None:
                tg = llama["tinygrad"][field][kind]
                ratio, target = ratio_cell(tg, theirs, (">=", 1.0))
                rows.append([f"{label} tok/s, {kind}, against llama.cpp (in the PyTorch column; "
                             f"median of {LLAMA_ROUNDS} rounds, in turn)", fmt(tg, 1),
                             fmt(theirs, 1), ratio, target])
        ours = llama.get("tinygrad_f16_over_f32", {}).get(field)
        if ours is not None:  # issue 34: --half 1.7x fp32's decode, its prefill as fast
            least = 1.7 if field == "decode_tok_s" else 1.0
            rows.append(["  ours, f16 against f32 in the same rounds (each round's, the median)",
                         fmt(ours, 2), "", "", f">= {least:.2f} " + (
                             "met" if ours >= least else "missed")])
    lab = r.get("lab", {})

    def absolute(label, value, peer, limit, digits=1):
        """A row whose goal is a number of seconds, not a ratio."""
        if value is None:
            return
        rows.append([label, fmt(value, digits), fmt(peer, digits), "",
                     f"<= {limit} s " + ("met" if value <= limit else "missed")])

    absolute("`gpt.py --attention` wall s, 14-45 tokens, slowest of 4", lab.get("attention_s_max"),
             get(r, "torch-attention", "attention_s_max"), 5)
    absolute("  the first run on a new checkpoint (measures the induction probe)",
             lab.get("attention_first_s"), get(r, "torch-attention", "probe_s"), 5)
    serving = r.get("tinygrad-serve", {})
    absolute("workbench /api/run wall s, 14-45 tokens, slowest of 4 (peer: a forward with "
             "output_attentions)", serving.get("run_s_max"),
             get(r, "torch-attention", "attention_s_max"), 1.0, 2)
    absolute("workbench /api/ablate wall s, two heads, slowest of 4", serving.get("ablate_s_max"),
             None, 0.5, 2)
    absolute("  on 40-token texts no /api/run read first (the lens read whole; median of 3)",
             serving.get("unseen_s"), None, 0.5, 2)
    absolute("  without the maps and the lens (\"views\": false: the page's scan)",
             serving.get("bare_s_max"), None, 0.5, 2)
    absolute(f"workbench 20-token resid_pre grid s, to the last of its "
             f"{serving.get('grid_lines')} progress lines (after a first scan)",
             serving.get("grid_s"), None, 10)
    if serving.get("patch_s") is not None:
        rows.append(["  the whole answer s (attribution and DLA too) / the first scan s",
                     f"{fmt(serving.get('grid_all_s'), 1)} / {fmt(serving.get('grid_first_s'), 1)}",
                     "", "", ""])
        rows.append(["  /api/patch s (15 tokens: every grid, attribution, DLA)",
                     fmt(serving["patch_s"], 1), "", "", ""])
        rows.append(["  start s (load + warm) / first /api/run of each text s",
                     f"{fmt(serving.get('start_s'), 1)} / "
                     f"{' '.join(fmt(x, 1) for x in serving.get('run_first_s', []))}",
                     "", "", ""])
    absolute("loading GPT-2 124M s (warm page cache)", get(r, "tinygrad-perplexity", "load_s"),
             get(r, "torch-perplexity", "load_s"), 1.5, 2)
    add(f"--perplexity tok/s after loading ({PPL_CHARS:,} chars, stride {PPL_STRIDE})",
        "perplexity", "tinygrad-perplexity", "torch-perplexity", "ppl_tok_s", 1)
    add("  its nll (the guide's average)", None, "tinygrad-perplexity", "torch-perplexity",
        "nll", 6)
    tg, pt = lab.get("perplexity_process_s"), lab.get("hf_perplexity_process_s")
    if tg is not None:
        rows.append(["  whole process s", fmt(tg, 1), fmt(pt, 1), ratio_cell(tg, pt, None)[0],
                     ""])
    tg, pt = lab.get("generate_s"), lab.get("hf_generate_s")
    if tg is not None:
        ratio, target = ratio_cell(tg, pt, ("<=", 0.8))
        rows.append([f"`gpt.py -p PROMPT -n {LAB_NEW_TOKENS}` wall s (peer: from_pretrained + "
                     "generate)", fmt(tg, 1), fmt(pt, 1), ratio, target])
        rows.append(["  its prefill s / JIT warm-up s (1 step) / decode tok/s",
                     f"{fmt(lab.get('gen_prefill_s'), 2)} / {fmt(lab.get('gen_warmup_s'), 2)} / "
                     f"{fmt(lab.get('gen_decode_tok_s'), 1)}", "", "", ""])
    tg, pt = lab.get("process_decode_tok_s"), lab.get("hf_process_decode_tok_s")
    if tg is not None:
        ratio, target = ratio_cell(tg, pt, (">=", 1.3))
        short, long = PROCESS_TOKENS
        rows.append([f"decode tok/s of whole processes, `-n {long}` minus `-n {short}` (peer: "
                     "generate)", fmt(tg, 1), fmt(pt, 1), ratio, target])
    T = get(r, "tinygrad-patching", "tokens")
    add(f"patching: the resid_pre grid s, 12 x {T} patched runs (peer: TransformerLens "
        "get_act_patch_resid_pre)", "patch", "tinygrad-patching", "torch-patching", "grid_s", 1)
    add("  the first call s (tinygrad compiles)", None, "tinygrad-patching", "torch-patching",
        "grid_first_s", 1)
    add("attribution patching s, every grid (peer: TransformerLens hooks, one backward)", None,
        "tinygrad-patching", "torch-patching", "attr_s", 2)
    attr = get(r, "tinygrad-patching", "attr_s")
    if attr is not None:  # an absolute goal, not a ratio
        rows[-1][-1] = f"<= {ATTR_TARGET_S:.0f} s " + ("met" if attr <= ATTR_TARGET_S else "missed")
    add("  the first call s", None, "tinygrad-patching", "torch-patching", "attr_first_s", 1)
    add(f"time to first token s, fp32 (load + {PROMPT_TOKENS}-token prefill)", None,
        "tinygrad-decode", "torch-decode", "ttft_s", 2)
    ttft = get(r, "tinygrad-decode", "ttft_s")
    if ttft is not None:  # an absolute goal, not a ratio
        rows[-1][-1] = f"< {TTFT_TARGET_S:.0f} s " + ("met" if ttft < TTFT_TARGET_S else "missed")
    add("  of which loading the checkpoint s", None, "tinygrad-decode", "torch-decode", "load_s", 2)
    add("  of which the first prefill s (compilation included)", None, "tinygrad-decode",
        "torch-decode", "first_prefill_s", 2)
    add("JIT warm-up s (tokens 2-3), fp32", None, "tinygrad-decode", "torch-decode",
        "warmup_s", 2)
    add("kernels per decode step (GlobalCounters, in JIT)", None, "tinygrad-decode", "",
        "kernels_per_step", 0)
    add("kernels per decode step (same step, no JIT)", None, "tinygrad-decode", "",
        "kernels_unjitted", 0)
    add("peak RSS MB, decode fp32", None, "tinygrad-decode", "torch-decode", "rss_mb", 0)
    add("peak RSS MB, decode 16-bit", None, "tinygrad-decode-half", "torch-decode-bf16",
        "rss_mb", 0)
    for workload, label in TRAIN_LABELS.items():
        tg_name, pt_name = f"tinygrad-train-{workload}", f"torch-train-{workload}"
        add(f"train ms/step, {label}", "train", tg_name, pt_name, "train_ms", 1)
        add("  first step s (build the model + one step)", None, tg_name, pt_name, "first_step_s",
            2)
        first = get(r, tg_name, "first_step_s")
        if workload == "reverse" and first is not None:  # an absolute goal, not a ratio
            rows[-1][-1] = f"<= {FIRST_STEP_TARGET_S:.0f} s " + (
                "met" if first <= FIRST_STEP_TARGET_S else "missed")
        add("  JIT warm-up s (steps 2-3)", None, tg_name, pt_name, "jit_warmup_s", 2)
        add("  kernels per step", None, tg_name, "", "kernels_per_step", 0)
        low, high = get(r, tg_name, "matmul_gflops_min"), get(r, tg_name, "matmul_gflops_max")
        if low is not None:
            met = "met" if low >= high / 2 else "missed"
            slowest = get(r, tg_name, "matmul_slowest")
            rows.append([f"  matmul GFLOP/s, slowest ({slowest}) / fastest", f"{low} / {high}",
                         "", f"{low / high:.2f}", f">= 0.50 {met}"])
    label = f"GPT-2 124M, batch {FINETUNE_BATCH} x {FINETUNE_BLOCK}"
    add(f"fine-tune ms/step, {label}", "finetune", "tinygrad-finetune", "torch-finetune",
        "train_ms", 1)
    add("  peak RSS MB", "finetune_rss", "tinygrad-finetune", "torch-finetune", "rss_mb", 0)
    add("  first step s, warm kernel cache (load + one step)", None, "tinygrad-finetune",
        "torch-finetune", "first_step_s", 1)
    add("  first step s, cold kernel cache", None, "tinygrad-finetune-cold", "torch-finetune",
        "first_step_s", 1)
    add("  JIT warm-up s (steps 2-3)", None, "tinygrad-finetune", "torch-finetune",
        "jit_warmup_s", 2)
    for key, label, target in (("cold_s", "cold kernel cache", DEMO_COLD_TARGET_S),
                               ("warm_s", "warm kernel cache", DEMO_WARM_TARGET_S)):
        seconds = get(r, "demo", key)
        if seconds is not None:
            rows.append([f"`transformer.py -v` wall s, {label}", fmt(seconds, 1), "", "",
                         f"<= {target:.0f} s " + ("met" if seconds <= target else "missed")])
    return rows


def markdown(rows: list[list[str]]) -> str:
    head = ["metric", "tinygrad", "PyTorch", "ratio", "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def machine_info(results: dict, env: dict) -> dict:
    tg = next((v for k, v in results.items() if k.startswith("tinygrad") and "device" in v), {})
    probe = results.get("torch-probe", {})
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "tinygrad_dev": env.get("DEV"),
        "tinygrad_device": tg.get("device"),
        "tinygrad_renderer": tg.get("renderer"),
        "beam": env.get("BEAM", "0"),
        "torch": probe.get("torch") or probe.get("skipped"),
        "transformers": probe.get("transformers"),
        "torch_threads": probe.get("threads"),
        "torch_attention": get(results, "torch-decode", "attn"),
        "read_bandwidth_gb_s": get(results, "bandwidth", "gb_s"),
        "read_bandwidth_small_pages_gb_s": get(results, "bandwidth", "threaded_gb_s"),
        "read_bandwidth_huge_pages_gb_s": get(results, "bandwidth", "huge_threaded_gb_s"),
        "gpt2_params": gpt2_params(),
    }


# --tokens: speed is timed from token STEADY_FROM on, and the prompt and the tokens share GPT-2's
# 1024-token context
TOKENS = flags.number(int, STEADY_FROM + 2, 1024 - PROMPT_TOKENS,
                      what=f"a whole number from {STEADY_FROM + 2} to {1024 - PROMPT_TOKENS}")


def parse_args(argv):
    ap = flags.Parser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", type=flags.names(GROUPS, "group"), default=",".join(GROUPS),
                    metavar="GROUP,...",
                    help="the groups to run, comma-separated")
    ap.add_argument("--tokens", type=TOKENS, help=f"decode N tokens (default {DEFAULT_TOKENS}, "
                                                  f"{QUICK_TOKENS} with --quick)")
    ap.add_argument("--device", help="tinygrad backend for the children (sets DEV): CPU, CL, ...")
    ap.add_argument("--quick", action="store_true", help="fewer tokens, steps and repeats")
    ap.add_argument("--json", type=Path, help="also write every number to this file")
    ap.add_argument("--torch-python", type=Path, metavar="PYTHON",
                    help="the interpreter for the PyTorch children (default: this one)")
    ap.add_argument("--llama-cpp", type=flags.existing_dir, metavar="DIR",
                    help="also run llama.cpp (issue 34): a llama.cpp folder with "
                         "convert_hf_to_gguf.py and a built build/bin/llama-bench")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.tokens is None:
        args.tokens = QUICK_TOKENS if args.quick else DEFAULT_TOKENS
    args.groups = set(args.only)
    return args


def main(argv=None) -> int:
    """Every way it ends is flags.run's: a bad flag one `error:` line and exit status 2, Ctrl-C
    130; a benchmark that failed is 1 (its row says why)."""
    return flags.run(bench, argv)


def bench(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, args.checkpoint, args.tokens, args.quick)),
              flush=True)
        return 0

    env = dict(os.environ)
    if args.device:
        env["DEV"] = args.device.upper()
    # without DEV the children run on the project's default backend (runtime.install)
    print(f"bench: DEV={env.get('DEV', 'unset: the default')} BEAM={env.get('BEAM', '0')} "
          f"tokens={args.tokens} "
          f"groups={','.join(g for g in GROUPS if g in args.groups)}", file=sys.stderr)
    results = {}
    torch_ok = bool(args.groups - {"bandwidth", "demo"})
    if torch_ok:
        probe = spawn("torch-probe", args, env)
        if "error" in probe:
            # no peer is a normal outcome, not a failure: the tinygrad rows still stand alone
            torch_ok = False
            probe = {"skipped": f"torch or transformers does not import ({probe['error']})"}
            print(f"note: PyTorch peer skipped: {probe['skipped']}", file=sys.stderr)
        results["torch-probe"] = probe
    with tempfile.TemporaryDirectory(prefix="bench-gpt2-") as folder:
        names = plan(args.groups, torch_ok)
        if any(n != "bandwidth" and "train" not in n for n in names):  # those that load GPT-2
            print(f"  writing a random GPT-2 124M checkpoint to {folder} ...", file=sys.stderr)
            write_random_gpt2(Path(folder))
        args.checkpoint = folder
        cold = Path(folder) / "cold-cache"  # a kernel cache of its own, empty at first
        for name in names:
            cache = {"CACHEDB": f"{cold}/cache.db", "POCL_CACHE_DIR": f"{cold}/pocl"}
            own = name.startswith("tinygrad-finetune")  # cold, then warm on what cold filled
            results[name] = spawn(name, args, env | cache if own else env)
        if args.llama_cpp and {"decode", "half", "prefill"} & args.groups:
            results["llama.cpp"] = time_llama(Path(folder), args, env)
        if "lab" in args.groups:
            args.torch_ok = torch_ok
            try:
                results["lab"] = time_lab(env, args)
            except ChildFailed as e:
                results["lab"] = {"error": str(e)}
    if "demo" in args.groups:
        results["demo"] = time_demo(env)

    info = machine_info(results, env)
    rows = table_rows(results)
    print()
    print(markdown(rows))
    print()
    print(f"ratio = tinygrad / PyTorch. Decode speed counts tokens {STEADY_FROM}..{args.tokens} "
          f"of greedy generation after a {PROMPT_TOKENS}-token prompt; random weights in GPT-2 "
          "124M's shapes.")
    for key, value in info.items():
        if value is not None:
            print(f"- {key}: {value:.1f}" if isinstance(value, float) else f"- {key}: {value}")
    errors = {k: v["error"] for k, v in results.items() if "error" in v}
    for name, why in errors.items():
        print(f"- FAILED {name}: {why}")
    if args.json:
        report = {"machine": info, "tokens": args.tokens, "quick": args.quick, "results": results,
                  "table": rows}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
