"""A decoder-only transformer written out on tinygrad: the building blocks, in the order the
ideas build, from which families.py also makes an encoder and the 2017 encoder-decoder.

It follows "Attention Is All You Need" (Vaswani et al., 2017) for scaled dot-product and
multi-head attention, cross-attention and sinusoidal positions, and GPT-2 (Radford et al., 2019)
for the pre-LayerNorm block, learned positions and weight names: gpt.py builds GPT-2 from these
classes, so the names (wte, wpe, h, ln_1, attn.c_attn, ...) are those of OpenAI's checkpoint.

Read top to bottom: attention (four similarity functions), one head, multi-head, self- and
cross-attention with the KV cache, LayerNorm, MLP, positions, the block, the config and its
ablations, the model. GPT-2's forward pass is Transformer.__call__ and what it calls. Every
activation a tool reads has a named hook point (TransformerLens's names; hooks.py):

    logits, cache = model.run_with_cache(ids, ["blocks.0.attn.hook_pattern"])
    logits = model.run_with_hooks(ids, {"blocks.1.attn.hook_z": lambda z: z * 0})

generate.py samples with the KV cache; train.py is the command line:

    python transformer.py -v                        # learn to reverse digit strings: exact match
    python transformer.py --task shakespeare -v     # character-level tinyshakespeare: val loss
    python transformer.py --attention               # every head of the saved checkpoint, drawn
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tinygrad import Tensor, nn
from tinygrad.helpers import TRAINING
from tinygrad.nn.state import get_state_dict

from hooks import Hooked, HookPoint  # HookPoint: the identity, until a hook reads or replaces

# ------------------------------ Attention --------------------------------------------------------


def causal_mask(T: int, S, start_pos=0, device=None) -> Tensor:
    """Additive mask (T, S): 0 where query t (at start_pos + t) may see key s, -inf after.
    device: the queries' (a tuple for a batch sharded across devices, train.py --devices)."""
    mask = Tensor.full((T, S), float("-inf")).triu(start_pos + 1)
    # contiguous: made once, where tinygrad would remake it inside the kernels that read the
    # scores, with a branch for each element (speed: docs/speed.md)
    return (mask if device is None else mask.to(device)).contiguous()


# How much a query wants a key: four similarity functions (GPT-2's is scaled; --similarity NAME
# compares), each q (..., H, T, hs) and k (..., H, S, hs) -> scores (..., H, T, S).


def dot_scores(q: Tensor, k: Tensor) -> Tensor:
    """qᵀk (Luong et al., 2015, "dot"): one matmul, no parameters. Its variance grows with the
    head size, so with wide heads the softmax saturates and its gradients vanish."""
    return q @ k.transpose(-2, -1)  # (..., H, T, S)


def scaled_scores(q: Tensor, k: Tensor) -> Tensor:
    """qᵀk / √d (Vaswani et al., 2017, section 3.2.1): the dot product at unit variance, so the
    softmax does not saturate; the same cost. GPT-2's, and the default."""
    return dot_scores(q, k) / math.sqrt(q.shape[-1])


def general_scores(q: Tensor, k: Tensor, w: Tensor) -> Tensor:
    """qᵀWk with a learned W per head, w (H, hs, hs) (Luong et al., 2015, "general"): W_Q and
    W_K already make q and k, so W adds no power; it is the bilinear form written out."""
    return (q @ w) @ k.transpose(-2, -1)


def additive_scores(q: Tensor, k: Tensor, w_q: Tensor, w_k: Tensor, v: Tensor) -> Tensor:
    """vᵀ tanh(W_q q + W_k k) (Bahdanau et al., 2015), w_q and w_k (H, hs, hs), v (H, hs): a small
    MLP on every (query, key) pair, a (T, S, hs) tensor per head: the costliest similarity."""
    H, hs = v.shape
    pairs = (q @ w_q).unsqueeze(-2) + (k @ w_k).unsqueeze(-3)  # (..., H, T, S, hs)
    return (pairs.tanh() * v.reshape(H, 1, 1, hs)).sum(-1)  # (..., H, T, S)


SIMILARITIES = ("scaled", "dot", "general", "additive")


def attention_weights(q: Tensor, k: Tensor, mask: Tensor | None = None,
                      similarity=scaled_scores) -> Tensor:
    """softmax(similarity(q, k) + mask), q (..., T, d), k (..., S, d) -> (..., T, S). Row t says
    how much query t takes from each key: it sums to 1, and the mask zeroes the future."""
    scores = similarity(q, k)  # (..., T, S)
    if mask is not None:
        scores = scores + mask
    # the softmax written out: the largest score subtracted first, so that exp cannot overflow,
    # and the exponentials stored once (contiguous), where tinygrad's own softmax computes them
    # again in the sum and in the division (speed: docs/speed.md)
    e = (scores - scores.max(-1, keepdim=True)).exp().contiguous()  # (..., T, S)
    return (e / e.sum(-1, keepdim=True)).contiguous()


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ / √d + mask) v, q (..., T, d), k, v (..., S, d) -> (..., T, d): the values
    averaged with attention_weights."""
    return attention_weights(q, k, mask) @ v


# x @ W.T, q @ kᵀ: tinygrad's products, for which runtime.install() may swap in a CPU kernel


class Linear:
    """y = x Wᵀ + b with W stored (out, in), as in PyTorch: each output's weights lie together,
    so decoding's matrix-vector products read memory in order, faster on a CPU than GPT-2's
    Conv1D layout (in, out), which gpt.py transposes once at load time."""

    def __init__(self, n_in: int, n_out: int, bias: bool = True, std: float = 0.02, init=True):
        # init=False: unset, for a caller that loads them (drawing GPT-2's random weights only to
        # overwrite them takes time; docs/speed.md)
        self.weight = Tensor.normal(n_out, n_in, std=std) if init else Tensor.empty(n_out, n_in)
        self.bias = Tensor.zeros(n_out) if bias else None

    def __call__(self, x: Tensor) -> Tensor:
        # Materialize input and gradient: fused into a matmul, each output column recomputes them
        return x.contiguous().linear(self.weight.T, self.bias).contiguous_backward()


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


def padding_mask(idx: Tensor, pad_id: int) -> Tensor:
    """Additive mask (B, 1, 1, S) for key ids idx (B, S): -inf at padding, so no query takes
    anything from a pad (BERT's attention_mask, PyTorch's key_padding_mask)."""
    B, S = idx.shape
    return (idx == pad_id).where(float("-inf"), 0.0).reshape(B, 1, 1, S)  # (B, 1, 1, S)


class MultiHeadAttention:
    """What self- and cross-attention share: n_head heads attend independently, each in its own
    slice of the features, and c_proj mixes their outputs (Vaswani et al., section 3.2.2).
    Hook points: hook_q, hook_k, hook_v (B, T, H, hs), hook_pattern (B, H, T, S), hook_z (each
    head's output before c_proj, B, T, H, hs)."""

    def __init__(self, n_embd: int, n_head: int, n_layer: int = 1, init=True,
                 similarity: str = "scaled"):
        assert n_embd % n_head == 0, f"{n_embd=} is not divisible by {n_head=}"
        self.n_head, self.similarity = n_head, similarity
        # init / sqrt(2 n_layer): the residual's variance does not grow with depth (GPT-2, 2.3)
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
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_pattern, self.hook_z = HookPoint(), HookPoint()

    def split_heads(self, x: Tensor, hook: HookPoint) -> Tensor:
        """(B, T, C) -> (B, H, T, C // H): each head gets its own slice of the features."""
        B, T, C = x.shape
        return hook(x.reshape(B, T, self.n_head, C // self.n_head)).transpose(1, 2)  # (B, H, T, hs)

    def scores(self, q: Tensor, k: Tensor) -> Tensor:
        """This layer's similarity of every query to every key, (B, H, T, S)."""
        if self.similarity == "scaled":
            return scaled_scores(q, k)
        if self.similarity == "dot":
            return dot_scores(q, k)
        if self.similarity == "general":
            return general_scores(q, k, self.w_general)
        return additive_scores(q, k, self.w_q_add, self.w_k_add, self.v_add)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """q (B, H, T, hs), k and v (B, H, S, hs) -> (B, T, C): the heads' outputs, mixed."""
        B, H, T, hs = q.shape
        att = self.hook_pattern(attention_weights(q, k, mask, self.scores))  # (B, H, T, S)
        z = self.hook_z((att @ v).transpose(1, 2))  # (B, T, H, hs)
        return self.c_proj(z.reshape(B, T, H * hs))  # (B, T, C): heads side by side, mixed

    def share(self, other: MultiHeadAttention):
        """Use other's weights (--ablate shared-layers); the KV cache stays this layer's own."""
        for name in ("q_attn", "c_attn", "c_proj", "w_general", "w_q_add", "w_k_add", "v_add"):
            if hasattr(other, name):
                setattr(self, name, getattr(other, name))


class CausalSelfAttention(MultiHeadAttention):
    """Self-attention: one matmul makes q, k and v of every head (GPT-2's c_attn), and the causal
    mask keeps each query from its future. With start_pos, earlier keys and values come from a
    cache, so decoding a token costs one row of attention, not the whole prefix again."""

    def __init__(self, n_embd: int, n_head: int, n_ctx: int, n_layer: int = 1, init=True,
                 causal: bool = True, similarity: str = "scaled"):
        self.c_attn = Linear(n_embd, 3 * n_embd, init=init)  # drawn before c_proj, as always
        super().__init__(n_embd, n_head, n_layer, init, similarity)
        self.n_ctx, self.causal = n_ctx, causal  # causal=False: an encoder, or --ablate no-mask
        self.cache_kv: Tensor | None = None

    def __call__(self, x: Tensor, start_pos=None, pad: Tensor | None = None) -> Tensor:
        """pad: a padding_mask of x's tokens, for an encoder whose batch is padded."""
        B, T, C = x.shape
        # contiguous_backward: q, k and v's gradients written once each, not recomputed per column
        q, k, v = [t.contiguous_backward() for t in self.c_attn(x).split(C, dim=-1)]  # (B, T, C)
        q, k, v = [self.split_heads(t, hook) for t, hook in
                   ((q, self.hook_q), (k, self.hook_k), (v, self.hook_v))]  # each (B, H, T, hs)
        if start_pos is None:
            mask = causal_mask(T, T, device=x.device)
        else:
            k, v = self.remember(k, v, start_pos)  # (B, H, start_pos + T, hs)
            # one new query may look at every cached key, so a single step needs no mask
            mask = causal_mask(T, start_pos + T, start_pos) if T > 1 else None
        if not self.causal:
            mask = None  # every token sees every other, its future included
        if pad is not None:
            mask = pad if mask is None else mask + pad  # broadcast over heads and queries
        return self.attend(q, k, v, mask)

    def remember(self, k: Tensor, v: Tensor, start_pos) -> tuple[Tensor, Tensor]:
        """Write this call's keys and values at start_pos and return everything cached so far."""
        B, H, T, hs = k.shape
        # in the weights' precision: float16 weights (--half) keep float16 keys and values, half
        # the bytes that each step reads back (as llama.cpp's cache does)
        dtype = self.c_attn.weight.dtype
        if self.cache_kv is None or self.cache_kv.shape[1] != B or self.cache_kv.dtype != dtype:
            # empty, not zeros: every position is written before it is read, and needs no kernel
            cache = Tensor.empty(2, B, H, self.n_ctx, hs, dtype=dtype)
            self.cache_kv = cache.is_param_(False)  # state, not a weight: kept out of checkpoints
        end = start_pos + T
        # (2, B, H, T, hs)
        self.cache_kv[:, :, :, start_pos:end].assign(Tensor.stack(k, v).cast(dtype))
        return self.cache_kv[0, :, :, :end], self.cache_kv[1, :, :, :end]


class CrossAttention(MultiHeadAttention):
    """The encoder-decoder's bridge (Vaswani et al., section 3.2.3): q from the decoder, k and v
    from the encoder's output, which every position may read whole but for its padding. Names as
    in Hugging Face's GPT-2 with add_cross_attention: q_attn for q, c_attn for k and v."""

    def __init__(self, n_embd: int, n_head: int, n_layer: int = 1, init=True):
        self.q_attn = Linear(n_embd, n_embd, init=init)
        self.c_attn = Linear(n_embd, 2 * n_embd, init=init)
        super().__init__(n_embd, n_head, n_layer, init)
        self.source_kv = None  # [source, its keys, its values] while decoding

    def keys_values(self, memory: Tensor) -> list[Tensor]:
        """The encoder's output (B, S, C) -> keys and values, each (B, H, S, hs)."""
        B, S, C = memory.shape
        k, v = self.c_attn(memory).split(C, dim=-1)  # each (B, S, C)
        return [self.split_heads(k, self.hook_k), self.split_heads(v, self.hook_v)]

    def __call__(self, x: Tensor, source: tuple[Tensor, Tensor | None], start_pos=None) -> Tensor:
        """x (B, T, C); source: the encoder's output (B, S, C) and its padding_mask or None."""
        memory, pad = source
        if start_pos is None:  # a whole pass, as in training: nothing is kept
            k, v = self.keys_values(memory)
        else:
            if self.source_kv is None or self.source_kv[0] is not memory:  # once per source
                kv = [t.realize() for t in self.keys_values(memory)]
                # state, not weights: kept out of checkpoints and optimizers
                self.source_kv = [t.is_param_(False) for t in (memory, *kv)]
            _, k, v = self.source_kv
        q = self.split_heads(self.q_attn(x), self.hook_q)  # (B, H, T, hs)
        return self.attend(q, k, v, pad)


# ------------------------------ The rest of a block: LayerNorm, the MLP, positions ---------------


class LayerNorm:
    """Normalize each position's features to mean 0 and variance 1, then scale and shift. The
    variance is the biased one (divide by C, not C - 1), as in Ba et al. (2016) and PyTorch.
    hook_scale: each position's divisor √(var + eps), (B, T, 1), as TransformerLens's."""

    def __init__(self, n_embd: int, eps: float = 1e-5):
        self.weight, self.bias, self.eps = Tensor.ones(n_embd), Tensor.zeros(n_embd), eps
        self.hook_scale = HookPoint()

    def __call__(self, x: Tensor) -> Tensor:
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        scale = self.hook_scale((var + self.eps).sqrt())  # (B, T, 1)
        return (x - mean) / scale * self.weight + self.bias


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
    """(n_ctx, n_embd) table: PE[p, 2i] = sin(p / 10000^(2i/C)), PE[p, 2i+1] = cos(same). Fixed:
    each pair of features is a clock at its own frequency (Vaswani et al., section 3.5)."""
    pos = np.arange(n_ctx)[:, None]
    freq = 10000.0 ** (-np.arange(0, n_embd, 2) / n_embd)
    table = np.zeros((n_ctx, n_embd), dtype=np.float32)
    table[:, 0::2] = np.sin(pos * freq)
    table[:, 1::2] = np.cos(pos * freq)[:, : n_embd // 2]
    return Tensor(table)


class Block:
    """Attention then MLP, each a residual branch added to the stream. Pre-LN (GPT-2) normalizes
    each branch's input, x + f(ln(x)); post-LN (2017) the sum, ln(x + f(x)), less stable without
    warmup (Xiong et al., 2020). Config(cross=True): cross-attention between the two, the
    decoder block of the encoder-decoder (section 3.1); Config(mlp=False): attention only, where
    Olsson et al. (2022) watch induction heads form; Config(layernorm=False): no LayerNorms.
    Hook points: the stream before, between and after (hook_resid_pre, hook_resid_mid,
    hook_resid_post), and what each branch adds (hook_attn_out, hook_cross_out, hook_mlp_out)."""

    def __init__(self, config: Config, init=True):
        c = config
        self.prenorm, self.residual = c.prenorm, c.residual
        self.ln_1 = LayerNorm(c.n_embd, c.ln_eps) if c.layernorm else None
        self.attn = CausalSelfAttention(c.n_embd, c.n_head, c.n_ctx, c.n_layer, init, c.causal,
                                        c.similarity)
        self.ln_cross_attn = LayerNorm(c.n_embd, c.ln_eps) if c.layernorm and c.cross else None
        cross = CrossAttention(c.n_embd, c.n_head, c.n_layer, init) if c.cross else None
        self.crossattention = cross
        self.ln_2 = LayerNorm(c.n_embd, c.ln_eps) if c.layernorm and c.mlp else None
        self.mlp = MLP(c.n_embd, c.n_layer, init) if c.mlp else None
        self.hook_resid_pre, self.hook_resid_mid, self.hook_resid_post = [HookPoint()
                                                                          for _ in range(3)]
        # a hook point for each branch there is: one that never runs would fail silently
        self.hook_attn_out = HookPoint()
        self.hook_cross_out = HookPoint() if c.cross else None
        self.hook_mlp_out = HookPoint() if c.mlp else None

    def __call__(self, x: Tensor, start_pos=None, pad: Tensor | None = None,
                 source: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
        """pad: an encoder batch's padding_mask; source: the encoder's output and its mask."""
        x = self.hook_resid_pre(x)  # (B, T, C)
        x = self.branch(x, self.ln_1, lambda h: self.hook_attn_out(self.attn(h, start_pos, pad)))
        if self.crossattention is not None:
            x = self.branch(x, self.ln_cross_attn, lambda h: self.hook_cross_out(
                self.crossattention(h, source, start_pos)))
        x = self.hook_resid_mid(x)
        if self.mlp is not None:
            x = self.branch(x, self.ln_2, lambda h: self.hook_mlp_out(self.mlp(h)))
        return self.hook_resid_post(x)

    def branch(self, x: Tensor, ln: LayerNorm | None, f) -> Tensor:
        """One residual branch f around the stream x: x + f(ln(x)) (pre-LN), ln(x + f(x))
        (post-LN), or without the skip (--ablate no-residual) f(ln(x)) or ln(f(x))."""
        norm = (lambda h: h) if ln is None else ln
        if not self.residual:  # each branch replaces the stream
            return f(norm(x)) if self.prenorm else norm(f(x))
        return x + f(norm(x)) if self.prenorm else norm(x + f(x))

    def share(self, other: Block):
        """Use other's weights (--ablate shared-layers): a deeper network, no more parameters.
        The LayerNorms share their weights, not themselves: each block keeps its hook points."""
        for name in ("ln_1", "ln_2", "ln_cross_attn"):
            if getattr(self, name) is not None:
                mine, theirs = getattr(self, name), getattr(other, name)
                mine.weight, mine.bias = theirs.weight, theirs.bias
        self.mlp = other.mlp
        self.attn.share(other.attn)
        if self.crossattention is not None:
            self.crossattention.share(other.crossattention)


# ------------------------------ The model --------------------------------------------------------


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
    # Initial embeddings in multiples of GPT-2's (std 0.02, 0.01): large ones memorize first and
    # generalize late (Liu et al., 2023, "Omnigrok"), as std 1 does in Lee et al.'s grokking
    embd_scale: float = 1.0
    # families.py: no key attends to pad_id; a Classifier scores n_classes; cross=True
    pad_id: int | None = None
    n_classes: int = 2
    cross: bool = False

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.positions not in ("learned", "sinusoidal", "none"):
            raise ValueError(f"positions={self.positions!r}: expected 'learned', 'sinusoidal' "
                             "or 'none'")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity={self.similarity!r}: expected one of "
                             f"{', '.join(SIMILARITIES)}")


# --ablate NAME as Config fields: what the mask, skips, positions, separate layers are for (Hilton)
ABLATIONS = {
    "no-mask": {"causal": False},
    "no-residual": {"residual": False},
    "no-positions": {"positions": "none"},
    "shared-layers": {"shared_layers": True},
}


class Model(Hooked):
    """What every model here shares: its trainable tensors by name (optimizer, checkpoints), and
    its hook points by name (hooks.py: run_with_hooks, run_with_cache)."""

    def parameters(self) -> dict[str, Tensor]:
        """name -> trainable tensor, each once: shared layers' and tied embeddings' included."""
        params, seen = {}, set()
        for k, v in get_state_dict(self).items():
            if v.is_param and id(v) not in seen:
                params[k] = v
                seen.add(id(v))
        return params


class Transformer(Model):
    """Token ids (B, T) -> next-token logits (B, T, vocab_size): GPT's family; an encoder with
    Config(causal=False). The output layer is the token embedding again (weight tying, Press &
    Wolf 2017), as in GPT-2. init=False draws no weights, for a caller that loads them all.
    Hook points: hook_embed, hook_pos_embed, each block's (blocks.{l}.*), ln_final.hook_scale."""

    def __init__(self, config: Config, init=True):
        c = self.config = config
        # Rows padded to a multiple of 64 (zeros, never a target): tinygrad splits and unrolls an
        # axis only by factors that divide it (50257 has none small). nanoGPT pads too.
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
        self.h = [Block(c, init and (i == 0 or not c.shared_layers)) for i in range(c.n_layer)]
        if c.shared_layers:
            for block in self.h[1:]:
                block.share(self.h[0])
        # pre-LN leaves the residual stream unnormalized, so one last LayerNorm precedes the output
        self.ln_f = LayerNorm(c.n_embd, c.ln_eps) if c.prenorm else None
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()

    def __call__(self, idx: Tensor, start_pos=None,
                 source: tuple[Tensor, Tensor | None] | None = None) -> Tensor:
        """start_pos=None: the whole sequence, no cache; an int or bound Variable: idx continues
        the start_pos tokens in the KV cache. source: what a decoder's cross-attention reads."""
        return self.unembed(self.final_stream(idx, start_pos, source))

    def final_stream(self, idx: Tensor, start_pos=None, source=None) -> Tensor:
        """The residual stream after the last block, (B, T, C): embeddings, then the blocks."""
        x = self.embed(idx, 0 if start_pos is None else start_pos)  # (B, T, C)
        pad = None
        if self.config.pad_id is not None and start_pos is None:
            pad = padding_mask(idx, self.config.pad_id)  # (B, 1, 1, T)
        for block in self.h:
            x = block(x, start_pos, pad, source)
            if start_pos is not None:
                # inference: each block a graph of its own, alike but for its buffers, which
                # tinygrad's schedule cache recognizes, so GPT-2's first prefill schedules sooner
                x = x.realize()
        return x

    def embed(self, idx: Tensor, first=0) -> Tensor:
        """Token ids (B, T) at positions first, first + 1, ... -> the stream they start, (B, T, C):
        each token's row of wte plus its position's, as float32 (weights may be float16)."""
        B, T = idx.shape
        if TRAINING:
            # as a product with one-hot rows, whose gradient is one matmul; the lookup's own
            # gradient is a masked sum per table entry, much slower (docs/speed.md)
            # arange on idx's device(s): a batch sharded across devices (train.py --devices)
            rows = Tensor.arange(self.wte.weight.shape[0]).to(idx.device)
            one_hot = (idx.unsqueeze(-1) == rows).float()  # (B, T, rows)
            x = one_hot @ self.wte.weight  # (B, T, rows) @ (rows, C)
        else:
            x = self.wte.weight.float()[idx]  # float32 rows: OpenCL cannot look up float16 here
        x = self.hook_embed(x)  # (B, T, C)
        if self.config.positions == "none":  # --ablate no-positions: no way to tell where
            return x
        table = self.wpe.weight if self.config.positions == "learned" else self.pe
        return x + self.hook_pos_embed(table[first : first + T].float())  # + (T, C)

    def encode(self, idx: Tensor) -> Tensor:
        """Token ids (B, T) -> the final stream, normalized (B, T, C): what an encoder hands on."""
        x = self.final_stream(idx)
        return x if self.ln_f is None else self.ln_f(x)

    def unembed(self, x: Tensor) -> Tensor:
        """The residual stream (B, T, C) -> next-token logits (B, T, vocab_size): the final
        LayerNorm, then the token embedding again as the output layer."""
        if self.ln_f is not None:
            x = self.ln_f(x)
        return (x @ self.wte.weight.T)[:, :, : self.config.vocab_size]  # (B, T, vocab_size)


if __name__ == "__main__":
    from train import cli  # the training loop and its command line live in train.py

    cli()
