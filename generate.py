"""Sampling and generation: a model's KV cache filled by one pass over the prompt (the prefill),
then one token per step, each step compiled once by TinyJit and replayed (as tinygrad's
examples/gpt2.py does), with the next token drawn in NumPy.

    from generate import generate
    for tokens in generate(model, prompt_ids, 20, temperature=0.8, rng=rng): ...

gpt.py makes GPT-2 talk with it; the toy tasks sample their models with it.
"""
from __future__ import annotations

import numpy as np
from tinygrad import Context, Tensor, Variable
from tinygrad.helpers import BEAM

from runtime import host_input, host_output, jit_at_once, kept_jits
from transformer import Transformer


def sample(logits: np.ndarray, temperature=1.0, top_k=None, top_p=None, rng=None) -> np.ndarray:
    """Pick one token per row of logits (B, V). temperature 0 is greedy (argmax); otherwise the
    logits are divided by it, top-k keeps the k likeliest, top-p the smallest set whose
    probability reaches p (Holtzman et al., 2019), and one is drawn. In NumPy on the host: cheap
    next to the model, and a seeded rng draws the same on every backend."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k, None]  # (B, 1)
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        # keep a token if the likelier ones do not reach top_p yet (so the first always stays)
        keep_sorted = np.cumsum(sorted_probs, -1) - sorted_probs < top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
    rng = rng if rng is not None else np.random.default_rng()
    # inverse-CDF draw: the first token whose cumulative probability passes a uniform number.
    # Scaling by the total (1 up to rounding) means only tokens of nonzero probability can win.
    cdf = np.cumsum(probs, -1)
    u = rng.random((probs.shape[0], 1)) * cdf[:, -1:]
    return (cdf <= u).sum(-1)


def prefill_bucket(T: int, n_ctx: int, smallest: int = 8) -> int:
    """The length a prompt of T tokens is right-padded to: the next power of two (at least
    smallest, at most n_ctx). Each new shape is a new graph and new kernels; this way all
    lengths share log2(n_ctx), and causal attention keeps the padding from the real positions."""
    if not 1 <= T <= n_ctx:
        raise ValueError(f"{T} tokens do not fit a context of {n_ctx}")
    return min(max(smallest, 1 << (T - 1).bit_length()), n_ctx)


def padded_length(model: Transformer, T: int) -> int:
    """prefill_bucket for a causal model; T without the mask, where all would see the padding."""
    return prefill_bucket(T, model.config.n_ctx) if model.config.causal else T


def generate(model: Transformer, prompt: np.ndarray, max_new_tokens: int, temperature=0.0,
             top_k=None, top_p=None, rng=None, beam=0):
    """Yield the next token of every sequence, (B,) per step, for prompt (B, T) of token ids.

    One pass (prefill, right-padded to its bucket) fills each layer's KV cache; then each step
    feeds one token, compiled once by TinyJit with its position a symbolic Variable. Both stay
    with the model (runtime.kept_jits), so later calls trace nothing again. A full context
    slides: the newest half is prefilled again. beam > 0 searches the step's kernels (tinygrad's
    BEAM of that width): a long search once per shape and device, then cached on disk."""
    n_ctx = model.config.n_ctx
    window = np.asarray(prompt, dtype=np.int32)[:, -n_ctx:]  # (B, T): a longer prompt keeps its end
    B = window.shape[0]
    pos_var = Variable("pos", 1, n_ctx - 1)

    def prefill(window: np.ndarray) -> np.ndarray:
        """The prompt (B, T), padded, into the KV cache -> the last real position's logits (B, V).
        The padding's keys land at T and on, which each decode step writes before it reads."""
        T = window.shape[1]
        size = padded_length(model, T)
        # One TinyJit per bucket, captured by its first call (which makes the KV caches). The
        # output layer reads the last real row only (the other rows' logits, each a product with
        # the whole output layer, would be thrown away; docs/speed.md); contiguous(): a view
        # would come back at its first offset.
        run = kept_jits(model, B).setdefault(size, jit_at_once(lambda tok, last: model.unembed(
            model.final_stream(tok, 0).shrink((None, (last, last + 1), None)).contiguous())
            .realize()))
        padded = Tensor(np.pad(window, ((0, 0), (0, size - T))))  # (B, size), zeros after
        return run(padded, Variable("last", 0, size - 1).bind(T - 1)).numpy()[:, 0]

    logits = prefill(window)  # (B, V)
    # captured on its first call: the prefill has made the KV cache, so the step creates nothing
    decode = kept_jits(model, B).setdefault(("decode", beam), jit_at_once(
        lambda tok, pos: model(tok, pos)[:, -1].realize()))
    tok = None  # the step's input: one token per sequence, (B, 1), written in place each step
    for step in range(max_new_tokens):
        nxt = sample(logits, temperature, top_k, top_p, rng).astype(np.int32)  # (B,)
        yield nxt
        if step == max_new_tokens - 1:
            break
        window = np.concatenate([window, nxt[:, None]], axis=1)
        if window.shape[1] > n_ctx:
            window = window[:, -(n_ctx // 2) :]
            logits = prefill(window)
        else:
            with Context(BEAM=beam or BEAM.value):  # 0 leaves tinygrad's own setting alone
                tok = host_input(tok, nxt[:, None])
                logits = host_output(decode(tok, pos_var.bind(window.shape[1] - 1)))


