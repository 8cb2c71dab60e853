"""Tasks for transformer.py's training loop: what to learn, and how to tell it was learned.

A task gives the loop its data and its judge. The loop (transformer.train) only needs from a task:
name, config, steps, batch_size, lr, eval_every, batch(rng, B), evaluate(model, quick), show(model),
metric, chance, and learned(score). A new task plugs in by providing those and an entry in TASKS.

    python transformer.py --task reverse -v       # reverse digit strings: exact match
    python transformer.py --task shakespeare -v   # character-level tinyshakespeare: val loss
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tinygrad import Tensor

from transformer import IGNORE, Config, Transformer, generate


class Reverse:
    """Read n digits and '>', then write the same digits backwards: "3141>1413".

    Held out: every digit string whose hash falls in one class (a tenth of them) is kept out of
    training batches, and the exact-match score is measured on those strings only. The loss covers
    only the answer digits; the question digits are random and cannot be predicted."""

    name, metric, higher_is_better = "reverse", "exact_match", True
    steps, batch_size, lr, eval_every = 200, 64, 3e-3, 100

    def __init__(self, n_digits: int = 8, seed: int = 0):
        self.n = n_digits
        self.sep = 10
        self.config = Config(vocab_size=11, n_ctx=2 * n_digits + 1, n_layer=2, n_head=4, n_embd=64)
        self.chance = 10.0**-n_digits  # guessing every digit right
        self.test = self.draw(np.random.default_rng(seed + 1), 1000, held_out=True)

    def held_out(self, digits: np.ndarray) -> np.ndarray:
        weights = 7 ** np.arange(self.n) % 1009  # any fixed mixing of the digits will do
        return (digits * weights).sum(-1) % 10 == 0

    def draw(self, rng, B: int, held_out: bool) -> np.ndarray:
        out = np.zeros((0, self.n), dtype=np.int32)
        while len(out) < B:
            d = rng.integers(0, 10, (2 * B, self.n), dtype=np.int32)
            out = np.concatenate([out, d[self.held_out(d) == held_out]])
        return out[:B]

    def batch(self, rng, B: int) -> tuple[np.ndarray, np.ndarray]:
        d = self.draw(rng, B, held_out=False)
        seq = np.concatenate([d, np.full((B, 1), self.sep), d[:, ::-1]], axis=1)  # (B, 2n + 1)
        x, y = seq[:, :-1], seq[:, 1:].copy()
        y[:, : self.n - 1] = IGNORE
        return x.astype(np.int32), y.astype(np.int32)

    def answer(self, model: Transformer, digits: np.ndarray) -> np.ndarray:
        prompt = np.concatenate([digits, np.full((len(digits), 1), self.sep)], axis=1)
        return np.stack(list(generate(model, prompt, self.n)), axis=1)  # (B, n), greedy

    def evaluate(self, model: Transformer, quick: bool = False) -> float:
        """Exact-match rate on the held-out strings: small enough to score whole even when quick."""
        return float((self.answer(model, self.test) == self.test[:, ::-1]).all(-1).mean())

    def learned(self, score: float) -> bool:
        return score >= 0.99  # exact match must be near perfect

    def show(self, model: Transformer, n: int = 4) -> str:
        got = self.answer(model, self.test[:n])
        lines = []
        for d, g in zip(self.test[:n], got):
            ok = "ok" if (g == d[::-1]).all() else "WRONG"
            lines.append(f"{''.join(map(str, d))}>{''.join(map(str, g))}  {ok}")
        return "\n".join(lines)


class DataError(Exception):
    pass


class Shakespeare:
    """Character-level language model of tinyshakespeare (Karpathy's char-rnn corpus).

    The model sees 64 characters and predicts each next one; the score is the mean cross-entropy
    on the last tenth of the text, which training never sees."""

    name, metric, higher_is_better = "shakespeare", "val_loss", False
    reads_data = True  # --data PATH, or a download
    steps, batch_size, lr, eval_every = 1300, 12, 5e-3, 250
    url = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"

    def __init__(self, data: str | None = None):
        text = self.load(data)
        self.chars = sorted(set(text))
        lookup = {ch: i for i, ch in enumerate(self.chars)}
        data_ids = np.array([lookup[ch] for ch in text], dtype=np.int32)
        split = int(0.9 * len(data_ids))
        self.train, self.val = data_ids[:split], data_ids[split:]
        V = len(self.chars)
        # nanoGPT's CPU shakespeare_char run (context 64, batch 12, 4 heads, no dropout) made
        # smaller so that it finishes within five minutes on two cores: 2 layers of 64 dims. With
        # a budget of about a million characters the shallow model ends lower (val 1.96) than 4
        # layers (1.97). `--n-layer 4 --n-embd 128 --steps 2000 --lr 1e-3` is nanoGPT's exactly.
        self.config = Config(vocab_size=V, n_ctx=64, n_layer=2, n_head=4, n_embd=64)
        self.chance = math.log(V)  # the loss of a uniform guess
        self.bigram = self.bigram_loss()

    @classmethod
    def load(cls, path: str | None) -> str:
        if path is None:
            cache = Path(__file__).parent / "data" / "tinyshakespeare.txt"
            if not cache.exists():
                from download import DownloadError, download

                try:
                    download(cls.url, cache)
                except DownloadError as e:
                    raise DataError(f"could not fetch tinyshakespeare ({e}); "
                                    "pass a local copy with --data PATH") from None
            path = str(cache)
        try:
            return Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read dataset {path}: {e}") from None

    def bigram_loss(self) -> float:
        """Val loss of next-char counts from the training text (add-one smoothed): a bar to pass."""
        V = len(self.chars)
        counts = np.ones((V, V))
        np.add.at(counts, (self.train[:-1], self.train[1:]), 1)
        probs = counts / counts.sum(-1, keepdims=True)
        return float(-np.log(probs[self.val[:-1], self.val[1:]]).mean())

    def windows(self, data: np.ndarray, rng, B: int) -> tuple[np.ndarray, np.ndarray]:
        T = self.config.n_ctx
        start = rng.integers(0, len(data) - T - 1, B)
        x = np.stack([data[s : s + T] for s in start])
        y = np.stack([data[s + 1 : s + T + 1] for s in start])
        return x, y

    def batch(self, rng, B: int) -> tuple[np.ndarray, np.ndarray]:
        return self.windows(self.train, rng, B)

    def evaluate(self, model: Transformer, quick: bool = False) -> float:
        """Mean next-character cross-entropy on the held-out text, cut into windows of n_ctx.

        All of it by default; quick=True scores every fourth chunk of windows, for progress
        reports. Chunks have one size, so the forward pass is scheduled once and then reused."""
        T, chunk = self.config.n_ctx, 256
        n = (len(self.val) - 1) // T // chunk * chunk  # whole chunks of whole windows
        x = self.val[: n * T].reshape(-1, chunk, T)  # (chunks, chunk, T)
        y = self.val[1 : n * T + 1].reshape(-1, chunk, T)  # x shifted by one character
        picked = range(0, len(x), 4 if quick else 1)
        losses = [model(Tensor(x[i])).sparse_categorical_crossentropy(Tensor(y[i])).item()
                  for i in picked]
        return float(np.mean(losses))

    def show(self, model: Transformer, n: int = 200) -> str:
        rng = np.random.default_rng(0)
        prompt = np.array([[self.chars.index("\n")]])
        out = np.concatenate(list(generate(model, prompt, n, temperature=0.8, rng=rng)))
        return "".join(self.chars[i] for i in out)

    def learned(self, score: float) -> bool:
        return score < self.bigram  # it used more context than the previous character

    def baselines(self) -> str:
        return (f"uniform {self.chance:.2f}, bigram {self.bigram:.2f}, "
                "5-gram 1.67 (reference) nats")


TASKS = {"reverse": Reverse, "shakespeare": Shakespeare}
