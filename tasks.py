"""Tasks for transformer.py's training loop: what to learn, and how to tell it was learned.

A task gives the loop its data and its judge. What the loop (train.train) and the command line
(train.main) read from a task is declared once, in Task, with the defaults of everything a task
may leave out; every task here derives from it. A new task plugs in by deriving from Task, setting
what Task says it must, and adding an entry to TASKS.

    python transformer.py --task reverse -v       # reverse digit strings: exact match
    python transformer.py --task shakespeare -v   # character-level tinyshakespeare: val loss
    python transformer.py --task grokking -v      # (a + b) mod p: memorize first, generalize later
    python transformer.py --task grokking-slow --grokfast --l2 0.005 -v   # Lee et al.'s Grokfast
    python transformer.py --task induction -v     # induction heads, 2 attention-only layers
    python transformer.py --task classify -v      # an encoder tells palindromes from near misses
    python transformer.py --task translate -v     # an encoder-decoder reverses digit strings

A task's architecture (default transformer.Transformer) is the class the loop builds, and its
batch's x may be a tuple of the model's inputs: (source, target) for an EncoderDecoder. A task
may also record curves: observe(model, step) is called every eval_every steps, its history is
kept with the checkpoint, and plot(path, run) draws it after training (plots.py).
"""
from __future__ import annotations

import abc
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
from tinygrad import Tensor, TinyJit

import heads
from families import Classifier, EncoderDecoder, encoder_decoder_maps, translate
from flags import UserError
from generate import generate
from heads import attention_maps
from transformer import Config, Transformer

# A target id that carries no loss. Not -1: tinygrad reads ignore_index=-1 as "ignore nothing".
IGNORE = -100


class Task(abc.ABC):
    """What the training loop and the command line read from a task, each with its default.

    A task sets the attributes without a default and the abstract methods; everything else is
    optional, and a default that returns None means "not offered": the loop checks for None."""

    # Every task sets these.
    name: str  # the --task name; checkpoints record it
    metric: str  # what evaluate scores, as the result line names it
    higher_is_better: bool  # the metric's direction
    steps: int  # the training budget when --steps is not given
    batch_size: int  # sequences per training step
    lr: float  # the peak learning rate when --lr is not given
    eval_every: int  # steps between evaluations (and calls of observe)
    config: Config  # the model the task's data fits: n_ctx and vocab_size must match
    chance: float  # the score of a guess, for the verdict line

    # The loop's defaults, for a task that says nothing.
    reads_data = False  # True: the constructor takes data= (--data PATH, else a download)
    architecture: type = Transformer  # the model class the loop builds
    weight_decay = 0.1  # AdamW's, on matrices and embeddings (train.make_optimizer)
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW's b1, b2
    clip: float | None = 1.0  # the gradient's global norm is clipped to this; None: never
    l2 = 0.0  # an L2 penalty added to the gradient (train.make_train_step)
    warmup: int | None = None  # steps of linear warmup; None: the loop's (a tenth, at most 100)
    constant_lr = False  # True: flat after warmup; False: cosine decay to a tenth
    history: list[dict] | None = None  # a list: curves saved with the checkpoint, resumed with it
    draws_curves = False  # True: plot(path, run) draws the history after training (--plot)
    block_size: int | None = None  # tokens in a training sequence; None: config.n_ctx
    # True: step s's batch is drawn with rng [seed, s], so a run resumed at step s draws what an
    # unbroken one would (train.train); False: a resumed run draws fresh batches
    replayable = False
    eval_at_start = False  # True: observe(model, 0) before the first step too
    best_dir: Path | None = None  # a task that keeps its best model saves it here (--out's)

    def initial(self):
        """The model to start training from (weights loaded from elsewhere); None: the loop
        builds architecture(config) with fresh weights."""
        return None

    @abc.abstractmethod
    def batch(self, rng: np.random.Generator, B: int) -> tuple:
        """(x, y) of B training sequences drawn with rng; x may be a tuple of the model's inputs,
        and a target of IGNORE carries no loss."""

    @abc.abstractmethod
    def evaluate(self, model, quick: bool = False) -> float:
        """The score on held-out data; quick=True may score a part of it, for progress lines."""

    @abc.abstractmethod
    def learned(self, score: float) -> bool:
        """The verdict: did a model with this score learn the task?"""

    @abc.abstractmethod
    def show(self, model, seed: int = 0) -> str:
        """A few held-out answers of the model, as text; a task that samples draws with seed."""

    def observe(self, model, step: int) -> str | None:
        """Called every eval_every steps and at the last: record a point of the curves and
        return the progress line; None: the loop prints its own quick evaluation."""
        return None

    def plot(self, path: Path, run: str = "") -> Path | None:
        """Draw the history into path (run names the command in the title); see draws_curves."""
        return None

    def baselines(self) -> str | None:
        """Scores of simple models to compare with, printed before training; None: none."""
        return None

    def mask_check(self, model) -> str | None:
        """A line on what the causal mask lets the model see, printed after training."""
        return None

    def result_fields(self) -> str:
        """The task's own fields (name=value ...) appended to the result line."""
        return ""

    def example(self) -> tuple[np.ndarray, list[str]] | None:
        """A held-out input and a label per token, for --attention and --logit-lens; None: the
        task has none to offer."""
        return None

    def token(self, i: int) -> str:
        """Token id i as a label in the pictures."""
        return str(int(i))

    def patching_pair(self) -> tuple[np.ndarray, np.ndarray, int, int] | None:
        """A held-out clean input, a corrupted one as long, the token that should come next
        after the clean one and the one the corruption points to, for --patch and --dla; None:
        the task has none to offer."""
        return None

    def patching_reading(self, model, exact: dict) -> str | None:
        """What activation patching's grids (patching.activation_patching on patching_pair)
        say about the task's circuit, printed after them; None: nothing to say."""
        return None

    def inspect(self, model, folder: Path) -> tuple[list[Path], str] | None:
        """Draw the model's attention into folder itself -> (files written, report); None: the
        loop draws it with heads.inspect_model on example()."""
        return None

    def explain(self, model) -> str | None:
        """What the task reads from the model's heads, printed after --attention."""
        return None

    def ablation_score(self, model) -> float:
        """The score that --head-ablation watches as heads are knocked out: evaluate's."""
        return self.evaluate(model)

    @property
    def ablation_metric(self) -> str:
        """The name of ablation_score's score (a task that scores otherwise names its own)."""
        return self.metric

    @property
    def ablation_higher_is_better(self) -> bool:
        """ablation_score's direction."""
        return self.higher_is_better

    def ablation_reading(self, model, base: float, delta: np.ndarray, knock) -> str | None:
        """What the knock-outs say about the task's circuit: base is the score with every head,
        delta (L, H) the change when each head alone is knocked out, knock(heads) the score with
        a list of (layer, head) knocked out together. None: nothing to read."""
        return None


def on_model_device(model, array: np.ndarray) -> Tensor:
    """array as a tensor where the model's weights are: on their device, or, for weights
    replicated on several (train.py --devices), split across them along the batch when it divides
    evenly, else copied to each."""
    device = model.wte.weight.device
    if not isinstance(device, tuple):
        return Tensor(array)
    t = Tensor(array)
    return t.shard(device, axis=0) if len(array) % len(device) == 0 else t.to(device)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per position, in float64: logits (..., V), targets (...)."""
    logits = np.asarray(logits, dtype=np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]


class Reverse(Task):
    """Read n digits and '>', then write the same digits backwards: "3141>1413".

    Held out: every digit string whose hash falls in one class (a tenth of them) is kept out of
    training batches, and the exact-match score is measured on those strings only.

    The loss covers every position, the question digits too, as in Hilton's curriculum: they are
    random, so a model that cannot see the future can do no better there than ln 10 nats, while it
    can learn the answer perfectly. That is the mask check (mask_check): "the model should be able
    to predict the second sequence, but not the first". answer_only=True scores the answer only."""

    name, metric, higher_is_better = "reverse", "exact_match", True
    steps, batch_size, lr, eval_every = 200, 64, 3e-3, 100

    def __init__(self, n_digits: int = 8, seed: int = 0, answer_only: bool = False):
        self.n = n_digits
        self.sep = 10
        self.answer_only = answer_only
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
        if self.answer_only:
            y[:, : self.n] = IGNORE  # the question digits and the '>' that always follows them
        return x.astype(np.int32), y.astype(np.int32)

    def position_losses(self, model: Transformer) -> np.ndarray:
        """(2n,) held-out cross-entropy at each input position, in nats: position t predicts
        token t + 1 of "question > answer", given everything up to t."""
        d = self.test
        seq = np.concatenate([d, np.full((len(d), 1), self.sep), d[:, ::-1]], axis=1)  # (B, 2n+1)
        logits = model(Tensor(seq[:, :-1].astype(np.int32))).numpy()  # (B, 2n, V)
        return token_nll(logits, seq[:, 1:]).mean(0)

    def mask_check(self, model: Transformer) -> str:
        """Held-out loss on the question digits 2 .. n (predicted from the digits before them:
        chance is ln 10) and on the answer digits (predicted from the whole question)."""
        losses = self.position_losses(model)
        question, answer = losses[: self.n - 1].mean(), losses[self.n :].mean()
        return (f"mask check: question {question:.3f} nats (chance {math.log(10):.3f}), "
                f"answer {answer:.3f} nats")

    def answer(self, model: Transformer, digits: np.ndarray) -> np.ndarray:
        prompt = np.concatenate([digits, np.full((len(digits), 1), self.sep)], axis=1)
        return np.stack(list(generate(model, prompt, self.n)), axis=1)  # (B, n), greedy

    def evaluate(self, model: Transformer, quick: bool = False) -> float:
        """Exact-match rate on the held-out strings: small enough to score whole even when quick."""
        return float((self.answer(model, self.test) == self.test[:, ::-1]).all(-1).mean())

    def learned(self, score: float) -> bool:
        return score >= 0.99  # exact match must be near perfect

    def example(self) -> tuple[np.ndarray, list[str]]:
        """A held-out question with its answer, (2n + 1,) ids, and each token as a label."""
        d = self.test[0]
        ids = np.concatenate([d, [self.sep], d[::-1]]).astype(np.int32)
        return ids, [self.token(i) for i in ids]

    def token(self, i: int) -> str:
        return ">" if i == self.sep else str(i)

    def patching_pair(self, j: int | None = None) -> tuple[np.ndarray, np.ndarray, int, int]:
        """A held-out question and '>' with the first j answer digits (j = n // 2 unless
        given), so the next token is answer digit j, the mirrored input digit n - 1 - j; the
        corrupted input has that one digit changed (by 5, mod 10). The answer is the clean
        digit, the wrong token the corrupted one."""
        j = self.n // 2 if j is None else j
        d = self.test[0]
        clean = np.concatenate([d, [self.sep], d[::-1][:j]]).astype(np.int32)
        corrupt = clean.copy()
        corrupt[self.n - 1 - j] = (d[self.n - 1 - j] + 5) % 10
        return clean, corrupt, int(d[self.n - 1 - j]), int(corrupt[self.n - 1 - j])

    def mirror_shares(self, model: Transformer) -> np.ndarray:
        """(L, H): how often each head's strongest key is the input digit the answer needs. The
        position that writes answer digit j (the '>' for j = 0, then answer digit j - 1) must
        copy input digit n - 1 - j, its mirror image; counted over every held-out string."""
        n, d = self.n, self.test
        seq = np.concatenate([d, np.full((len(d), 1), self.sep), d[:, ::-1]], axis=1)  # (B, 2n+1)
        att = attention_maps(model, Tensor(seq.astype(np.int32)))[1].numpy()  # (B, L, H, T, T)
        queries = np.arange(n, 2 * n)  # the '>' and the answer digits but the last
        strongest = att[:, :, :, queries].argmax(-1)  # (B, L, H, n)
        return (strongest == 2 * n - 1 - queries).mean(axis=(0, 3))

    def explain(self, model: Transformer) -> str:
        """Name the mirror heads: those whose strongest key is the mirrored digit >= 90 % of the
        time. That is what reversing needs, so a model that learned shows at least one."""
        where = f"over {len(self.test)} held-out strings x {self.n} answer positions"
        return heads.name_heads(self.mirror_shares(model), "mirror", "strongest attention on "
                                "the mirrored input digit", where)

    def ablation_reading(self, model: Transformer, base: float, delta: np.ndarray, knock) -> str:
        """Does knocking heads out agree with the attention map? The map names the mirror head
        (explain); its knock-out should cost exact match more than any other head's."""
        share = self.mirror_shares(model)
        mirror = np.unravel_index(share.argmax(), share.shape)
        others = [(float(delta[i]), i) for i in np.ndindex(delta.shape) if i != mirror]
        cost, nxt = min(others)  # the most negative change in exact match
        agrees = float(delta[mirror]) <= cost
        return (f"knocking out L{mirror[0]}H{mirror[1]} (the mirror head, {share[mirror]:.0%} of "
                f"answer positions) drops exact match from {base:.2f} to "
                f"{base + delta[mirror]:.2f}; the next most important head, L{nxt[0]}H{nxt[1]}, "
                f"costs {cost:+.2f}: {'agrees' if agrees else 'does NOT agree'} with the map")

    def show(self, model: Transformer, seed: int = 0, n: int = 4) -> str:
        got = self.answer(model, self.test[:n])
        lines = []
        for d, g in zip(self.test[:n], got):
            ok = "ok" if (g == d[::-1]).all() else "WRONG"
            lines.append(f"{''.join(map(str, d))}>{''.join(map(str, g))}  {ok}")
        return "\n".join(lines)


class Shakespeare(Task):
    """Character-level language model of tinyshakespeare (Karpathy's char-rnn corpus).

    The model sees 64 characters and predicts each next one; the score is the mean cross-entropy
    on the last tenth of the text, which training never sees."""

    name, metric, higher_is_better = "shakespeare", "val_loss", False
    reads_data = True  # --data PATH, or a download
    steps, batch_size, lr, eval_every = 1300, 12, 5e-3, 250
    url = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    cache_name = "tinyshakespeare.txt"
    eval_chunk = 256  # windows in one forward pass of the evaluation
    loss_of = None  # (model, its device(s), its compiled loss on a chunk of windows): evaluate

    def __init__(self, data: str | None = None):
        text = self.load(data)
        # the held-out tenth must hold at least one whole window of 64 characters and its target
        if not text:
            raise UserError(f"dataset {data or 'tinyshakespeare'} is empty")
        if len(text) < 10 * 65:
            raise UserError(f"dataset {data} is too short: {len(text)} characters; it needs at "
                            f"least {10 * 65}, so that its last tenth holds a window of 64")
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
            cache = Path(__file__).parent / "data" / cls.cache_name
            if not cache.exists():
                from download import download

                try:
                    download(cls.url, cache)
                except UserError as e:
                    raise UserError(f"could not fetch {cls.url} ({e}); "
                                    "pass a local copy with --data PATH") from None
            path = str(cache)
        try:
            return Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read dataset {path}: {e}") from None

    def bigram_loss(self) -> float:
        """Val loss of next-char counts from the training text (add-one smoothed): a bar to pass."""
        V = len(self.chars)
        counts = np.ones((V, V))
        np.add.at(counts, (self.train[:-1], self.train[1:]), 1)
        probs = counts / counts.sum(-1, keepdims=True)
        return float(-np.log(probs[self.val[:-1], self.val[1:]]).mean())

    def windows(self, data: np.ndarray, rng, B: int) -> tuple[np.ndarray, np.ndarray]:
        T = self.block_size or self.config.n_ctx
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
        T = self.block_size or self.config.n_ctx
        chunk = max(1, min(self.eval_chunk, (len(self.val) - 1) // T))  # a short text: smaller
        n = (len(self.val) - 1) // T // chunk * chunk  # whole chunks of whole windows
        x = self.val[: n * T].reshape(-1, chunk, T)  # (chunks, chunk, T)
        y = self.val[1 : n * T + 1].reshape(-1, chunk, T)  # x shifted by one character
        device = model.wte.weight.device  # weights moved (--devices, then back): compile anew
        if self.loss_of is None or self.loss_of[:2] != (model, device):
            # compiled once per model: every chunk has one shape, so a replay skips the scheduling
            # in Python that a plain call pays again for each chunk (docs/speed.md, Training)
            loss = lambda x, y: model(x).sparse_categorical_crossentropy(y).realize()
            self.loss_of = (model, device, TinyJit(loss))
        picked = range(0, len(x), 4 if quick else 1)
        losses = [self.loss_of[2](*(on_model_device(model, a[i]) for a in (x, y))).item()
                  for i in picked]
        return float(np.mean(losses))

    def show(self, model: Transformer, seed: int = 0, n: int = 200) -> str:
        rng = np.random.default_rng(seed)  # --seed
        prompt = np.array([[self.chars.index("\n")]])
        out = np.concatenate(list(generate(model, prompt, n, temperature=0.8, rng=rng)))
        return "".join(self.chars[i] for i in out)

    def learned(self, score: float) -> bool:
        return score < self.bigram  # it used more context than the previous character

    def example(self) -> tuple[np.ndarray, list[str]]:
        """The first window of the held-out text, with each character as a label."""
        ids = self.val[: self.config.n_ctx]
        return ids, [self.token(i) for i in ids]

    def token(self, i: int) -> str:
        return heads.readable(self.chars[i])

    def baselines(self) -> str:
        return (f"uniform {self.chance:.2f}, bigram {self.bigram:.2f}, "
                "5-gram 1.67 (reference) nats")


class Words(Shakespeare):
    """Word-level Shakespeare, as Hilton's Deep Learning Curriculum (chapter 1) asks: the complete
    works from Project Gutenberg, split at word boundaries with re.split(r"\\b", text).

    The pieces are words and what lies between them (", ", " ", ".\\n"); joined, they give the
    text back exactly. The vocabulary is the pieces seen at least MIN_COUNT times in the first
    nine tenths (training); rarer ones, and any piece first seen in the held-out tenth, become
    <unk>. Why 3: a piece seen once or twice gives its embedding almost nothing to learn from,
    while each row costs a column of the output layer at every position; on tinyshakespeare
    this keeps 5,027 of 12,669 pieces and turns 5 % of the held-out tokens into <unk>.

    The bar to pass is a bigram model of the training pieces, interpolated with unigram counts
    (Jelinek & Mercer, 1980; weight 0.7): with 5,000 words add-one smoothing spreads so much
    mass over unseen pairs that it scores worse than unigrams."""

    name = "words"
    steps, batch_size, lr, eval_every = 400, 16, 5e-3, 100
    url = "https://www.gutenberg.org/files/100/100-0.txt"
    cache_name = "shakespeare-complete-works.txt"
    MIN_COUNT = 3
    UNK = "<unk>"

    def __init__(self, data: str | None = None):
        text = self.load(data)
        if not text:
            raise UserError(f"dataset {data or self.cache_name} is empty")
        pieces = self.split(text)
        split = int(0.9 * len(pieces))
        if len(pieces) - split < 65:
            raise UserError(f"dataset {data} is too short: {len(pieces)} words and spaces; its "
                            "last tenth must hold a window of 64 and its target")
        counts: dict[str, int] = {}
        for piece in pieces[:split]:
            counts[piece] = counts.get(piece, 0) + 1
        self.words = [self.UNK] + sorted(w for w, n in counts.items() if n >= self.MIN_COUNT)
        lookup = {w: i for i, w in enumerate(self.words)}
        ids = np.array([lookup.get(p, 0) for p in pieces], dtype=np.int32)
        self.train, self.val = ids[:split], ids[split:]
        V = len(self.words)
        self.config = Config(vocab_size=V, n_ctx=64, n_layer=2, n_head=4, n_embd=128)
        self.chance = math.log(V)
        self.unigram, self.bigram = self.baseline_losses()

    @staticmethod
    def split(text: str) -> list[str]:
        """The curriculum's tokenizer: cut at every word boundary, drop the empty pieces."""
        return [piece for piece in re.split(r"\b", text) if piece]

    def baseline_losses(self, weight: float = 0.7) -> tuple[float, float]:
        """Held-out loss per token of add-one unigram counts, and of bigram counts interpolated
        with them: weight * P(next | previous) + (1 - weight) * P(next)."""
        V = len(self.words)
        unigram = (np.bincount(self.train, minlength=V) + 1.0) / (len(self.train) + V)
        prev, nxt = self.train[:-1].astype(np.int64), self.train[1:].astype(np.int64)
        pairs, pair_counts = np.unique(prev * V + nxt, return_counts=True)
        row = np.bincount(prev, minlength=V)
        query = self.val[:-1].astype(np.int64) * V + self.val[1:]
        at = np.searchsorted(pairs, query).clip(0, len(pairs) - 1)
        seen = np.where(pairs[at] == query, pair_counts[at], 0)
        p_bigram = seen / np.maximum(row[self.val[:-1]], 1)
        p = weight * p_bigram + (1 - weight) * unigram[self.val[1:]]
        return float(-np.log(unigram[self.val]).mean()), float(-np.log(p).mean())

    def show(self, model: Transformer, seed: int = 0, n: int = 80) -> str:
        rng = np.random.default_rng(seed)  # --seed
        prompt = np.array([[self.words.index("\n") if "\n" in self.words else 0]])
        out = np.concatenate(list(generate(model, prompt, n, temperature=0.8, rng=rng)))
        return "".join(self.words[i] for i in out)

    def example(self) -> tuple[np.ndarray, list[str]]:
        """The first window of the held-out text, with each piece as a label."""
        ids = self.val[: self.config.n_ctx]
        return ids, [self.token(i) for i in ids]

    def token(self, i: int) -> str:
        return heads.readable(self.words[i])

    def baselines(self) -> str:
        return (f"uniform {self.chance:.2f}, unigram {self.unigram:.2f}, "
                f"bigram {self.bigram:.2f} nats per token")


class Text(Shakespeare):
    """Fine-tune GPT-2 on a text of one's own, read through GPT-2's BPE (tiktoken's r50k_base).

    The model starts from OpenAI's weights (init: gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a
    local checkpoint (a .safetensors or pytorch_model.bin file, or a folder with config.json),
    sees block_size tokens and predicts each next one. The score is the mean cross-entropy on the
    last tenth of the text, which training never sees, measured before the first step too. Each
    evaluation that beats the best so far is saved in Hugging Face's layout (best_dir; see
    gpt.save_pretrained), as nanoGPT keeps its best checkpoint by validation loss.

    The optimizer's settings are nanoGPT's (train.py, config/finetune_shakespeare.py): AdamW with
    betas (0.9, 0.95), weight decay 0.1, gradient clipping at 1; the peak learning rate is higher
    than finetune_shakespeare's 3e-5 (made for gpt2-xl) and decays along a cosine, as llm.c's
    fine-tuning of 124M does."""

    name = "text"
    steps, batch_size, lr, eval_every = 100, 4, 1e-4, 25
    betas = (0.9, 0.95)
    warmup = 10
    replayable, eval_at_start = True, True
    eval_chunk = 8  # a GPT-2's logits are 50257 wide: 8 windows of 128 take 200 MB

    def __init__(self, data: str | None = None, init: str = "gpt2",
                 block_size: int | None = None):
        from gpt import EOT, SIZES, config_from_hf, gpt2_config, tokenizer

        path = Path(init)
        if init in SIZES:
            self.weights, self.config = None, gpt2_config(init)
        elif path.is_dir() or path.is_file():
            self.weights = path / "model.safetensors" if path.is_dir() else path
            if path.is_dir() and not self.weights.exists():
                self.weights = path / "pytorch_model.bin"
            if not self.weights.is_file():
                raise UserError(f"--init {init}: the folder holds no model.safetensors or "
                                "pytorch_model.bin")
            try:  # the shape as load_gpt2 reads it: config.json beside the weights, else gpt2's
                self.config = config_from_hf(self.weights.parent / "config.json",
                                             gpt2_config("gpt2"))
            except (OSError, ValueError, KeyError) as e:
                raise UserError(f"cannot read {self.weights.parent / 'config.json'}: {e}") from None
        else:
            raise UserError(f"--init {init}: neither a GPT-2 size ({', '.join(SIZES)}) nor a "
                            "checkpoint file or folder")
        self.init, self.eot = init, EOT
        n_ctx = self.config.n_ctx
        self.block_size = block_size or min(128, n_ctx)
        if self.block_size > n_ctx:
            raise UserError(f"--block-size {self.block_size} is longer than the model's context "
                            f"({n_ctx} tokens)")
        text = self.load(data)
        if not text.strip():
            raise UserError(f"dataset {data or 'tinyshakespeare'} is empty")
        if "\x00" in text:  # valid UTF-8 can still be a binary file; no text holds NUL
            raise UserError(f"dataset {data} looks binary (it holds NUL bytes), not text")
        self.enc = tokenizer()
        ids = np.array(self.enc.encode_ordinary(text), dtype=np.int32)
        # the held-out tail (nanoGPT's prepare.py splits 90/10 too) must hold one window and its
        # target, and so must the rest
        split = int(0.9 * len(ids))
        need = self.block_size + 1
        if min(split, len(ids) - split) < need:
            raise UserError(f"dataset {data} is too short: {len(ids)} tokens; with --block-size "
                            f"{self.block_size} it needs at least {10 * need}, so that its last "
                            "tenth holds a window and its target")
        self.train, self.val = ids[:split], ids[split:]
        self.chance = math.log(self.config.vocab_size)  # the loss of a uniform guess
        self.history = []

    def initial(self):
        from gpt import load_gpt2

        if self.weights is None:
            return load_gpt2(self.init)
        return load_gpt2(weights=self.weights)

    def observe(self, model: Transformer, step: int) -> str:
        """The validation loss (all of the held-out tail), recorded; a new best is saved."""
        loss = self.evaluate(model)
        best = min((h["val_loss"] for h in self.history), default=math.inf)
        self.history.append({"step": step, "val_loss": loss})
        line = f"eval  step {step}: val_loss {loss:.4f}"
        if loss < best and self.best_dir is not None and step > 0:
            from gpt import save_pretrained

            line += f", the best so far: saved {save_pretrained(model, self.best_dir)}"
        return line

    def learned(self, score: float) -> bool:
        """Lower than before fine-tuning."""
        return bool(self.history) and score < self.history[0]["val_loss"]

    def baselines(self) -> str:
        return (f"{len(self.train):,} training tokens, {len(self.val):,} held out; uniform "
                f"guess {self.chance:.2f} nats")

    def show(self, model: Transformer, seed: int = 0, n: int = 100) -> str:
        """n tokens after <|endoftext|>, as nanoGPT's sample.py draws (temperature 0.8, top 200),
        through generate's KV cache."""
        rng = np.random.default_rng(seed)  # --seed
        prompt = np.array([[self.eot]])
        out = np.concatenate(list(generate(model, prompt, n, temperature=0.8, top_k=200,
                                           rng=rng)))
        return self.enc.decode(out.tolist())

    def example(self) -> tuple[np.ndarray, list[str]]:
        ids = self.val[: self.block_size]
        return ids, [self.token(i) for i in ids]

    def token(self, i: int) -> str:
        return heads.readable(self.enc.decode([int(i)]))


def fourier_concentration(embedding: np.ndarray, top: int = 4) -> float:
    """Share of an embedding's energy that sits in its `top` strongest frequencies over tokens.

    embedding is (p, C): row a is the vector of token a, read as C signals over a = 0 .. p-1. Each
    frequency k = 1 .. p // 2 is the pair cos(2 pi k a / p), sin(2 pi k a / p) (for an even p the
    last one has only its cosine); the constant k = 0 counts in the total but is never a winner.
    Nanda et al. (2023) find that a model that has grokked modular addition embeds tokens with a
    handful of frequencies, so the score rises toward 1 as it does; white noise spreads over all
    p // 2 frequencies and scores about top / (p / 2) (a little more, for picking the largest)."""
    E = np.asarray(embedding, dtype=np.float64)
    p = E.shape[0]
    energy = (np.abs(np.fft.rfft(E, axis=0)) ** 2).sum(-1)  # (p // 2 + 1,): k = 0 .. p // 2
    # rfft keeps one of each pair of conjugate bins k and p - k: count both (Parseval)
    energy[1 : (p + 1) // 2] *= 2
    strongest = np.sort(energy[1:])[::-1][:top]
    return float(strongest.sum() / max(energy.sum(), 1e-30))


class Grokking(Task):
    """(a + b) mod p from the tokens "a b =": memorize first, generalize much later.

    Power et al. (2022), "Grokking: Generalization Beyond Overfitting on Small Algorithmic
    Datasets": a small transformer trained on a fraction of all p^2 sums reaches 100 % training
    accuracy early, stays near chance on the held-out sums for a long while, then suddenly gets
    them right. Nanda et al. (2023), "Progress measures for grokking via mechanistic
    interpretability", show that weight decay slowly trades the memorized lookup table for a
    trigonometric algorithm (the embedding concentrates on a few frequencies) long before the
    held-out accuracy moves; fourier_concentration follows that.

    Every pair (a, b) is either in training or held out, by one fixed random permutation (seed).
    Each step is one batch of all the training pairs (or batch_size of them, drawn afresh), and
    only the answer token carries loss."""

    name, metric, higher_is_better = "grokking", "accuracy", True
    steps, lr, eval_every = 1500, 3e-3, 10
    # Weight decay is what makes it generalize at all; b2 = 0.98 and a flat learning rate after a
    # short warmup follow Nanda et al.
    weight_decay, betas, warmup, constant_lr = 1.0, (0.9, 0.98), 10, True
    draws_curves = True  # accuracy, loss, weight norm and Fourier concentration over the steps

    def __init__(self, p: int = 59, train_fraction: float = 0.35, n_embd: int = 64, seed: int = 0,
                 n_layer: int = 1, batch_size: int | None = None):
        self.p = p
        a, b = np.divmod(np.arange(p * p), p)
        self.x_all = np.stack([a, b, np.full_like(a, p)], axis=1).astype(np.int32)  # (p^2, 3)
        self.y_all = ((a + b) % p).astype(np.int32)
        order = np.random.default_rng(seed).permutation(p * p)
        n_train = round(train_fraction * p * p)
        self.train_ids, self.test_ids = np.sort(order[:n_train]), np.sort(order[n_train:])
        self.batch_size = min(batch_size or n_train, n_train)  # full batch unless told
        # token p is "="; one layer, as in Nanda et al.
        self.config = Config(vocab_size=p + 1, n_ctx=3, n_layer=n_layer, n_head=4, n_embd=n_embd)
        self.chance = 1 / p
        self.history: list[dict] = []
        self.forward = None  # compiled forward of all p^2 sums, made on first use (see scores)

    def batch(self, rng, B: int) -> tuple[np.ndarray, np.ndarray]:
        """Training pairs, "a b =" and the answer after "=", whatever B: all of them in order, or
        batch_size of them drawn without replacement."""
        ids = self.train_ids
        if self.batch_size < len(ids):
            ids = rng.choice(ids, self.batch_size, replace=False)
        x = self.x_all[ids]
        y = np.full_like(x, IGNORE)
        y[:, -1] = self.y_all[ids]
        return x, y

    def scores(self, model: Transformer) -> dict:
        """Train and held-out accuracy and loss, total weight norm, Fourier concentration.

        One forward pass of all p^2 sums, compiled once by TinyJit (the weights change in place,
        so replays see the new ones): cheap enough to run every few steps."""
        if self.forward is None or self.forward[0] is not model:
            params = list(model.parameters().values())

            def run(x: Tensor) -> tuple[Tensor, Tensor]:
                norm = Tensor.stack(*[p.square().sum() for p in params]).sum().sqrt()
                return model(x)[:, -1].realize(), norm.realize()

            self.forward = (model, TinyJit(run))
        logits, norm = self.forward[1](Tensor(self.x_all))
        logits = logits.numpy()  # (p^2, vocab)
        nll = token_nll(logits, self.y_all)
        right = logits.argmax(-1) == self.y_all
        wte = model.wte.weight[: self.p].numpy()
        return {"train_acc": float(right[self.train_ids].mean()),
                "test_acc": float(right[self.test_ids].mean()),
                "train_loss": float(nll[self.train_ids].mean()),
                "test_loss": float(nll[self.test_ids].mean()),
                "weight_norm": float(norm.item()), "fourier": fourier_concentration(wte)}

    def observe(self, model: Transformer, step: int) -> str:
        s = self.scores(model)
        self.history = [h for h in self.history if h["step"] < step] + [{"step": step, **s}]
        return (f"eval  step {step}: train acc {s['train_acc']:.3f} loss {s['train_loss']:.3f}  "
                f"held-out acc {s['test_acc']:.3f} loss {s['test_loss']:.3f}  "
                f"weight norm {s['weight_norm']:.1f}  fourier {s['fourier']:.3f}")

    def evaluate(self, model: Transformer, quick: bool = False) -> float:
        """Accuracy on all held-out sums."""
        return self.scores(model)["test_acc"]

    def first_step(self, key: str, level: float) -> int | None:
        return next((h["step"] for h in self.history if h[key] >= level), None)

    def result_fields(self) -> str:
        memorized = self.first_step("train_acc", 0.99)
        generalized = self.first_step("test_acc", 0.95)
        return f"memorized={memorized or 'none'} generalized={generalized or 'none'}"

    def learned(self, score: float) -> bool:
        return score >= 0.95  # it generalized to sums it never saw

    def show(self, model: Transformer, seed: int = 0, n: int = 4) -> str:
        pick = self.test_ids[:: max(1, len(self.test_ids) // n)][:n]
        got = model(Tensor(self.x_all[pick]))[:, -1].argmax(-1).numpy()
        return "\n".join(f"{a} + {b} = {g} (mod {self.p})  {'ok' if g == c else 'WRONG'}"
                         for (a, b, _), g, c in zip(self.x_all[pick], got, self.y_all[pick]))

    def plot(self, path: Path, run: str = "") -> Path:
        import plots

        return plots.grokking_curves(self.history, path, chance=self.chance, p=self.p, run=run)


class SlowGrokking(Grokking):
    """Grokking as Lee et al. (2024, "Grokfast") set it up: tens of thousands of steps without help.

    Their setting (github.com/ironjr/grokfast, main.py): p = 97, half of the pairs for training,
    mini-batches of 512, 2 layers of 128 dims and 4 heads, Adam at lr 1e-3 with b2 = 0.98, no
    weight decay and no clipping. They report 95 % held-out accuracy after 39,890 steps without
    Grokfast and after 910 with it, where the Grokfast run also has Adam's L2 penalty 0.005
    (`--grokfast --l2 0.005`); `--l2` alone tells the two apart."""

    name = "grokking-slow"
    steps, lr, eval_every = 3000, 1e-3, 20
    weight_decay, l2, clip = 0.0, 0.0, None

    def __init__(self, seed: int = 0):
        super().__init__(p=97, train_fraction=0.5, n_embd=128, seed=seed, n_layer=2,
                         batch_size=512)
        # their embeddings start as PyTorch's, std 1: with GPT-2's 0.02 it generalizes with the
        # training pairs (held-out 0.97 at step 200), nothing to grok
        self.config = replace(self.config, embd_scale=50.0)


class Induction(Task):
    """Induction heads (Olsson et al., 2022, "In-context Learning and Induction Heads").

    Each sequence is a segment of R random tokens (R from 6 to 16, drawn without repeats from a
    vocabulary of 100), repeated from position 0 to the end of the context: "a b c ... a b c ...".
    Nothing predicts the first copy; every later token is the one that followed the previous
    occurrence of the current token, which a two-head circuit finds: a previous-token head in layer
    0 writes "the token before me was A" into each position, and an induction head in layer 1
    looks for that A, from a query holding A, and copies the token there. The model is
    attention-only (Elhage et al., 2021, "A Mathematical Framework for Transformer Circuits").

    Why this layout: R varies, so no fixed offset finds the earlier copy and only the content can;
    and the loss is on the repeat alone. Scored on the first copy too, where a token already seen
    is never next (no repeats within a segment), the model learns to avoid every token it has seen,
    the opposite of copying, and it stayed there (in 2000 steps, no head in layer 1 above 0.11 and
    no previous-token head in layer 0, with or without LayerNorm); trained on the repeat alone,
    an induction head in layer 1 forms within a few hundred steps: the phase change."""

    name, metric, higher_is_better = "induction", "induction_score", True
    steps, batch_size, lr, eval_every = 1500, 64, 3e-3, 25
    draws_curves = True  # the losses and the best heads' scores over the steps

    def __init__(self, vocab: int = 100, n_ctx: int = 32, lengths: tuple[int, int] = (6, 16),
                 seed: int = 0):
        assert 2 * lengths[1] <= n_ctx + 1 and lengths[1] <= vocab
        self.lengths = lengths
        self.config = Config(vocab_size=vocab, n_ctx=n_ctx, n_layer=2, n_head=4, n_embd=64,
                             mlp=False)
        seq, self.first, self.repeat = self.sequences(np.random.default_rng([seed, 1]), 128)
        self.x, self.y = seq[:, :-1], seq[:, 1:]  # a fixed evaluation batch, never trained on
        self.chance = heads.induction_baseline(self.x)
        self.history: list[dict] = []
        self.last: dict = {}

    def sequences(self, rng, B: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(B, n_ctx + 1) token ids, and masks (B, n_ctx) of the targets y = seq[:, 1:] that are
        the first copy, and that are the repeat after its first token (which nothing predicts)."""
        T, V = self.config.n_ctx + 1, self.config.vocab_size
        L = rng.integers(self.lengths[0], self.lengths[1] + 1, (B, 1))  # segment lengths
        tokens = rng.random((B, V)).argsort(1)[:, : self.lengths[1]]  # no repeats within a row
        pos = np.arange(T)[None, :]
        seq = np.take_along_axis(tokens, pos % L, axis=1)  # the segment, again and again
        target = pos[:, 1:]  # y[:, j] is seq[:, j + 1]
        first, repeat = target < L, target > L
        return seq.astype(np.int32), first, repeat

    def batch(self, rng, B: int) -> tuple[np.ndarray, np.ndarray]:
        """Inputs and targets; only the repeat carries loss (see the class docstring)."""
        seq, _, repeat = self.sequences(rng, B)
        return seq[:, :-1], np.where(repeat, seq[:, 1:], IGNORE).astype(np.int32)

    def scores(self, model: Transformer) -> dict:
        """Losses on the first copy and on the repeat, every head's induction and previous-token
        scores, all from one forward pass over the evaluation batch."""
        logits, att = attention_maps(model, Tensor(self.x))
        att = att.numpy()  # (B, L, H, T, T)
        nll = token_nll(logits.numpy(), self.y)  # (B, T)
        induction = heads.induction_scores(att, self.x)  # (L, H)
        previous = heads.previous_token_scores(att)  # (L, H)
        layer, head = np.unravel_index(induction.argmax(), induction.shape)
        return {"first_loss": float(nll[self.first].mean()),
                "repeat_loss": float(nll[self.repeat].mean()),
                "induction": induction, "previous": previous, "att": att[0],
                "best": float(induction[layer, head]), "head": (int(layer), int(head))}

    def observe(self, model: Transformer, step: int) -> str:
        s = self.last = self.scores(model)
        keep = {k: s[k] for k in ("first_loss", "repeat_loss", "best")}
        self.history = [h for h in self.history if h["step"] < step]
        self.history.append({"step": step, **keep, "head": list(s["head"]),
                             "previous": float(s["previous"][0].max())})
        return (f"eval  step {step}: loss first copy {s['first_loss']:.3f}  "
                f"repeat {s['repeat_loss']:.3f}  best induction head {s['head'][0]}."
                f"{s['head'][1]} {s['best']:.3f} (uniform {self.chance:.3f})  "
                f"previous-token head in layer 0 {s['previous'][0].max():.3f}")

    # what knocking a head out costs is read on the loss of the repeat, lower is better
    ablation_metric, ablation_higher_is_better = "repeat_loss", False

    def ablation_score(self, model: Transformer) -> float:
        return self.scores(model)["repeat_loss"]

    def ablation_reading(self, model: Transformer, base: float, delta: np.ndarray, knock) -> str:
        """The induction circuit (Olsson et al., 2022): a previous-token head in layer 0 feeds
        the induction heads. Each knocked out alone, and the induction heads (every head that
        scores at least half the best) together, since one may stand in for another."""
        s = self.scores(model)
        ind, prev = s["head"], (0, int(s["previous"][0].argmax()))
        group = [(int(a), int(b)) for a, b in np.argwhere(s["induction"] >= 0.5 * s["best"])]
        together = knock(group) - base
        both = knock(group + [prev]) - base if prev not in group else together
        top = tuple(int(i) for i in np.unravel_index(delta.argmax(), delta.shape))
        names = ", ".join(f"L{a}H{b}" for a, b in group)
        verdict = "agrees" if top == prev else "does NOT agree"
        return (f"repeat loss {base:.4f}; knocking out the induction head L{ind[0]}H{ind[1]} "
                f"(score {s['best']:.2f}) alone costs {delta[ind]:+.4f}, the {len(group)} heads "
                f"scoring at least half of it ({names}) together {together:+.4f}\n"
                f"the layer-0 previous-token head L{prev[0]}H{prev[1]} "
                f"({s['previous'][prev]:.2f}) costs {delta[prev]:+.4f}, with those induction "
                f"heads {both:+.4f}; the costliest head alone is L{top[0]}H{top[1]}: {verdict} "
                "with the previous-token reading")

    def patching_pair(self) -> tuple[np.ndarray, np.ndarray, int, int]:
        """The first evaluation sequence up to a token A of the repeat, whose answer is B, the
        token after A's first occurrence. The corrupted text replaces that first A by a token
        seen nowhere, so no earlier A is left to find. The wrong token is another token seen
        nowhere: the difference is how far B stands above a token nothing points to.
        Only the previous-token head can carry "A came before me" to B's position, so patching
        must find it, and the induction heads that read it (Olsson et al., 2022)."""
        seq, R = self.x[0], int(np.flatnonzero(self.x[0][1:] == self.x[0][0])[0]) + 1
        k = R // 2  # A's first occurrence; B at k + 1, A again at R + k
        clean = seq[: R + k + 1].astype(np.int32)
        unseen = np.setdiff1d(np.arange(self.config.vocab_size), clean)
        corrupt = clean.copy()
        corrupt[k] = unseen[0]
        return clean, corrupt, int(clean[k + 1]), int(unseen[1])

    def patching_reading(self, model: Transformer, exact: dict) -> str:
        """Where patching finds the circuit: the stream entering layer 1 should carry A one
        position on, at B's position, as the previous-token head moved it; the head whose
        output brings back most in layer 0 should be that head, and in layer 1 an induction
        head. Checked against the heads' scores and against what knocking each out costs."""
        import patching

        clean, corrupt, answer, _ = self.patching_pair()
        k = int(np.flatnonzero(clean != corrupt)[0])
        cd, xd = exact["clean_logit_diff"], exact["corrupt_logit_diff"]
        moved = patching.recovered(exact["resid_pre"][1], cd, xd)  # (T,)
        z = patching.recovered(exact["z"], cd, xd)  # (L, H)
        s = self.scores(model)
        prev, ind = int(s["previous"][0].argmax()), int(s["induction"][1].argmax())
        p0, p1 = int(z[0].argmax()), int(z[1].argmax())
        _, cost = heads.ablate_each_head(model, lambda: self.scores(model)["repeat_loss"])
        costliest = int(np.argmax(cost[0]))  # repeat loss goes up most
        say = lambda ok: "agrees" if ok else "does NOT agree"
        return (f"the stream entering layer 1 brings back {moved[k + 1]:+.2f} of the answer at "
                f"B's position {k + 1} and {moved[k]:+.2f} at A's own, {k}: the previous token "
                f"moved one on\npatching a layer-0 head's output brings back most for L0H{p0} "
                f"({z[0, p0]:+.2f}); the previous-token head by its score is L0H{prev} "
                f"({s['previous'][0, prev]:.2f}): {say(p0 == prev)}; the costliest layer-0 "
                f"head to knock out is L0H{costliest}: {say(p0 == costliest)}\n"
                f"in layer 1, L1H{p1} ({z[1, p1]:+.2f}); the best induction head by its score "
                f"is L1H{ind} ({s['induction'][1, ind]:.2f}), and L1H{p1} scores "
                f"{s['induction'][1, p1]:.2f}")

    def evaluate(self, model: Transformer, quick: bool = False) -> float:
        """The best head's induction score on the evaluation batch."""
        self.last = self.scores(model)
        return self.last["best"]

    def result_fields(self) -> str:
        s = self.last
        return (f"repeat_loss={s['repeat_loss']:.4f} first_loss={s['first_loss']:.4f} "
                f"head={s['head'][0]}.{s['head'][1]}")

    def learned(self, score: float) -> bool:
        # a head that copies, and a model that uses it: the repeat is much easier than the first
        return score >= 0.5 and self.last["repeat_loss"] <= self.last["first_loss"] / 4

    def example(self) -> tuple[np.ndarray, list[str]]:
        """The first evaluation sequence, a segment and its repeats, each token as a label."""
        return self.x[0], [self.token(i) for i in self.x[0]]

    def token(self, i: int) -> str:
        return str(i)

    def show(self, model: Transformer, seed: int = 0) -> str:
        s = self.scores(model)
        prompt, T = self.x[:1], self.x.shape[1]
        got = model(Tensor(prompt)).argmax(-1).numpy()[0]
        hit = np.flatnonzero(self.repeat[0])
        lines = [f"sequence: {' '.join(map(str, self.x[0]))}",
                 f"repeat  : {' '.join(map(str, self.y[0, hit]))}",
                 f"model   : {' '.join(map(str, got[hit]))}  "
                 f"({(got[hit] == self.y[0, hit]).mean():.0%} right, context {T})"]
        for layer, row in enumerate(s["induction"]):
            cells = "  ".join(f"{layer}.{h} {v:.2f}/{s['previous'][layer, h]:.2f}"
                              for h, v in enumerate(row))
            lines.append(f"layer {layer} induction/previous-token scores: {cells}")
        return "\n".join(lines)

    def plot(self, path: Path, run: str = "") -> Path:
        import plots

        s = self.last
        layer, head = s["head"]
        prev = int(s["previous"][0].argmax())
        return plots.induction_curves(self.history, path, chance=self.chance,
                                      induction_map=s["att"][layer, head],
                                      previous_map=s["att"][0, prev], ids=self.x[0],
                                      names=(f"{layer}.{head}", f"0.{prev}"), run=run)


class Palindromes(Task):
    """Is this string of digits a palindrome? An encoder classifies it (families.Classifier).

    Half the strings are palindromes; the other half are palindromes with one digit changed, so
    one mismatched pair anywhere decides, and only a model that compares every position with
    its mirror image does better than chance (0.5). Held out, as for reversal: every string
    whose hash falls in one class (a tenth of them), palindromes and near misses alike.

    arch="decoder" trains the same classifier with the causal mask, reading its last token: the
    first half of the string cannot see its mirror image, so the second half must do the
    comparing and the last token must gather it (docs/families.md has both, three seeds each)."""

    name, metric, higher_is_better = "classify", "accuracy", True
    # batch 256: at 64 (10 digits, 2 layers) accuracy was 0.69 after 1500 steps
    steps, batch_size, lr, eval_every = 800, 256, 3e-3, 200
    chance = 0.5
    architecture = Classifier

    def __init__(self, n_digits: int = 8, arch: str = "encoder", seed: int = 0):
        assert n_digits % 2 == 0, "an even length: a change in the middle of an odd one is none"
        self.n = n_digits
        # one layer: every position can compare itself with its mirror image in one attention
        # read, and the mean gathers the verdicts; the causal model has no second read to do so
        self.config = Config(vocab_size=10, n_ctx=n_digits, n_layer=1, n_head=4, n_embd=64,
                             causal=arch == "decoder", n_classes=2)
        self.test = self.draw(np.random.default_rng([seed, 1]), 2000, held_out=True)

    def held_out(self, digits: np.ndarray) -> np.ndarray:
        weights = 7 ** np.arange(self.n) % 1009
        return (digits * weights).sum(-1) % 10 == 0

    def strings(self, rng, B: int, palindrome: bool) -> np.ndarray:
        """(B, n) palindromes, or palindromes with one digit changed into another."""
        half = rng.integers(0, 10, (B, self.n // 2))
        digits = np.concatenate([half, half[:, ::-1]], axis=1)  # (B, n)
        if not palindrome:
            rows, where = np.arange(B), rng.integers(0, self.n, B)
            digits[rows, where] = (digits[rows, where] + rng.integers(1, 10, B)) % 10
        return digits

    def draw(self, rng, B: int, held_out: bool) -> tuple[np.ndarray, np.ndarray]:
        """B strings from one side of the split, half of them palindromes, and their labels
        (1: a palindrome). Each half is drawn alone: the hash does not split both alike."""
        halves = []
        for palindrome in (True, False):
            out = np.zeros((0, self.n), np.int64)
            while len(out) < B // 2:
                d = self.strings(rng, B, palindrome)
                out = np.concatenate([out, d[self.held_out(d) == held_out]])
            halves.append(out[: B // 2])
        order = rng.permutation(2 * (B // 2))
        x, y = np.concatenate(halves), np.repeat([1, 0], B // 2)
        return x[order].astype(np.int32), y[order].astype(np.int32)

    def batch(self, rng, B: int) -> tuple[np.ndarray, np.ndarray]:
        return self.draw(rng, B, held_out=False)

    def predict(self, model: Classifier, digits: np.ndarray) -> np.ndarray:
        return model(Tensor(digits)).argmax(-1).numpy()

    def evaluate(self, model: Classifier, quick: bool = False) -> float:
        """Accuracy on the held-out strings."""
        x, y = self.test
        return float((self.predict(model, x) == y).mean())

    def learned(self, score: float) -> bool:
        return score >= 0.95

    def example(self) -> tuple[np.ndarray, list[str]]:
        """The first held-out near miss, with each digit as a label."""
        x, y = self.test
        d = x[np.flatnonzero(y == 0)[0]]
        return d, [self.token(i) for i in d]

    def token(self, i: int) -> str:
        return str(i)

    def show(self, model: Classifier, seed: int = 0, n: int = 4) -> str:
        x, y = self.test[0][:n], self.test[1][:n]
        lines = []
        for d, label, got in zip(x, y, self.predict(model, x)):
            word = lambda v: "palindrome" if v else "not a palindrome"
            ok = "ok" if got == label else "WRONG"
            lines.append(f"{''.join(map(str, d))}: {word(got)}  {ok}")
        return "\n".join(lines)


class Translate(Task):
    """Reverse a digit string of 3 to 8 digits, as a translation: an encoder-decoder
    (families.EncoderDecoder) reads the source, padded to 8, and writes the target.

    Ids: 0 pads, 1 starts the target (BOS), 2 ends it (EOS), digit d is d + 3. The decoder reads
    BOS and the target so far, "7 3 1", and must write "1 3 7 EOS". Its cross-attention has one
    right answer to look at: output position j copies source position n - 1 - j, so a head that
    learned the task shows the anti-diagonal (alignment). Held out as for reversal: a tenth of
    the strings by their hash. Chance: guessing every digit of the mean string right."""

    name, metric, higher_is_better = "translate", "exact_match", True
    steps, batch_size, lr, eval_every = 500, 64, 3e-3, 250
    architecture = EncoderDecoder
    PAD, BOS, EOS = 0, 1, 2

    def __init__(self, lengths: tuple[int, int] = (3, 8), seed: int = 0):
        self.lengths = lengths
        n = lengths[1]
        self.config = Config(vocab_size=13, n_ctx=n + 1, n_layer=2, n_head=4, n_embd=64,
                             pad_id=self.PAD)
        self.test = self.draw(np.random.default_rng([seed, 1]), 1000, held_out=True)
        self.chance = float(np.mean(10.0 ** -self.length(self.test)))

    def length(self, src: np.ndarray) -> np.ndarray:
        return (src != self.PAD).sum(-1)

    def held_out(self, src: np.ndarray) -> np.ndarray:
        weights = 7 ** np.arange(src.shape[1]) % 1009
        return (src * weights).sum(-1) % 10 == 0

    def draw(self, rng, B: int, held_out: bool) -> np.ndarray:
        """(B, 8) source ids, each string right-padded."""
        out = np.zeros((0, self.lengths[1]), np.int32)
        while len(out) < B:
            n = rng.integers(self.lengths[0], self.lengths[1] + 1, (2 * B, 1))
            digits = rng.integers(0, 10, (2 * B, self.lengths[1])) + 3
            src = np.where(np.arange(self.lengths[1]) < n, digits, self.PAD)
            out = np.concatenate([out, src[self.held_out(src) == held_out]])
        return out[:B].astype(np.int32)

    def targets(self, src: np.ndarray) -> np.ndarray:
        """(B, 9): each source's real digits backwards, then EOS, then padding."""
        n = self.length(src)
        out = np.full((len(src), self.config.n_ctx), self.PAD, np.int32)
        for i, (row, k) in enumerate(zip(src, n)):
            out[i, :k], out[i, k] = row[:k][::-1], self.EOS
        return out

    def decoder_inputs(self, tgt: np.ndarray) -> np.ndarray:
        """What the decoder reads for targets tgt (B, 9): BOS, then the target shifted by one."""
        return np.concatenate([np.full((len(tgt), 1), self.BOS), tgt[:, :-1]], 1).astype(np.int32)

    def correct(self, got: np.ndarray, want: np.ndarray) -> np.ndarray:
        """(B,): every digit and the EOS right; what the model writes after the EOS is free."""
        return ((got == want) | (want == self.PAD)).all(-1)

    def batch(self, rng, B: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
        """((source, decoder input), targets)."""
        src = self.draw(rng, B, held_out=False)
        tgt = self.targets(src)
        return (src, self.decoder_inputs(tgt)), np.where(tgt == self.PAD, IGNORE, tgt)

    def answer(self, model: EncoderDecoder, src: np.ndarray) -> np.ndarray:
        return translate(model, src, self.BOS, self.config.n_ctx)  # (B, 9), greedy

    def evaluate(self, model: EncoderDecoder, quick: bool = False) -> float:
        """Exact match on the held-out strings: every digit and the EOS after them."""
        return float(self.correct(self.answer(model, self.test), self.targets(self.test)).mean())

    def learned(self, score: float) -> bool:
        return score >= 0.95

    def alignment(self, model: EncoderDecoder) -> np.ndarray:
        """(L, H): how often each cross-attention head's strongest source position is the digit
        its output position copies (n - 1 - j), over the held-out strings' digit positions."""
        src = self.test
        inputs = self.decoder_inputs(self.targets(src))
        cross = encoder_decoder_maps(model, Tensor(src), Tensor(inputs))[1]
        strongest = cross["cross"].numpy().argmax(-1)  # (B, L, H, T)
        n = self.length(src)[:, None, None, None]
        j = np.arange(inputs.shape[1])
        hit = strongest == n - 1 - j  # (B, L, H, T)
        real = np.broadcast_to(j < n, hit.shape)
        return (hit & real).sum(axis=(0, 3)) / real.sum(axis=(0, 3))

    def explain(self, model: EncoderDecoder) -> str:
        """Name the alignment heads: those whose strongest source position is the copied digit
        for >= 90 % of held-out output digits."""
        where = f"over {len(self.test)} held-out strings' output digits"
        return heads.name_heads(self.alignment(model), "alignment", "cross-attention's strongest "
                                "source position is the digit copied", where)

    def example(self) -> tuple[np.ndarray, np.ndarray]:
        """A held-out source (its real digits) and its decoder input."""
        src = self.test[:1]
        n = int(self.length(src)[0])
        return src[0, :n], self.decoder_inputs(self.targets(src))[0, : n + 1]

    def token(self, i: int) -> str:
        return {self.PAD: "_", self.BOS: "<s>", self.EOS: "</s>"}.get(int(i), str(int(i) - 3))

    def inspect(self, model: EncoderDecoder, folder: Path) -> tuple[list[Path], str]:
        """Encoder, decoder and cross-attention of every head on one held-out string, drawn side
        by side (attention.png), and the alignment heads."""
        import plots

        src, inputs = self.example()
        _, maps = encoder_decoder_maps(model, Tensor(src[None]), Tensor(inputs[None]))
        maps = {k: v.numpy()[0] for k, v in maps.items()}  # each (L, H, queries, keys)
        folder.mkdir(parents=True, exist_ok=True)
        words = lambda ids: " ".join(self.token(i) for i in ids)
        out = self.answer(model, src[None])[0][: len(src) + 1]  # the digits and the EOS
        title = f"translate model: {words(src)} -> {words(out)}"
        caption = (f"rows of the decoder's maps, top to bottom: {words(inputs)}; columns of the "
                   f"encoder's and the cross-attention maps: {words(src)}")
        path = plots.encoder_decoder_heads(maps, folder / "attention.png", title, caption)
        np.savez(folder / "attention.npz", src=src, tgt=inputs, **maps)
        share = self.alignment(model)
        rows = [f"layer {layer}: " + "  ".join(f"H{h} {v:.1%}" for h, v in enumerate(row))
                for layer, row in enumerate(share)]
        report = "cross-attention heads, how often the strongest source position is the digit " \
                 "copied:\n" + "\n".join(rows)
        return [path, folder / "attention.npz"], report

    def show(self, model: EncoderDecoder, seed: int = 0, n: int = 4) -> str:
        got, want = self.answer(model, self.test[:n]), self.targets(self.test[:n])
        lines = []
        for src, g, w in zip(self.test[:n], got, want):
            k = int((src != self.PAD).sum())
            ok = "ok" if self.correct(g, w) else "WRONG"
            out = " ".join(self.token(i) for i in g[: k + 1])
            lines.append(f"{' '.join(self.token(i) for i in src[:k])} -> {out}  {ok}")
        return "\n".join(lines)


TASKS = {"reverse": Reverse, "shakespeare": Shakespeare, "words": Words, "grokking": Grokking,
         "grokking-slow": SlowGrokking, "induction": Induction, "classify": Palindromes,
         "translate": Translate, "text": Text}
