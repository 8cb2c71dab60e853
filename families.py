"""The other two families, made of transformer.py's blocks: an encoder that classifies (BERT's
family) and the encoder-decoder of "Attention Is All You Need" (Vaswani et al., 2017; T5, BART).

transformer.py's Transformer is the decoder-only model, and with Config(causal=False) an
encoder; its blocks take cross-attention with Config(cross=True). Here they are put together:
Classifier, EncoderDecoder, the three kinds of attention from one pass, greedy translation.
docs/families.md compares the three families; tasks.py trains them:

    python transformer.py --task classify -v        # an encoder tells palindromes: accuracy
    python transformer.py --task translate -v       # an encoder-decoder reverses: exact match
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from tinygrad import Tensor

from generate import sample
from transformer import Config, Linear, Model, Transformer, padding_mask


class Classifier(Model):
    """Token ids (B, T) -> class logits (B, n_classes): an encoder, as in BERT (Devlin et al.,
    2019), and a linear head on the mean of its output over the real tokens. The mean, not a
    [CLS] token: every position reaches the head and gets a gradient from the first step, while
    [CLS] must learn to gather the sequence, which BERT's pretraining teaches. Causal (a decoder
    side by side), the head reads the last real token: the only one that saw everything."""

    def __init__(self, config: Config, init=True):
        self.config = config
        self.encoder = Transformer(config, init)
        self.head = Linear(config.n_embd, config.n_classes, init=init)

    def __call__(self, idx: Tensor) -> Tensor:
        B, T = idx.shape
        c = self.config
        x = self.encoder.encode(idx)  # (B, T, C)
        real = (idx != c.pad_id).float() if c.pad_id is not None else Tensor.ones(B, T)
        if c.causal:
            last = real.sum(1, keepdim=True).int() - 1  # (B, 1): where the last real token is
            weights = (Tensor.arange(T).reshape(1, T) == last).float()  # (B, T), one-hot
        else:
            weights = real / real.sum(1, keepdim=True)  # (B, T): the mean over real tokens
        pooled = (x * weights.unsqueeze(-1)).sum(1)  # (B, C)
        return self.head(pooled)  # (B, n_classes)


class EncoderDecoder(Model):
    """Source ids (B, S) and target ids (B, T) -> next-target-token logits (B, T, vocab_size):
    the Transformer of Vaswani et al. (2017), the family of T5 and BART. The encoder reads the
    source both ways; each decoder block attends causally to the target so far, then through
    cross-attention to the encoder's output. One vocabulary, so one token table serves both
    sides and the output layer, and one position table both sides (section 3.4)."""

    def __init__(self, config: Config, init=True):
        self.config = config
        self.encoder = Transformer(replace(config, causal=False), init)
        # the target's padding comes after its real tokens, where the causal mask hides it
        self.decoder = Transformer(replace(config, cross=True, pad_id=None), init)
        self.decoder.wte = self.encoder.wte
        for table in ("wpe", "pe"):
            if hasattr(self.encoder, table):
                setattr(self.decoder, table, getattr(self.encoder, table))

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor | None]:
        """Source ids (B, S) -> what every cross-attention reads: the encoder's output (B, S, C)
        and the source's padding_mask (None without a pad_id)."""
        pad_id = self.config.pad_id
        return self.encoder.encode(src), None if pad_id is None else padding_mask(src, pad_id)

    def __call__(self, src: Tensor, tgt: Tensor) -> Tensor:
        return self.decoder(tgt, source=self.encode(src))


def encoder_decoder_maps(model: EncoderDecoder, src: Tensor, tgt: Tensor):
    """Logits (B, T, vocab) and, from the same pass, {"encoder": (B, L, H, S, S), "decoder":
    (B, L, H, T, T), "cross": (B, L, H, T, S)}: the three kinds of attention, read at their
    hook points (encoder.blocks.{l}.attn.hook_pattern, decoder.blocks.{l}.cross_attn...)."""
    L = model.config.n_layer
    names = {"encoder": [f"encoder.blocks.{layer}.attn.hook_pattern" for layer in range(L)],
             "decoder": [f"decoder.blocks.{layer}.attn.hook_pattern" for layer in range(L)],
             "cross": [f"decoder.blocks.{layer}.cross_attn.hook_pattern" for layer in range(L)]}
    logits, cache = model.run_with_cache((src, tgt), [n for group in names.values() for n in group])
    return logits, {kind: Tensor.stack(*[cache[n] for n in group], dim=1)
                    for kind, group in names.items()}


def translate(model: EncoderDecoder, src: np.ndarray, bos: int, max_new_tokens: int) -> np.ndarray:
    """Greedy output (B, max_new_tokens) of the encoder-decoder for source ids src (B, S), the
    decoder starting from the token bos.

    The source is encoded once, each cross-attention computes its keys and values from it once,
    and every step feeds one token through the decoder's KV cache."""
    source = model.encode(Tensor(np.asarray(src, dtype=np.int32)))
    source = (source[0].realize(), source[1])  # one encoder pass for every step that follows
    tok = np.full((len(src), 1), bos, dtype=np.int32)  # (B, 1)
    out = []
    for pos in range(max_new_tokens):
        logits = model.decoder(Tensor(tok), pos, source)[:, -1].numpy()  # (B, V)
        tok = sample(logits, 0).astype(np.int32)[:, None]  # (B, 1)
        out.append(tok[:, 0])
    return np.stack(out, axis=1)
