"""A decoder-only transformer written out on tinygrad, and a loop that trains toy ones.

The model follows "Attention Is All You Need" (Vaswani et al., 2017) for scaled dot-product
attention, multi-head attention and sinusoidal positions, and GPT-2 ("Language Models are
Unsupervised Multitask Learners", Radford et al., 2019) for the pre-LayerNorm block, learned
positions and weight names. gpt.py builds GPT-2 from the classes here, so the names (wte, wpe, h,
ln_1, attn.c_attn, ...) are the ones in OpenAI's checkpoint. The training loop checks on held-out
data that a model really learned.

Read it top to bottom: attention (four similarity functions), heads, LayerNorm, MLP, positions,
the block, the model and its ablations, attention maps, sampling, then the training loop and its
command line. The tasks it trains on are in tasks.py.

    python transformer.py -v                        # learn to reverse digit strings: exact match
    python transformer.py --task shakespeare -v     # character-level tinyshakespeare: val loss
    python transformer.py --task reverse --sample   # decode with the checkpoint saved in models/
    python transformer.py --attention               # every head of that checkpoint, drawn
    python transformer.py --ablate no-mask -v       # what the causal mask is for
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import json
import math
import os
import pickle
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path
from queue import SimpleQueue

import numpy as np
from tinygrad import Context, GlobalCounters, Tensor, TinyJit, Variable, nn
from tinygrad.engine.jit import GraphRunner
from tinygrad.engine.realize import get_call_arg_uops
from tinygrad.function import function
from tinygrad.helpers import BEAM, TRAINING, diskcache_get, diskcache_put
from tinygrad.nn.state import get_state_dict, safe_load, safe_save
from tinygrad.uop.ops import Ops, UOp

# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def causal_mask(T: int, S, start_pos=0) -> Tensor:
    """Additive mask (T, S): 0 where query t may look at key s, -inf where s is in its future.

    Query t sits at absolute position start_pos + t, and may see keys 0 .. start_pos + t."""
    return Tensor.full((T, S), float("-inf")).triu(start_pos + 1)


# How much a query wants a key, before the softmax: four similarity functions. GPT-2 uses the scaled
# dot product; the others are here to compare (python transformer.py --similarity NAME). Each maps
# q (..., H, T, hs) and k (..., H, S, hs) to scores (..., H, T, S).


def dot_scores(q: Tensor, k: Tensor) -> Tensor:
    """qᵀk (Luong et al., 2015, "dot"): one matmul, no parameters. Its variance grows with the
    head size, so with wide heads the softmax saturates and its gradients vanish."""
    return q @ k.transpose(-2, -1)


def scaled_scores(q: Tensor, k: Tensor) -> Tensor:
    """qᵀk / √d (Vaswani et al., 2017, section 3.2.1): the dot product at unit variance, so the
    softmax does not saturate; the same cost. GPT-2's, and the default."""
    return dot_scores(q, k) / math.sqrt(q.shape[-1])


def general_scores(q: Tensor, k: Tensor, w: Tensor) -> Tensor:
    """qᵀWk with a learned W per head, w (H, hs, hs) (Luong et al., 2015, "general"): one more
    matmul and hs² parameters per head. W_Q and W_K already make q and k, so W adds no power a
    wider c_attn could not give; it is the bilinear form written out."""
    return (q @ w) @ k.transpose(-2, -1)


def additive_scores(q: Tensor, k: Tensor, w_q: Tensor, w_k: Tensor, v: Tensor) -> Tensor:
    """vᵀ tanh(W_q q + W_k k) (Bahdanau et al., 2015, the first attention in translation): a small
    MLP on every (query, key) pair, w_q and w_k (H, hs, hs), v (H, hs). It needs a (T, S, hs)
    tensor per head where the others need (T, S): the costliest, which is why Transformers moved
    to dot products."""
    H, hs = v.shape
    pairs = (q @ w_q).unsqueeze(-2) + (k @ w_k).unsqueeze(-3)  # (..., H, T, S, hs)
    return (pairs.tanh() * v.reshape(H, 1, 1, hs)).sum(-1)  # (..., H, T, S)


SIMILARITIES = ("scaled", "dot", "general", "additive")


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None = None,
                      similarity=scaled_scores) -> Tensor:
    """softmax(similarity(q, k) + mask) for q (..., T, d) and k (..., S, d)  ->  (..., T, S).

    Row t says how much query t takes from each key: it sums to 1, and the mask zeroes the future.
    The default similarity divides q kᵀ by √d, which keeps the dot products at unit variance, so
    the softmax does not saturate (Vaswani et al., 2017, section 3.2.1)."""
    scores = similarity(q, k)  # (..., T, S)
    if mask is not None:
        scores = scores + mask
    return scores.softmax(-1).contiguous()


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ / √d + mask) v  for q (..., T, d), k and v (..., S, d)  ->  (..., T, d):
    each query's output is the average of the values, weighted by attention_weights."""
    return attention_weights(q, k, mask) @ v


def matmul_backward(grad: UOp, call: UOp) -> tuple[UOp, UOp]:
    """The gradients of y = x Wᵀ (x (N, in), W (out, in)), written so that tinygrad 0.14 makes
    fast CPU kernels of them. Its own backward reads W across memory for dx, and reduces dW over
    all N rows in one long sum: on this CPU 12 and 7 GFLOP/s against the forward's 31.
    - dx = g W reads W through a transposed copy, so each of its sums runs along memory: 31.
    - dW = gᵀ x as up to 32 partial sums over blocks of rows, stored, then added: 17.
    One Linear of modular addition's step at p=113 (11,490 rows, 512 -> 128): 385 ms -> 186 ms."""
    g, x, w = (Tensor(u) for u in (grad, *call.src[1:]))
    N, n_in = x.shape
    n_out = w.shape[0]
    dx = g @ w.T.contiguous().T  # (N, out) @ (out, in), the (out, in) view of an (in, out) copy
    k = max(d for d in range(1, 33) if N % d == 0)
    g_blocks = g.reshape(k, N // k, n_out).transpose(1, 2)  # (k, out, N/k)
    dw = (g_blocks @ x.reshape(k, N // k, n_in)).contiguous().sum(0)  # (k, out, in) -> (out, in)
    return dx.uop, dw.uop


@function(grad_fxn=matmul_backward)
def train_matmul(x: Tensor, weight: Tensor) -> Tensor:
    """x Wᵀ for x (N, in), with the backward above."""
    return x @ weight.T


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x Wᵀ + b for x (..., in) and weight (out, in)."""
    *lead, n_in = x.shape
    n_out = weight.shape[0]
    if math.prod(lead) == 1 and n_in % 4 == 0:
        # One row (decoding a token): a matrix-vector product, bound by reading the weights. As
        # one long sum per output it is a serial chain of additions; as 4 interleaved partial
        # sums, the CPU has independent ones to overlap: decoding 1.5x faster on tinygrad 0.14's
        # CPU and OpenCL backends (8 sums spill registers on a CPU without AVX-512).
        products = x.reshape(*lead, 1, n_in // 4, 4) * weight.reshape(n_out, n_in // 4, 4)
        y = products.sum(-2).sum(-1)  # (..., out)
    elif TRAINING:
        # the same product with a backward that makes faster kernels (matmul_backward)
        y = train_matmul(x.reshape(-1, n_in), weight).reshape(*lead, n_out)
    else:
        y = x @ weight.T
    return y if bias is None else y + bias


class Linear:
    """y = x Wᵀ + b with W stored (out, in), as in PyTorch.

    In this layout each output's weights sit next to each other in memory, so the matrix-vector
    products of decoding read memory in order: 3x faster on a CPU than GPT-2's Conv1D layout
    (in, out), which gpt.py transposes once at load time."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True, std: float = 0.02, init=True):
        # init=False leaves the weights unset for a caller that loads a checkpoint: building
        # tinygrad's lazy random-number graphs for GPT-2 costs over a second, for nothing
        self.weight = Tensor.normal(n_out, n_in, std=std) if init else Tensor.empty(n_out, n_in)
        self.bias = Tensor.zeros(n_out) if bias else None

    def __call__(self, x: Tensor) -> Tensor:
        # Materialize the input, and the gradient flowing back: an elementwise expression fused into
        # a matmul operand is recomputed for every output column, which costs more than one write.
        return linear(x.contiguous(), self.weight, self.bias).contiguous_backward()


class SingleHeadAttention:
    """One causal attention head, the unit that multi-head attention repeats."""

    def __init__(self, n_embd: int, head_size: int):
        self.query = Linear(n_embd, head_size)
        self.key = Linear(n_embd, head_size)
        self.value = Linear(n_embd, head_size)

    def __call__(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.query(x), self.key(x), self.value(x)  # each (B, T, hs)
        return attention(q, k, v, causal_mask(T, T))


class CausalSelfAttention:
    """n_head heads side by side: one matmul makes q, k and v for every head (GPT-2's c_attn),
    the heads attend independently, and c_proj mixes their concatenated outputs.

    Called with start_pos, it keeps the keys and values of earlier positions in a cache, so
    decoding one new token costs one row of attention instead of re-running the whole prefix."""

    def __init__(self, n_embd: int, n_head: int, n_ctx: int, n_layer: int = 1, init=True,
                 causal: bool = True, similarity: str = "scaled"):
        assert n_embd % n_head == 0, f"{n_embd=} is not divisible by {n_head=}"
        self.n_head, self.n_ctx = n_head, n_ctx
        self.causal, self.similarity = causal, similarity  # causal=False: --ablate no-mask
        self.c_attn = Linear(n_embd, 3 * n_embd, init=init)
        # GPT-2 scales the init of projections into the residual stream by 1/sqrt(2 * n_layer) so
        # the residual's variance does not grow with depth (Radford et al., 2019, section 2.3).
        self.c_proj = Linear(n_embd, n_embd, std=0.02 / math.sqrt(2 * n_layer), init=init)
        hs = n_embd // n_head
        if similarity == "general":
            # W = I / √hs: at the start exactly the scaled dot product, then it learns
            eye = Tensor.eye(hs).reshape(1, hs, hs).expand(n_head, hs, hs) / math.sqrt(hs)
            self.w_general = eye.contiguous()
        elif similarity == "additive":
            self.w_q_add, self.w_k_add = [Tensor.normal(n_head, hs, hs, std=hs**-0.5)
                                          for _ in range(2)]
            self.v_add = Tensor.normal(n_head, hs, std=hs**-0.5)
        self.cache_kv: Tensor | None = None
        self.keep_weights, self.weights = False, None  # see attention_maps

    def scores(self, q: Tensor, k: Tensor) -> Tensor:
        """This layer's similarity of every query to every key, (B, H, T, S)."""
        if self.similarity == "scaled":
            return scaled_scores(q, k)
        if self.similarity == "dot":
            return dot_scores(q, k)
        if self.similarity == "general":
            return general_scores(q, k, self.w_general)
        return additive_scores(q, k, self.w_q_add, self.w_k_add, self.v_add)

    def share(self, other: CausalSelfAttention):
        """Use other's weights (--ablate shared-layers); the KV cache stays this layer's own."""
        for name in ("c_attn", "c_proj", "w_general", "w_q_add", "w_k_add", "v_add"):
            if hasattr(other, name):
                setattr(self, name, getattr(other, name))

    def __call__(self, x: Tensor, start_pos=None) -> Tensor:
        B, T, C = x.shape
        H = self.n_head
        # contiguous_backward: each of the three gradients is written once, then joined, instead of
        # one kernel recomputing all three attention matmuls for every column of c_attn
        q, k, v = [t.contiguous_backward() for t in self.c_attn(x).split(C, dim=-1)]  # (B, T, C)
        q = q.reshape(B, T, H, C // H).transpose(1, 2)  # (B, H, T, hs)
        k = k.reshape(B, T, H, C // H).transpose(1, 2)  # (B, H, T, hs)
        v = v.reshape(B, T, H, C // H).transpose(1, 2)  # (B, H, T, hs)
        if start_pos is None:
            mask = causal_mask(T, T)
        else:
            k, v = self.remember(k, v, start_pos)  # (B, H, start_pos + T, hs)
            # one new query may look at every cached key, so a single step needs no mask
            mask = causal_mask(T, start_pos + T, start_pos) if T > 1 else None
        if not self.causal:
            mask = None  # every token sees every other, its future included
        att = attention_weights(q, k, mask, self.scores)  # (B, H, T, S)
        if self.keep_weights:  # for attention_maps: the very probabilities this pass uses
            self.weights = att
        y = att @ v  # (B, H, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        return self.c_proj(y)

    def remember(self, k: Tensor, v: Tensor, start_pos) -> tuple[Tensor, Tensor]:
        """Write this call's keys and values at start_pos and return everything cached so far."""
        B, H, T, hs = k.shape
        if self.cache_kv is None or self.cache_kv.shape[1] != B or self.cache_kv.dtype != k.dtype:
            # empty, not zeros: every position is written before it is read, and an allocation
            # needs no kernel of its own (zeros cost one realize per layer in the first prefill)
            cache = Tensor.empty(2, B, H, self.n_ctx, hs, dtype=k.dtype)
            self.cache_kv = cache.is_param_(False)  # state, not a weight: kept out of checkpoints
        end = start_pos + T
        self.cache_kv[:, :, :, start_pos:end].assign(Tensor.stack(k, v))  # (2, B, H, T, hs)
        return self.cache_kv[0, :, :, :end], self.cache_kv[1, :, :, :end]


# ---------------------------------------------------------------------------------------------
# The rest of a block: LayerNorm, the MLP, positions
# ---------------------------------------------------------------------------------------------


class LayerNorm:
    """Normalize each position's features to mean 0 and variance 1, then scale and shift.

    The variance is the biased one (divide by C, not C - 1), as in Ba et al. (2016) and PyTorch."""

    def __init__(self, n_embd: int, eps: float = 1e-5):
        self.weight, self.bias, self.eps = Tensor.ones(n_embd), Tensor.zeros(n_embd), eps

    def __call__(self, x: Tensor) -> Tensor:
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) * (var + self.eps).rsqrt() * self.weight + self.bias


def gelu(x: Tensor) -> Tensor:
    """GELU with the tanh approximation (Hendrycks & Gimpel, 2016) that GPT-2 was trained with."""
    return 0.5 * x * (1 + (math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)).tanh())


class MLP:
    """Position-wise feed-forward network: widen 4x, GELU, project back."""

    def __init__(self, n_embd: int, n_layer: int = 1, init=True):
        self.c_fc = Linear(n_embd, 4 * n_embd, init=init)
        self.c_proj = Linear(4 * n_embd, n_embd, std=0.02 / math.sqrt(2 * n_layer), init=init)

    def __call__(self, x: Tensor) -> Tensor:
        return self.c_proj(gelu(self.c_fc(x)))


def sinusoidal_positions(n_ctx: int, n_embd: int) -> Tensor:
    """(n_ctx, n_embd) table: PE[p, 2i] = sin(p / 10000^(2i/C)), PE[p, 2i+1] = cos(same).

    Fixed, not learned: each pair of features is a clock at its own frequency (Vaswani et al.,
    section 3.5)."""
    pos = np.arange(n_ctx)[:, None]
    freq = 10000.0 ** (-np.arange(0, n_embd, 2) / n_embd)
    table = np.zeros((n_ctx, n_embd), dtype=np.float32)
    table[:, 0::2] = np.sin(pos * freq)
    table[:, 1::2] = np.cos(pos * freq)[:, : n_embd // 2]
    return Tensor(table)


class Block:
    """Attention then MLP, each added to the residual stream.

    Pre-LN (GPT-2) normalizes the input of each branch: x + f(ln(x)). Post-LN, as in the 2017
    paper, normalizes after the sum: ln(x + f(x)); it trains less stably without warmup (Xiong et
    al., 2020). Config(mlp=False) keeps attention only, the model in which Olsson et al. (2022)
    watch induction heads form; Config(layernorm=False) drops the block's LayerNorms."""

    def __init__(self, config: Config, init=True):
        c = config
        self.prenorm, self.residual = c.prenorm, c.residual
        self.ln_1 = LayerNorm(c.n_embd, c.ln_eps) if c.layernorm else None
        self.attn = CausalSelfAttention(c.n_embd, c.n_head, c.n_ctx, c.n_layer, init, c.causal,
                                        c.similarity)
        self.ln_2 = LayerNorm(c.n_embd, c.ln_eps) if c.layernorm and c.mlp else None
        self.mlp = MLP(c.n_embd, c.n_layer, init) if c.mlp else None

    def __call__(self, x: Tensor, start_pos=None) -> Tensor:
        norm = lambda ln, h: h if ln is None else ln(h)
        # residual=False (--ablate no-residual): each branch replaces the stream instead of adding
        add = (lambda x, y: x + y) if self.residual else (lambda x, y: y)
        if self.prenorm:
            x = add(x, self.attn(norm(self.ln_1, x), start_pos))
            return x if self.mlp is None else add(x, self.mlp(norm(self.ln_2, x)))
        x = norm(self.ln_1, add(x, self.attn(x, start_pos)))
        return x if self.mlp is None else norm(self.ln_2, add(x, self.mlp(x)))

    def share(self, other: Block):
        """Use other's weights (--ablate shared-layers): a deeper network, no more parameters."""
        self.ln_1, self.ln_2, self.mlp = other.ln_1, other.ln_2, other.mlp
        self.attn.share(other.attn)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    vocab_size: int = 16
    n_ctx: int = 32  # longest sequence the model sees (GPT-2's n_positions)
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    positions: str = "learned"  # or "sinusoidal"
    prenorm: bool = True  # False: post-LN as in Vaswani et al.
    ln_eps: float = 1e-5
    mlp: bool = True  # False: attention-only blocks (Olsson et al., 2022)
    layernorm: bool = True  # False: no LayerNorm inside the blocks (the final one stays)
    # The ablations (--ablate): what each part of the architecture is for, by taking it away
    causal: bool = True  # False: no-mask, attention may look ahead
    residual: bool = True  # False: no-residual, blocks without skip connections
    shared_layers: bool = False  # True: every block uses the first block's weights
    similarity: str = "scaled"  # how a query scores a key: one of SIMILARITIES
    # Initial embeddings, in multiples of GPT-2's (std 0.02 for tokens, 0.01 for positions): large
    # initial weights make a network memorize first and generalize late (Liu et al., 2023,
    # "Omnigrok"), as PyTorch's default, std 1, does in Lee et al.'s grokking (grokking-slow)
    embd_scale: float = 1.0

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.positions not in ("learned", "sinusoidal", "none"):
            raise ValueError(f"positions={self.positions!r}: expected 'learned', 'sinusoidal' "
                             "or 'none'")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity={self.similarity!r}: expected one of "
                             f"{', '.join(SIMILARITIES)}")


# --ablate NAME: what each takes away, as Config fields. Hilton's curriculum asks what the mask,
# the skip connections, the positions and separate layers are for; train without and see.
ABLATIONS = {
    "no-mask": {"causal": False},
    "no-residual": {"residual": False},
    "no-positions": {"positions": "none"},
    "shared-layers": {"shared_layers": True},
}


class Transformer:
    """Token ids (B, T) -> next-token logits (B, T, vocab_size).

    The output layer reuses the token embedding (weight tying, Press & Wolf 2017), as GPT-2 does.
    init=False skips drawing the random initial weights, for a caller that replaces them all."""

    def __init__(self, config: Config, init=True):
        c = self.config = config
        # Rows are padded to a multiple of 64 (zeros, never a target): tinygrad's kernel
        # heuristics split and unroll the output axis only by factors that divide it (GPT-2's
        # 50257 has none small), which halves the time of the largest matmul in decoding.
        # nanoGPT pads too.
        rows = -(-c.vocab_size // 64) * 64
        self.wte = nn.Embedding(rows, c.n_embd)
        if init:
            wte = Tensor.normal(c.vocab_size, c.n_embd, std=0.02 * c.embd_scale)
            self.wte.weight = wte.pad(((0, rows - c.vocab_size), None)).contiguous()
        if c.positions == "learned":
            self.wpe = nn.Embedding(c.n_ctx, c.n_embd)
            if init:
                self.wpe.weight = Tensor.normal(c.n_ctx, c.n_embd, std=0.01 * c.embd_scale)
        elif c.positions == "sinusoidal":
            self.pe = sinusoidal_positions(c.n_ctx, c.n_embd).is_param_(False)  # a constant
        # positions "none" (--ablate no-positions): attention alone cannot tell where a token is
        self.h = [Block(c, init and (i == 0 or not c.shared_layers)) for i in range(c.n_layer)]
        if c.shared_layers:
            for block in self.h[1:]:
                block.share(self.h[0])
        # pre-LN leaves the residual stream unnormalized, so one last LayerNorm precedes the output
        self.ln_f = LayerNorm(c.n_embd, c.ln_eps) if c.prenorm else None

    def __call__(self, idx: Tensor, start_pos=None) -> Tensor:
        """start_pos=None: the whole sequence, no cache. An int or bound Variable: idx continues
        a sequence whose first start_pos tokens are already in the KV cache."""
        B, T = idx.shape
        first = 0 if start_pos is None else start_pos
        # Weights may be stored in float16 (gpt.py --half) to halve the bytes each token reads;
        # activations stay float32, and each matmul upcasts its weights as it loads them. The
        # token rows are looked up as float32 too: tinygrad 0.14 cannot compile a float16 lookup
        # (nn.Embedding's) for OpenCL.
        if TRAINING:
            # The lookup as a product with one-hot rows: its gradient is then a matmul that
            # linear splits into partial sums. tinygrad's own backward of the lookup is one long
            # masked sum per table entry: 161 ms of modular addition's 900 ms step at p=113.
            rows = self.wte.weight.shape[0]
            one_hot = (idx.unsqueeze(-1) == Tensor.arange(rows)).float()  # (B, T, rows)
            x = linear(one_hot, self.wte.weight.T)  # (B, T, C)
        else:
            x = self.wte.weight.float()[idx]  # (B, T, C)
        if self.config.positions != "none":
            table = self.wpe.weight if self.config.positions == "learned" else self.pe
            x = x + table[first : first + T].float()  # (B, T, C) + (T, C)
        for block in self.h:
            x = block(x, start_pos)
            if start_pos is not None:
                # Inference: realizing each block's output makes the blocks separate graphs that
                # differ only in their buffers, and tinygrad's schedule cache recognizes them:
                # GPT-2's first prefill took 5 s instead of 7 here. (Training keeps one graph.)
                x = x.realize()
        if self.ln_f is not None:
            x = self.ln_f(x)
        return linear(x, self.wte.weight)[:, :, : self.config.vocab_size]  # (B, T, vocab_size)

    def parameters(self) -> dict[str, Tensor]:
        """name -> trainable tensor, each once: with shared layers h.1... are h.0's tensors."""
        params, seen = {}, set()
        for k, v in get_state_dict(self).items():
            if v.is_param and id(v) not in seen:
                params[k] = v
                seen.add(id(v))
        return params


def attention_maps(model: Transformer, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Logits (B, T, vocab) and every head's attention probabilities (B, n_layer, n_head, T, T)
    for token ids idx (B, T), both from one ordinary forward pass.

    Each layer keeps the softmax it multiplies its values with, so what is shown is what was
    computed: there is no second implementation of attention to drift from the first. The
    weights are a buffer of the pass anyway, so keeping them costs one copy into the stacked
    result and changes no logit; with capture off (the default) nothing is kept."""
    layers = [block.attn for block in model.h]
    for attn in layers:
        attn.keep_weights = True
    try:
        logits = model(idx)
        maps = Tensor.stack(*[attn.weights for attn in layers], dim=1)  # (B, L, H, T, T)
        Tensor.realize(logits, maps)
    finally:
        for attn in layers:
            attn.keep_weights, attn.weights = False, None
    return logits, maps


# ---------------------------------------------------------------------------------------------
# Sampling and generation
# ---------------------------------------------------------------------------------------------


def sample(logits: np.ndarray, temperature=1.0, top_k=None, top_p=None, rng=None) -> np.ndarray:
    """Pick one token per row of logits (B, V).

    temperature 0 is greedy (argmax). Otherwise the logits are divided by the temperature, top-k
    keeps the k likeliest tokens, top-p keeps the smallest set whose probability reaches p (the
    "nucleus", Holtzman et al., 2019), and one token is drawn from what is left. Sampling runs in
    NumPy on the host: it is cheap next to the model, and a seeded rng draws the same on every
    backend."""
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


def generate(model: Transformer, prompt: np.ndarray, max_new_tokens: int, temperature=0.0,
             top_k=None, top_p=None, rng=None, beam=0):
    """Yield the next token of every sequence, (B,) per step, for prompt (B, T) of token ids.

    The prompt is run in one pass (prefill) that fills each layer's KV cache; after that every step
    feeds one token. That step is compiled once by TinyJit with its position as a symbolic
    Variable, so the loop neither re-traces nor recompiles per token. When the context is full, the
    window slides: the newest half of the tokens is prefilled again and decoding goes on.

    beam > 0 compiles the step's kernels with tinygrad's kernel search (BEAM) of that width: it
    times variants of each kernel on this device and keeps the fastest. The search runs once per
    kernel shape and device, minutes at first, and tinygrad caches the result on disk."""
    n_ctx = model.config.n_ctx
    window = np.asarray(prompt, dtype=np.int32)[:, -n_ctx:]  # (B, T): a longer prompt keeps its end
    decode = TinyJit(lambda tok, pos: model(tok, pos)[:, -1].realize())
    pos_var = Variable("pos", 1, n_ctx - 1)
    logits = model(Tensor(window), 0)[:, -1].numpy()  # (B, V)
    for step in range(max_new_tokens):
        nxt = sample(logits, temperature, top_k, top_p, rng).astype(np.int32)  # (B,)
        yield nxt
        if step == max_new_tokens - 1:
            break
        window = np.concatenate([window, nxt[:, None]], axis=1)
        if window.shape[1] > n_ctx:
            window = window[:, -(n_ctx // 2) :]
            logits = model(Tensor(window), 0)[:, -1].numpy()
        else:
            pos = pos_var.bind(window.shape[1] - 1)
            with Context(BEAM=beam or BEAM.value):  # 0 leaves tinygrad's own setting alone
                logits = decode(Tensor(nxt[:, None]), pos).numpy()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

# A target id that carries no loss. Not -1: tinygrad reads ignore_index=-1 as "ignore nothing".
IGNORE = -100


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


def make_train_step(model: Transformer, opt, clip: float | None = 1.0,
                    grokfast: tuple[float, float] | None = None, l2: float = 0.0):
    """One optimizer step, compiled by TinyJit: after two calls the kernels are captured and
    replayed, so Python no longer rebuilds the graph each step.

    grokfast=(alpha, lamb) amplifies the slow part of the gradient before the step, as in Grokfast
    (Lee et al., 2024): ema <- alpha ema + (1 - alpha) g, then g <- g + lamb ema. The averages
    live in tensors that the compiled step updates in place; the first gradient starts them.
    l2 adds l2 * w to every gradient after that, as torch.optim.Adam(weight_decay=l2) does: an L2
    penalty that Adam then normalizes with the rest, unlike AdamW's decoupled weight decay
    (Loshchilov & Hutter, 2019). clip=None leaves the gradient's norm alone."""
    params = opt.params
    # Realize the initial weights and optimizer state first: left lazy, their random initialization
    # joins the first step's graph, and scheduling it took 3x longer (76 s against 25 s on 2 cores).
    Tensor.realize(*get_state_dict(opt).values())
    if grokfast is not None:
        alpha, lamb = grokfast
        emas = [Tensor.zeros(*p.shape).contiguous().is_param_(False).realize() for p in params]
        started = Tensor.zeros(1).contiguous().is_param_(False).realize()  # 0 before step one

    @TinyJit
    def step(x: Tensor, y: Tensor, lr: Tensor) -> tuple[Tensor, Tensor]:
        loss = model(x).sparse_categorical_crossentropy(y, ignore_index=IGNORE)
        grads = loss.gradient(*params)
        if grokfast is not None:
            a = alpha * started  # 0 on the first step: the average starts at the first gradient
            for ema, g in zip(emas, grads):
                ema.assign(a * ema + (1 - a) * g)
            grads = [g + lamb * ema for g, ema in zip(grads, emas)]
            started.assign(Tensor.ones(1))
        if l2:
            grads = [g + l2 * p for g, p in zip(grads, params)]
        # rescale all gradients together when their global norm exceeds clip (Pascanu et al., 2013)
        norm = Tensor.stack(*[g.square().sum() for g in grads]).sum().sqrt()
        scale = (clip / (norm + 1e-6)).minimum(1.0) if clip is not None else 1.0
        for p, g in zip(params, grads):
            p.grad = g * scale
        for o in opt.optimizers:
            o.lr.assign(lr)
        state = [*emas, started] if grokfast is not None else []
        Tensor.realize(loss, norm, *opt.schedule_step(), *state)
        return loss, norm

    step.grokfast_ema = emas if grokfast is not None else None  # for tests
    return step


def save_checkpoint(path: Path, model: Transformer, opt, meta: dict):
    """Weights + optimizer state in one safetensors file, config and progress in JSON beside it.

    Both are written under temporary names, then renamed: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = dict(model.parameters())
    for i, o in enumerate(opt.optimizers):
        for j, (m, v) in enumerate(zip(o.m, o.v)):
            tensors[f"optim.{i}.m.{j}"], tensors[f"optim.{i}.v.{j}"] = m, v
        tensors[f"optim.{i}.b1_t"], tensors[f"optim.{i}.b2_t"] = o.b1_t, o.b2_t
    weights_path, meta_path = checkpoint_files(path)
    tmp_weights, tmp_meta = Path(f"{weights_path}.tmp"), Path(f"{meta_path}.tmp")
    safe_save(tensors, str(tmp_weights))
    tmp_meta.write_text(json.dumps({**meta, "config": asdict(model.config)}, indent=2))
    os.replace(tmp_weights, weights_path)
    os.replace(tmp_meta, meta_path)


def checkpoint_files(path: Path) -> tuple[Path, Path]:
    """PATH.safetensors and PATH.json (appended, so a name like run.1 keeps its dot)."""
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


class CheckpointError(Exception):
    pass


def load_checkpoint(path: Path, opt_lr: float | None = None):
    """-> (model, optimizer or None, meta). Raises CheckpointError with a one-line reason."""
    weights_path, meta_path = checkpoint_files(path)
    try:
        meta = json.loads(meta_path.read_text())
        config = Config(**meta["config"])
        tensors = safe_load(str(weights_path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    model = Transformer(config, init=False)  # every weight comes from the file
    weights = {k: v for k, v in tensors.items() if not k.startswith("optim.")}
    expected = model.parameters()
    if set(weights) != set(expected):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise CheckpointError(f"checkpoint {path} does not fit its config: "
                              f"missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in expected.items():
        if v.shape != weights[k].shape:
            raise CheckpointError(f"checkpoint {path}: {k} has shape {weights[k].shape}, "
                                  f"expected {v.shape}")
    for k, v in expected.items():
        v.replace(weights[k].to(v.device)).realize()
    opt = None
    if opt_lr is not None:
        if not isinstance(meta.get("step"), int):
            raise CheckpointError(f"checkpoint {path} does not say which step it reached")
        opt = make_optimizer(model, opt_lr)
        try:
            for i, o in enumerate(opt.optimizers):
                for j, (m, v) in enumerate(zip(o.m, o.v)):
                    m.assign(tensors[f"optim.{i}.m.{j}"].to(m.device)).realize()
                    v.assign(tensors[f"optim.{i}.v.{j}"].to(v.device)).realize()
                o.b1_t.assign(tensors[f"optim.{i}.b1_t"].to(o.b1_t.device)).realize()
                o.b2_t.assign(tensors[f"optim.{i}.b2_t"].to(o.b2_t.device)).realize()
        except KeyError as e:
            raise CheckpointError(f"checkpoint {path} has no optimizer state {e} to resume "
                                  "from") from None
    return model, opt, meta


def train(task, steps: int | None = None, seed: int = 0, out: Path | None = None,
          resume: bool = False, verbose: bool = False, config: Config | None = None,
          log=print, grokfast: tuple[float, float] | None = None) -> dict:
    """Train a model on task, evaluate it on held-out data as it goes, and return the final scores.

    The loop only needs from a task: config, batch(rng, B), evaluate(model, quick), show(model), the
    metric's name and direction, and its chance level; a new task plugs in by providing those.
    Optional: weight_decay, betas, warmup, constant_lr (a flat learning rate after warmup), l2 and
    clip (see make_train_step) for the optimizer; observe(model, step), called every eval_every
    steps to record curves, returns the progress line; a list `history` is saved with the
    checkpoint and restored on resume."""
    steps = steps if steps is not None else task.steps
    Tensor.manual_seed(seed)
    rng = np.random.default_rng(seed)
    start = 0
    weight_decay, betas = getattr(task, "weight_decay", 0.1), getattr(task, "betas", (0.9, 0.99))
    observe = getattr(task, "observe", None)
    if resume:
        model, opt, meta = load_checkpoint(out, opt_lr=task.lr)
        for o, decay in zip(opt.optimizers, (weight_decay, 0.0)):  # the task's, not the defaults
            o.wd, (o.b1, o.b2) = decay, betas
        if hasattr(task, "history"):
            task.history = meta.get("history", [])
        if meta.get("task") != task.name:
            raise CheckpointError(f"checkpoint {out} is for task {meta.get('task')!r}, "
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
        model = Transformer(config)
        opt = make_optimizer(model, task.lr, weight_decay, betas)
    c = model.config
    n_params = sum(p.numel() for p in model.parameters().values())
    log(f"task {task.name}: {n_params / 1e6:.2f}M parameters, {c.n_layer} layers, "
        f"{c.n_head} heads, {c.n_embd} dims, context {c.n_ctx}; "
        f"{steps} steps of batch {task.batch_size}")
    step_fn = make_train_step(model, opt, getattr(task, "clip", 1.0), grokfast,
                              getattr(task, "l2", 0.0))
    warmup = getattr(task, "warmup", max(1, min(100, steps // 10)))
    constant_lr = getattr(task, "constant_lr", False)
    tokens_per_step = task.batch_size * c.n_ctx
    t0 = time.perf_counter()
    for step in range(start, steps):
        x, y = task.batch(rng, task.batch_size)
        if constant_lr:
            lr = task.lr * min(1.0, (step + 1) / warmup)
        else:
            lr = learning_rate(step, task.lr, steps, warmup)
        # TRAINING only around the step: the evaluations are inference, with inference's kernels
        with Context(TRAINING=1):
            loss, norm = step_fn(Tensor(x), Tensor(y), Tensor([lr]))
        done = step + 1
        if verbose and (done % 25 == 0 or done == steps):
            elapsed = time.perf_counter() - t0
            rate = (done - start) / elapsed
            log(f"step {done:5d}/{steps}  loss {loss.item():.4f}  lr {lr:.2e}  "
                f"grad-norm {norm.item():.2f}  {rate * tokens_per_step:,.0f} tok/s  "
                f"ETA {(steps - done) / rate:.0f}s")
        if observe is not None and (done % task.eval_every == 0 or done == steps):
            line = observe(model, done)
            if verbose:
                log(line)
        elif verbose and done % task.eval_every == 0 and done != steps:
            log(f"eval  step {done}: {task.metric} {task.evaluate(model, quick=True):.4f}")
    elapsed = time.perf_counter() - t0
    score = task.evaluate(model)
    if out is not None:
        meta = {"task": task.name, "step": steps, "seed": seed}
        if hasattr(task, "history"):
            meta["history"] = task.history
        save_checkpoint(out, model, opt, meta)
        log(f"saved {checkpoint_files(out)[0]}")
    return {"model": model, "score": score, "steps": steps, "time": elapsed}


def verdict(task, score: float) -> bool:
    """Did the model learn? Each task judges its own score (tasks.py)."""
    return task.learned(score)


def show_attention(task, path: Path, folder: Path, layer=None, head=None, tokens=None):
    """Every view of the checkpoint's attention on one held-out example of task (heads.py), the
    head scores, and what the task can say about its heads (e.g. Reverse's mirror heads)."""
    import heads

    model, _, meta = load_checkpoint(path)
    if meta.get("task") != task.name:
        raise CheckpointError(f"checkpoint {path} is for task {meta.get('task')!r}, "
                              f"not {task.name!r}")
    ids, labels = task.example()
    written, report = heads.inspect_model(model, ids, labels, folder, f"{task.name} model",
                                          tokens, layer, head)
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    print(report)
    if hasattr(task, "explain"):
        print(task.explain(model))


# ---------------------------------------------------------------------------------------------
# Speed at the edges: kernels kept between runs, run on all cores, replayed as one loop
# ---------------------------------------------------------------------------------------------


class _KeptKernels(dict):
    """tinygrad's in-memory table of generated kernels (to_program_cache), backed by its on-disk
    cache: a kernel generated once is read back in later processes instead of generated again."""

    @staticmethod
    def disk_key(key: tuple) -> str:
        # (the kernel's structural hash, renderer class, target, codegen settings); the class is
        # named, not pickled, so the key stays the same from one process to the next
        ast_key, renderer, *rest = key
        return hashlib.sha256(pickle.dumps((ast_key, renderer.__module__, renderer.__qualname__,
                                            *rest))).hexdigest()

    def __contains__(self, key) -> bool:
        if dict.__contains__(self, key):
            return True
        try:
            program = diskcache_get(KEPT_KERNELS_TABLE, self.disk_key(key))
        except Exception:  # written by another tinygrad, or damaged: generate it again
            program = None
        if program is None:
            return False
        dict.__setitem__(self, key, program)
        return True

    def get(self, key, default=None):  # how to_program looks (the device's own small programs)
        return dict.__getitem__(self, key) if key in self else default

    def __setitem__(self, key, program):
        dict.__setitem__(self, key, program)
        diskcache_put(KEPT_KERNELS_TABLE, self.disk_key(key), program)


# generated code depends on the tinygrad that generated it
KEPT_KERNELS_TABLE = f"tinygpt_program_{version('tinygrad')}"


def keep_kernels():
    """Make tinygrad keep the code it generates for each kernel on disk, beside its compiled
    binaries (~/.cache/tinygrad/cache.db; CACHELEVEL=0 turns both off).

    tinygrad 0.14 caches compiled binaries between runs, but regenerates every kernel's code in
    each new process: 201 kernels took 17 s of `transformer.py -v`'s 38 s on one core. Read back
    from disk, the reversal model's first step took 2.3 s instead of 8 on clang. Idempotent; the
    CLIs and bench.py call it, a library user may."""
    import tinygrad.codegen
    import tinygrad.engine.realize

    if not isinstance(tinygrad.engine.realize.to_program_cache, _KeptKernels):
        kept = _KeptKernels(tinygrad.engine.realize.to_program_cache)
        tinygrad.engine.realize.to_program_cache = tinygrad.codegen.to_program_cache = kept


class _Cores:
    """Helper threads, one per core beyond the first; each runs the kernel chunks it is handed."""

    def __init__(self):
        self.helpers: list[tuple[SimpleQueue, SimpleQueue]] = []  # (jobs, results) per thread
        self.lock = threading.Lock()  # one kernel at a time, whichever Python thread launches it
        self.handed = 0  # chunks run on helpers so far (for tests)
        os.register_at_fork(after_in_child=self.helpers.clear)  # threads do not survive a fork

    @staticmethod
    def serve(jobs: SimpleQueue, results: SimpleQueue):
        while True:
            fxn, args = jobs.get()
            try:
                results.put(fxn(*args))
            except BaseException as e:  # handed back, raised on the launching thread
                results.put(e)

    def run(self, fxn, chunks: list[list]):
        """fxn(*chunk) for every chunk at the same time: the first here, the others on helpers."""
        if len(chunks) == 1:
            return fxn(*chunks[0])
        with self.lock:
            while len(self.helpers) < len(chunks) - 1:
                self.helpers.append((jobs := SimpleQueue(), results := SimpleQueue()))
                threading.Thread(target=self.serve, args=(jobs, results), daemon=True).start()
            for (jobs, _), args in zip(self.helpers, chunks[1:]):
                jobs.put((fxn, args))
            self.handed += len(chunks) - 1
            try:
                fxn(*chunks[0])
            finally:  # every helper's answer is taken, so none is left over for the next kernel
                errors = [results.get() for _, results in self.helpers[: len(chunks) - 1]]
        for e in errors:
            if isinstance(e, BaseException):
                raise e


_CORES = _Cores()


def chunk_args(args: list[int], core: int | None, n: int) -> list[list[ctypes.c_uint64]]:
    """A compiled CPU kernel's arguments for each of its n chunks: the same, but for the
    chunk's number at position `core` (tinygrad's core_id; None: the kernel is not split)."""
    return [[ctypes.c_uint64(tid if i == core else a) for i, a in enumerate(args)]
            for tid in range(n)]


def run_on_all_cores():
    """Run the chunks of each CPU kernel on all cores at once.

    tinygrad 0.14 splits a large CPU kernel (128K operations per core or more) into one chunk
    per core, told apart by a `core_id` argument, then calls the chunks one after another on
    one thread. Here chunk 0 runs on the calling thread and the others on helper threads at the
    same time: ctypes lets go of Python's lock while compiled code runs. The chunks write
    disjoint outputs, so results are bit for bit the same. Training steps on the 2-core build
    machine (bench.py): 45 -> 40 ms for the reversal model, 810 -> 480 ms for modular addition
    at p=113. Idempotent; use_device calls it."""
    from tinygrad.runtime.ops_cpu import CPUProgram

    serial = CPUProgram.__call__
    if getattr(serial, "all_cores", False):
        return

    def call(self, *bufs, global_size=(1, 1, 1), local_size=(1, 1, 1), vals=(), wait=False,
             timeout=None):
        slot = self.runtimevars.get("core_id")
        if slot is None or self.lvp or global_size[0] == 1:
            return serial(self, *bufs, global_size=global_size, local_size=local_size, vals=vals,
                          wait=wait, timeout=timeout)
        start = time.perf_counter()
        _CORES.run(self.fxn, chunk_args([*(b.va_addr for b in bufs), *vals], slot, global_size[0]))
        return time.perf_counter() - start if wait else None

    call.all_cores = True
    CPUProgram.__call__ = call


class CPUGraph(GraphRunner):
    """TinyJit's replay of a run of CPU kernels as one loop over prepared calls.

    tinygrad 0.14 batches the kernels of a captured function into graphs on GPUs; on the CPU it
    replays them one by one through its generic path, 30 to 50 µs of Python per kernel (resolving
    buffers, launch sizes, arguments) besides the kernel's run: a quarter to a third of the
    reversal model's step. Here each kernel's function and arguments are prepared once; a replay
    writes in the buffers and variable values that change between calls, then calls the
    functions in order (the chunks of split ones on all cores, as run_on_all_cores does).
    Training steps 18 to 26 % faster on the 2-core build machine; every number the same to the
    bit."""

    replays = 0  # calls of any CPUGraph so far (for tests)

    def __init__(self, linear: UOp, input_uops: tuple[UOp, ...] = ()):
        super().__init__(linear, input_uops)
        self.launches = []  # per kernel: (compiled function, argument list per chunk)
        self.patches = []  # (kernel, argument, input slot): buffers that change between calls
        self.first_var = []  # per kernel: where its variables start among its arguments
        zeros = {v: 0 for v in self.vars}
        for j, ((_, program, bufs, device_vars), runtime) in enumerate(zip(self.calls,
                                                                           self.runtimes)):
            info = program.arg
            kernel_bufs = [bufs[i] for i in info.globals]
            args = [b.get_buf(b.device).va_addr for b in kernel_bufs]
            args += [device_vars.get(v.expr, 0) for v in info.vars]
            core = runtime.runtimevars.get("core_id")
            n = info.launch_dims(zeros)[0][0] if core is not None else 1
            self.launches.append((runtime.fxn, chunk_args(args, core, n)))
            self.patches += [(j, k, slot) for p, slot in self.uop_replace[j]
                             for k, g in enumerate(info.globals) if g == p]
            self.first_var.append(len(kernel_bufs))

    def __call__(self, input_uops: tuple[UOp, ...], var_vals: dict[str, int], wait=False):
        for j, k, slot in self.patches:
            buf = input_uops[slot].buffer
            address = ctypes.c_uint64(buf.get_buf(buf.device).va_addr)
            for chunk in self.launches[j][1]:
                chunk[k] = address
        for j, i, value in self.updated_vars(var_vals):
            for chunk in self.launches[j][1]:
                chunk[self.first_var[j] + i] = ctypes.c_uint64(value)
        start = time.perf_counter()
        for fxn, chunks in self.launches:
            _CORES.run(fxn, chunks)
        GlobalCounters.kernel_count += len(self.launches) - 1  # tinygrad counts a graph as one
        CPUGraph.replays += 1
        return time.perf_counter() - start if wait else None

    @staticmethod
    def supports_uop(batch_devs, call: UOp) -> bool:
        """A compiled kernel on the batch's one device, launched over a fixed number of chunks,
        whose arguments are whole buffers (a view of a changing input would not be patched)."""
        program = call.src[0]
        return (program.op is Ops.PROGRAM
                and len(GraphRunner._all_devs(batch_devs, call)) == 1
                and all(isinstance(n, int) for n in program.arg.global_size)
                and all(u.op in (Ops.BUFFER, Ops.PARAM) or Ops.PARAM not in {s.op for s in u.src}
                        for u in get_call_arg_uops(call)))


def batch_cpu_kernels():
    """Let TinyJit replay the default device's kernels through CPUGraph, if it is a CPU.
    Idempotent; use_device calls it."""
    from tinygrad import Device
    from tinygrad.runtime.ops_cpu import CPUDevice

    device = Device[Device.DEFAULT]
    if isinstance(device, CPUDevice) and type(device.renderer).__name__ != "LVPRenderer":
        device.graph = CPUGraph


def use_device(device: str | None = None) -> str:
    """Choose the tinygrad backend: `device` (a --device flag) if given, else DEV, else the
    fastest measured here. Opens it, so a backend that cannot run fails now; returns its name.

    tinygrad picks a GPU backend when there is one, else OpenCL, else the CPU with clang. On a CPU
    (no GPU backend, or OpenCL served by PoCL on the CPU) this picks the CPU with LLVM code
    generation when libLLVM is installed (setup.sh does): `transformer.py -v` takes 34 s on an
    empty kernel cache and 15 s on a warm one on the 2-core build machine, against 95 s and 15 s
    through PoCL and 38 s and 18 s with clang, and its training steps are the fastest of the
    three (README, Backends). DEV=CL or --device CL picks PoCL. On a CPU backend it also runs
    kernels on all cores and replays TinyJit's kernels through CPUGraph."""
    from tinygrad import Device
    from tinygrad.helpers import DEV

    if device:
        DEV.value = device.upper()
    elif not os.environ.get("DEV"):
        auto = Device.DEFAULT
        on_cpu = auto == "CPU" or (auto == "CL" and "pthread" in Device["CL"].device_name)
        if on_cpu and llvm_available():
            DEV.value = "CPU:LLVM"
    # PoCL's compiler prints "1 warning generated." for each new kernel (tinygrad's generated
    # code has "((a == b))"); -w keeps stderr for messages that matter
    os.environ.setdefault("POCL_EXTRA_BUILD_FLAGS", "-w")
    run_on_all_cores()
    batch_cpu_kernels()
    renderer = type(Device[Device.DEFAULT].renderer).__name__
    return f"{Device.DEFAULT} ({renderer})"


def llvm_available() -> bool:
    """Is there a libLLVM that tinygrad 0.14 loads and can compile with (16 or newer)?"""
    try:
        from tinygrad.runtime.autogen import llvm

        dll = llvm.dll
        if dll.nm not in dll._loaded_:  # tinygrad found no libLLVM; it fails on first use
            return False
        found = re.search(r"(?:LLVM-|llvm@)(\d+)", dll._name)
    except Exception:
        return False
    # tinygrad loads LLVM 14 and 15 too, then fails to compile with them
    return found is None or int(found.group(1)) >= 16


def exit_now(code: int | None):
    """End a CLI process without Python's teardown, which frees tinygrad's graphs and caches one
    object at a time: 1.2 s after every run, 6 % of the 19 s demo. The exit handlers (tinygrad's
    device finalizers) still run and the output streams are flushed; files are all closed by then
    (checkpoints are renamed into place, the kernel cache commits each write)."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def main(argv=None) -> int:
    import argparse

    from tasks import TASKS, DataError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="reverse", help=f"one of {', '.join(TASKS)}")
    ap.add_argument("--steps", type=int, help="training steps (default: the task's budget)")
    ap.add_argument("--lr", type=float, help="peak learning rate (default: the task's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", help="local text file for a task that reads one (default: download)")
    ap.add_argument("--out", type=Path, help="checkpoint path, no suffix (default: models/TASK)")
    ap.add_argument("--resume", action="store_true", help="continue training from --out")
    ap.add_argument("--sample", action="store_true", help="generate from the saved checkpoint")
    ap.add_argument("--n-layer", type=int)
    ap.add_argument("--n-head", type=int)
    ap.add_argument("--n-embd", type=int)
    ap.add_argument("--positions", choices=["learned", "sinusoidal"])
    ap.add_argument("--post-ln", action="store_true", help="post-LN blocks as in the 2017 paper")
    ap.add_argument("--ablate", action="append", default=[], metavar="NAME",
                    help=f"take a part away: {', '.join(ABLATIONS)} (repeat or comma-separate)")
    ap.add_argument("--similarity", default="scaled",
                    help=f"how a query scores a key: {', '.join(SIMILARITIES)} (default scaled)")
    ap.add_argument("--attention", nargs="?", const="", metavar="DIR",
                    help="draw every head of the saved checkpoint on a held-out example, score "
                         "the heads (files in DIR, default attention/TASK)")
    ap.add_argument("--layer", type=int, help="with --attention and --head: one head, large")
    ap.add_argument("--head", type=int, help="with --attention and --layer: one head, large")
    ap.add_argument("--tokens", metavar="A:B", help="with --attention: show tokens A to B only")
    ap.add_argument("--weight-decay", type=float, metavar="X",
                    help="AdamW weight decay on matrices and embeddings (default: the task's)")
    ap.add_argument("--l2", type=float, metavar="X",
                    help="add X times each weight to its gradient, an L2 penalty as in "
                         "torch.optim.Adam (default: the task's, 0 for most)")
    ap.add_argument("--grokfast", nargs="?", const="2", metavar="LAMBDA",
                    help="amplify the slow part of the gradient by LAMBDA (default 2; EMA 0.98)")
    ap.add_argument("--plot", type=Path, help="where a task with curves draws them "
                    "(default: the checkpoint path with .png)")
    ap.add_argument("--device", help="tinygrad backend: CPU, CPU:LLVM, CL, CUDA, METAL, ... "
                                     "(default: DEV, else the fastest here)")
    ap.add_argument("-v", "--verbose", action="store_true", help="progress, evals and samples")
    # argparse's own errors (a missing value, a word where a number goes) as one error line too
    ap.error = lambda message: sys.exit(print(f"error: {message}", file=sys.stderr) or 2)
    args = ap.parse_args(argv)
    keep_kernels()

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    if args.task not in TASKS:
        return fail(f"unknown task {args.task!r}; choose one of {', '.join(TASKS)}")
    if args.steps is not None and args.steps < 1:
        return fail(f"--steps must be at least 1, got {args.steps}")
    reads_data = getattr(TASKS[args.task], "reads_data", False)
    if args.data is not None and not reads_data:
        return fail(f"--data is for tasks that read a text; task {args.task!r} makes its own")
    try:
        task = TASKS[args.task](data=args.data) if reads_data else TASKS[args.task]()
    except DataError as e:
        return fail(str(e))
    if args.lr is not None:
        if not 0 < args.lr < math.inf:
            return fail(f"--lr must be a positive finite number, got {args.lr}")
        task.lr = args.lr
    if args.weight_decay is not None:
        if not 0 <= args.weight_decay < math.inf:
            return fail(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
        task.weight_decay = args.weight_decay  # train() reads it from the task
    if args.l2 is not None:
        if not 0 <= args.l2 < math.inf:
            return fail(f"--l2 must be a finite number >= 0, got {args.l2}")
        task.l2 = args.l2
    grokfast = None
    if args.grokfast is not None:
        try:
            lamb = float(args.grokfast)
        except ValueError:
            lamb = math.nan
        if not 0 < lamb < math.inf:
            return fail(f"--grokfast takes a positive amplification LAMBDA, got {args.grokfast!r}")
        grokfast = (0.98, lamb)  # Lee et al.'s EMA for modular arithmetic
    if args.plot is not None and not hasattr(task, "plot"):
        return fail(f"--plot is for tasks that record curves; task {args.task!r} draws none")
    ablations = [name.strip() for arg in args.ablate for name in arg.split(",") if name.strip()]
    for name in ablations:
        if name not in ABLATIONS:
            return fail(f"unknown ablation {name!r}; choose from {', '.join(ABLATIONS)}")
    if args.similarity not in SIMILARITIES:
        return fail(f"unknown similarity {args.similarity!r}; choose one of "
                    f"{', '.join(SIMILARITIES)}")
    try:  # after the checks of the arguments: opening a backend takes a moment
        device = use_device(args.device)
    except Exception as e:
        return fail(f"device {args.device or os.environ.get('DEV')!r} is not usable here: {e}")
    out = args.out or Path(__file__).parent / "models" / task.name
    log = print if args.verbose else (lambda *a, **k: None)
    log(f"device {device}")
    try:
        if args.sample:
            model, _, meta = load_checkpoint(out)
            print(task.show(model))
            return 0
        if args.attention is not None:
            folder = Path(args.attention or Path("attention") / task.name)
            show_attention(task, out, folder, args.layer, args.head, args.tokens)
            return 0
        overrides = {k: v for k, v in (("n_layer", args.n_layer), ("n_head", args.n_head),
                                       ("n_embd", args.n_embd), ("positions", args.positions))
                     if v is not None}
        if args.post_ln:
            overrides["prenorm"] = False
        for name in ablations:
            overrides.update(ABLATIONS[name])
        overrides["similarity"] = args.similarity
        config = replace(task.config, **overrides)
        if args.verbose and hasattr(task, "baselines"):
            log(f"baselines: {task.baselines()}")
        result = train(task, args.steps, args.seed, out, args.resume, args.verbose, config, log,
                       grokfast)
        if hasattr(task, "plot"):
            # the figure names its run by the flags that change what is learned
            run = f"python transformer.py --task {args.task} --seed {args.seed}"
            for flag, value in (("--steps", args.steps), ("--lr", args.lr),
                                ("--weight-decay", args.weight_decay), ("--l2", args.l2),
                                ("--grokfast", args.grokfast), ("--ablate", ",".join(ablations))):
                if value not in (None, ""):
                    run += f" {flag} {value}"
            log(f"wrote {task.plot(args.plot or out.with_name(out.name + '.png'), run)}")
    except (CheckpointError, ValueError, OSError) as e:
        return fail(str(e))
    log("samples:\n" + task.show(result["model"]))
    if hasattr(task, "mask_check"):
        log(task.mask_check(result["model"]))
    ok = verdict(task, result["score"])
    log(f"verdict: {task.metric} {result['score']:.4f} against chance {task.chance:.4g}: "
        f"{'learned' if ok else 'did NOT learn'}")
    extra = task.result_fields() if hasattr(task, "result_fields") else ""
    print(f"result: task={task.name} {task.metric}={result['score']:.4f} chance={task.chance:.4g} "
          f"steps={result['steps']} time={result['time']:.1f}s" + (f" {extra}" if extra else ""))
    return 0


if __name__ == "__main__":
    exit_now(main())
