"""What attention heads do: scores that name a head's habit, readable token labels, and a
self-contained HTML page to explore every head of a model on one sentence.

Everything here works on attention probabilities already computed by the model's own forward
pass (attention_maps, at the hook points), as NumPy arrays (L, H, T, T) for one sequence or
(B, L, H, T, T) for a batch: row t of a head is where query t looked, and sums to 1.

The scores follow the head taxonomy of Olsson et al. (2022), "In-context Learning and Induction
Heads", and of the "attention sink" literature (Xiao et al., 2023):

    previous  attention from each token to the one just before it
    diagonal  attention from each token to itself
    first     attention to the first token, where many heads park what they do not need
    entropy   how spread out a row is, in nats (0: one key; ln(t + 1): uniform over t + 1 keys)
    induction attention from a token to the one after an earlier occurrence of the same token:
              the head that lets "A B ... A" predict "B"

Row 0 can only look at itself, so it is left out of every score but induction.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flags import UserError, atomic_write  # one user error; one temporary file, then rename


def batched(att: np.ndarray) -> np.ndarray:
    """(L, H, T, T) or (B, L, H, T, T) -> (B, L, H, T, T)."""
    att = np.asarray(att, dtype=np.float64)
    if att.ndim == 4:
        att = att[None]
    if att.ndim != 5 or att.shape[-1] != att.shape[-2]:
        raise ValueError(f"attention must be (B, L, H, T, T) or (L, H, T, T), got {att.shape}")
    return att


def previous_token_scores(att: np.ndarray) -> np.ndarray:
    """(L, H): mean attention from token t to token t - 1, over t >= 1."""
    att = batched(att)
    T = att.shape[-1]
    return att[..., np.arange(1, T), np.arange(T - 1)].mean(axis=(0, -1))


def diagonal_scores(att: np.ndarray) -> np.ndarray:
    """(L, H): mean attention from token t to itself, over t >= 1."""
    att = batched(att)
    T = att.shape[-1]
    return att[..., np.arange(1, T), np.arange(1, T)].mean(axis=(0, -1))


def first_token_scores(att: np.ndarray) -> np.ndarray:
    """(L, H): mean attention from token t to token 0, over t >= 1."""
    return batched(att)[..., 1:, 0].mean(axis=(0, -1))


def entropy_scores(att: np.ndarray) -> np.ndarray:
    """(L, H): mean entropy of rows t >= 1, in nats."""
    rows = batched(att)[..., 1:, :]
    logs = np.log(np.where(rows > 0, rows, 1.0))  # 0 log 0 = 0
    return -(rows * logs).sum(-1).mean(axis=(0, -1))


def induction_targets(ids: np.ndarray) -> np.ndarray:
    """(B, T, T) bool: key s is an induction target of query t when s <= t and the token before s
    equals the token at t: s is what followed an earlier occurrence of the current token."""
    ids = np.atleast_2d(np.asarray(ids))
    T = ids.shape[-1]
    same = ids[:, :, None] == ids[:, None, :]  # (B, T, T): ids[t] == ids[u]
    targets = np.zeros_like(same)
    targets[:, :, 1:] = same[:, :, :-1]  # key s = u + 1
    return targets & np.tril(np.ones((T, T), dtype=bool))  # causal: s <= t


def induction_scores(att: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(L, H): attention that each query puts on its induction targets, averaged over the queries
    that have any (on a random sequence repeated once: every token of the second copy)."""
    att = batched(att)
    targets = induction_targets(ids)  # (B, T, T)
    has = targets.any(-1)  # (B, T)
    if not has.any():
        raise ValueError("no token repeats, so no query has an induction target")
    mass = (att * targets[:, None, None]).sum(-1)  # (B, L, H, T)
    return (mass * has[:, None, None]).sum(axis=(0, -1)) / has.sum()


def induction_baseline(ids: np.ndarray) -> float:
    """The induction score of a head that attends uniformly to every key it may see."""
    ids = np.atleast_2d(np.asarray(ids))
    T = ids.shape[-1]
    uniform = np.tril(np.ones((T, T))) / np.arange(1, T + 1)[:, None]  # (T, T)
    att = np.broadcast_to(uniform, (len(ids), 1, 1, T, T))
    return float(induction_scores(att, ids)[0, 0])


def repeated_random_tokens(rng, n: int, vocab: int, batch: int = 1) -> np.ndarray:
    """(batch, 2n) int32: n distinct random tokens, then the same n again."""
    first = np.stack([rng.choice(vocab, n, replace=False) for _ in range(batch)])
    return np.concatenate([first, first], axis=1).astype(np.int32)


def top_heads(scores: np.ndarray, k: int = 3, largest: bool = True) -> list[tuple[int, int, float]]:
    """The k heads with the largest (or smallest) score: [(layer, head, score), ...]."""
    order = np.argsort(-scores if largest else scores, axis=None, kind="stable")[:k]
    return [(int(i // scores.shape[1]), int(i % scores.shape[1]), float(scores.flat[i]))
            for i in order]


# ---------------------------------------------------------------------------------------------
# All scores of a model at once, as a table
# ---------------------------------------------------------------------------------------------

SCORE_NAMES = ("previous", "diagonal", "first", "entropy", "induction")


def text_scores(att: np.ndarray) -> dict:
    """name -> (L, H) for the scores measured on the text itself: all but induction."""
    return {"previous": previous_token_scores(att), "diagonal": diagonal_scores(att),
            "first": first_token_scores(att), "entropy": entropy_scores(att)}


def all_scores(att: np.ndarray, repeated_att: np.ndarray, repeated_ids: np.ndarray) -> dict:
    """name -> (L, H). The induction score is measured on its own input, a random sequence
    repeated (repeated_ids, with its attention repeated_att); the others on att."""
    return {**text_scores(att), "induction": induction_scores(repeated_att, repeated_ids)}


def score_table(scores: dict) -> str:
    """One row per head: layer, head, then every score."""
    names = list(scores)
    L, H = scores[names[0]].shape
    lines = ["layer head " + " ".join(f"{n:>9}" for n in names)]
    for layer in range(L):
        for head in range(H):
            values = " ".join(f"{scores[n][layer, head]:9.3f}" for n in names)
            lines.append(f"{layer:5d} {head:4d} {values}")
    return "\n".join(lines)


def top_lines(scores: dict, k: int = 3) -> list[str]:
    """The k strongest heads of each kind, one line per kind; for entropy the sharpest (lowest)."""
    lines = []
    for name, values in scores.items():
        lowest = name == "entropy"
        best = top_heads(values, min(k, values.size), largest=not lowest)
        heads = ", ".join(f"L{layer}H{head} {v:.2f}" for layer, head, v in best)
        lines.append(f"top {name}{' (lowest)' if lowest else ''}: {heads}")
    return lines


# ---------------------------------------------------------------------------------------------
# Token labels
# ---------------------------------------------------------------------------------------------


def readable(piece: str | bytes) -> str:
    """A token as a reader can see it: GPT-2's leading space as ·, a newline as ↵, a tab as ⇥.

    Given a token's bytes, the bytes that are no whole UTF-8 character show as escapes, \\xf0:
    GPT-2's byte-level BPE splits an emoji or a CJK character over two or three tokens, and as
    U+FFFD every such piece looked the same. Escapes keep one label per token (a map has a row
    per token, so pieces cannot be merged) and say which bytes each piece holds."""
    if isinstance(piece, bytes):
        piece = piece.decode("utf-8", "backslashreplace")
    shown = piece.replace(" ", "·").replace("\n", "↵").replace("\r", "␍").replace("\t", "⇥")
    return shown or "∅"


def distinct(labels: list[str]) -> list[str]:
    """Tokens that occur more than once carry their position, e.g. ·the[2] and ·the[7]."""
    counts = {label: labels.count(label) for label in labels}
    return [f"{label}[{i}]" if counts[label] > 1 else label for i, label in enumerate(labels)]


def parse_window(spec: str | None, T: int) -> tuple[int, int]:
    """'A:B' (Python slice bounds, either may be empty or negative) -> (a, b), 0 <= a < b <= T."""
    if spec is None:
        return 0, T
    parts = spec.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        a, b, _ = slice(*(int(p) if p.strip() else None for p in parts)).indices(T)
    except ValueError:
        raise UserError(f"--tokens {spec!r}: expected A:B, e.g. 0:40") from None
    if a >= b:
        raise UserError(f"--tokens {spec!r} selects no token of the {T}")
    return a, b


# ---------------------------------------------------------------------------------------------
# From pictures to causes: knock heads out, read the stream through the unembedding
# ---------------------------------------------------------------------------------------------


def parse_heads(spec: str, n_layer: int, n_head: int) -> list[tuple[int, int]]:
    """--heads "L.H,L.H" -> [(L, H), ...], each a head of the model, each once."""
    heads = []
    for part in spec.split(","):
        try:
            layer, head = (int(n) for n in part.strip().split("."))
        except ValueError:
            raise UserError(f"--heads {spec!r}: expected LAYER.HEAD,..., e.g. 0.2,1.3") from None
        if not (0 <= layer < n_layer and 0 <= head < n_head):
            raise UserError(f"--heads: no head {layer}.{head}: the model has layers "
                             f"0-{n_layer - 1} and heads 0-{n_head - 1}")
        if (layer, head) not in heads:
            heads.append((layer, head))
    return heads


def knock_out(z, keep, mean: str | None = None):
    """Head ablation at hook_z, z (B, T, H, hs), each head's output before c_proj: keep[h] = 0
    replaces head h by zeros, or by a mean (MEANS); keep[h] = 1 leaves it exactly (z * 1 + 0)."""
    keep = keep.reshape(1, 1, -1, 1)  # (1, 1, H, 1)
    if mean is None:
        fill = 0.0
    elif not isinstance(mean, str):  # one layer's ReferenceMean, (1, 1, H, hs)
        fill = mean
    elif mean == "causal":  # position t: the mean of positions 0..t, nothing from its future
        from tinygrad import Tensor

        T = z.shape[1]
        fill = z.cumsum(1) / Tensor.arange(1, T + 1).reshape(1, T, 1, 1)
    else:
        fill = z.mean(MEANS[mean], keepdim=True)
    return z * keep + fill * (1 - keep)


# A knocked-out head's replacement (TransformerLens's mean ablation), by the axes of hook_z's
# (B, T, H, hs) it averages: "causal" over the text's positions so far (a running mean, so no
# position learns of later tokens), "positions" over all of them (the future included: a
# summary of what comes later, the target among it), "batch" over the batch at each position
MEANS = {"causal": None, "positions": 1, "batch": 0}


class ReferenceMean(list):
    """A mean taken from another text: each layer's hook_z averaged over all of that text's
    positions, (1, 1, H, hs) per layer, so the text being scored lends nothing to its own
    replacement. Made by reference_mean; named "reference-text" in the output."""

    def __str__(self):
        return "reference-text"


def reference_mean(model, ids: np.ndarray) -> ReferenceMean:
    """Every head's mean output over the reference text ids (T,), per layer."""
    from tinygrad import Tensor

    names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.config.n_layer)]
    _, cache = model.run_with_cache(Tensor(np.asarray(ids, np.int32)[None]), names)
    return ReferenceMean(cache[name].mean((0, 1), keepdim=True).realize() for name in names)


class KnockOut:
    """While open, a hook at every layer's hook_z multiplies its heads by a keep mask
    (knock_out); knock(heads) zeroes exactly those heads' masks. The masks are buffers written in
    place, so a TinyJit'd score replays with whatever they hold now. mean: None replaces a head
    by zeros, else by one of MEANS or a ReferenceMean."""

    def __init__(self, model, mean: str | None = None):
        from tinygrad import Tensor

        L, self.H = model.config.n_layer, model.config.n_head
        self.keeps = [Tensor.ones(self.H).contiguous().realize() for _ in range(L)]
        pick = lambda layer: mean[layer] if isinstance(mean, ReferenceMean) else mean
        knock = lambda keep, layer: lambda z: knock_out(z, keep, pick(layer))
        self.model = model
        self.fns = {f"blocks.{layer}.attn.hook_z": knock(keep, layer)
                    for layer, keep in enumerate(self.keeps)}

    def __enter__(self) -> KnockOut:
        # a new hooks context each time: the workbench opens one KnockOut again per request,
        # its masks the buffers its compiled pass reads
        self.hooks = self.model.hooks(self.fns)
        self.hooks.__enter__()
        return self

    def knock(self, heads: list[tuple[int, int]]):
        from tinygrad import Tensor

        for layer, keep in enumerate(self.keeps):
            values = np.ones(self.H, dtype=np.float32)
            values[[h for lay, h in heads if lay == layer]] = 0.0
            keep.assign(Tensor(values)).realize()

    def __exit__(self, *exc):
        return self.hooks.__exit__(*exc)


def ablate_each_head(model, score, mean: str | None = None) -> tuple[float, np.ndarray]:
    """score() with no head knocked out, and score() minus that with each head knocked out
    alone, (L, H): how much the model needs each head for what score measures."""
    L, H = model.config.n_layer, model.config.n_head
    delta = np.zeros((L, H))
    with KnockOut(model, mean) as ko:
        base = score()
        for layer in range(L):
            for head in range(H):
                ko.knock([(layer, head)])
                delta[layer, head] = score() - base
    return base, delta


def ablate_heads(model, score, heads: list[tuple[int, int]],
                 mean: str | None = None) -> tuple[float, float]:
    """score() as it is, and with every head in heads knocked out together."""
    with KnockOut(model, mean) as ko:
        base = score()
        ko.knock(heads)
        return base, score()


def ablation_report(model, score, out: Path, heads_spec: str | None = None,
                    mean: str | None = None, metric: str = "loss", key: str = "loss",
                    title: str = "", higher_is_better: bool = False, saved: dict | None = None):
    """Knock out each head of model alone and write what it costs score() into the folder out:
    ablation.npz ({key}_delta (L, H), base_{key}, and the arrays in saved) and ablation.png;
    or, with heads_spec ("L.H,..."), knock that set out together and write nothing.
    -> (files written, the report to print, base score, deltas or None)."""
    import plots

    kind = "zero" if mean is None else f"{mean} mean"
    c = model.config
    if heads_spec is not None:
        chosen = parse_heads(heads_spec, c.n_layer, c.n_head)
        base, knocked = ablate_heads(model, score, chosen, mean)
        names = ", ".join(f"L{a}H{b}" for a, b in chosen)
        return [], (f"knocking out {names} together ({kind} ablation): {metric} {base:.4f} -> "
                    f"{knocked:.4f} ({knocked - base:+.4f})"), base, None
    folder = writable_folder(out)
    base, delta = ablate_each_head(model, score, mean)
    arrays = {f"{key}_delta": delta, f"base_{key}": base, **(saved or {})}
    written = [atomic_write(folder / "ablation.npz", lambda f: np.savez(f, **arrays))]
    written.append(plots.ablation(delta, folder / "ablation.png", f"{title}: {kind} ablation",
                                  f"change in {metric}"))
    table = ablation_table(delta, f"change in {metric} ({kind} ablation)",
                           worse_is_lower=higher_is_better)
    return written, f"{metric} {base:.4f} with every head\n{table}", base, delta


def ablation_table(delta: np.ndarray, label: str, k: int = 5, worse_is_lower: bool = False) -> str:
    """A layers x heads table of delta and one line naming the k heads whose loss cost most."""
    L, H = delta.shape
    lines = [f"{label}, knocking out one head at a time (row: layer, column: head)",
             "layer " + "".join(f"{h:>9}" for h in range(H))]
    lines += [f"{layer:5d} " + "".join(f"{v:+9.4f}" for v in row) for layer, row in
              enumerate(delta)]
    order = np.argsort(delta, axis=None)
    order = order if worse_is_lower else order[::-1]
    top = [np.unravel_index(i, delta.shape) for i in order[:k]]
    lines.append("top heads: " + ", ".join(f"L{a}H{b} {delta[a, b]:+.4f}" for a, b in top))
    return "\n".join(lines)


def top_k(p: np.ndarray, k: int) -> np.ndarray:
    """The indices of the k largest values of each row of p (..., V), largest first:
    argpartition, then a sort of those k alone (among them, equal values in index order; a tie
    at the k-th place may keep either). A full argsort of GPT-2's 50257 columns at every position
    and reading was most of the lens's time (the workbench runs it on every request)."""
    part = np.argpartition(-p, k - 1, axis=-1)[..., :k]
    order = np.lexsort((part, -np.take_along_axis(p, part, -1)), axis=-1)
    return np.take_along_axis(part, order, -1)


def lens_points(model) -> list[str]:
    """The hook points the logit lens reads: the stream after the embedding, then after each
    block."""
    L = model.config.n_layer
    return [*(f"blocks.{layer}.hook_resid_pre" for layer in range(L)),
            f"blocks.{L - 1}.hook_resid_post"]


def logit_lens(model, ids: np.ndarray, k: int = 5) -> dict:
    """The logit lens (nostalgebraist, 2020): the residual stream after the embedding and after
    each block, read through the final LayerNorm and the unembedding (model.unembed), for ids
    (T,). -> next_token_prob (L + 1, T), the probability each reading gives the actual next
    token (NaN at the last position, which has none), top_ids and top_probs (L + 1, T, k). The
    last reading is the model's own logits, the same tensor."""
    from tinygrad import Tensor

    ids = np.asarray(ids, dtype=np.int32)
    logits, cache = model.run_with_cache(Tensor(ids[None]), lens_points(model))
    return read_lens(model, ids, logits, cache, k)


def read_lens(model, ids: np.ndarray, logits, cache: dict, k: int = 5) -> dict:
    """logit_lens from a pass already run on ids (T,): its logits and a cache holding at least
    lens_points (so a caller that reads other points too runs one pass, not two)."""
    stream = [cache[name] for name in lens_points(model)]
    T = len(ids)
    next_prob = np.full((len(stream), T), np.nan)
    top_ids = np.zeros((len(stream), T, k), dtype=np.int64)
    top_probs = np.zeros((len(stream), T, k))
    for row, x in enumerate(stream):
        out = logits if row == len(stream) - 1 else model.unembed(x)
        z = out.numpy()[0].astype(np.float64)  # (T, V), one reading at a time: GPT-2's is big
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        next_prob[row, :-1] = p[np.arange(T - 1), ids[1:]]
        top_ids[row] = top_k(p, k)
        top_probs[row] = np.take_along_axis(p, top_ids[row], -1)
    return {"next_token_prob": next_prob, "top_ids": top_ids, "top_probs": top_probs, "ids": ids}


def lens_read(z, next_ids):
    """One set of the logit lens's readings z (N, T, V) -> Tensors top_ids (N, T), top_probs and
    next_probs (N, T): the top reading, its probability and that of each position's next token,
    next_ids (T,) int32 (any id at the last position, which has none)."""
    # not made contiguous: the product is its own kernel either way (a reduction cannot feed
    # another inside one), and copying GPT-2's readings out of the padded vocabulary (50304
    # columns) took a sixth of the lens
    z = z.float()
    # each reduction its own kernel: fused into one, GPT-2's of 24 or more positions crashed on
    # the CPU (tinygrad 0.14 with runtime.py's pieces)
    top = z.max(-1).realize()
    lse = (top + (z - top.unsqueeze(-1)).exp().sum(-1).log()).realize()  # softmax's log norm
    index = next_ids.reshape(1, -1, 1).expand(z.shape[0], -1, 1)
    picked = z.gather(-1, index).squeeze(-1).realize()
    return z.argmax(-1).realize(), (top - lse).exp(), (picked - lse).exp()


def lens_report(lens: dict, labels: list[str], decode) -> str:
    """Per position: the input token, the actual next one, and the layer whose reading first
    puts it on top, with each reading's probability of it."""
    prob, top = lens["next_token_prob"], lens["top_ids"]
    lines = ["position token -> next: probability of the next token after embed, block 0, ..."]
    ids = lens["ids"]
    for t in range(len(ids) - 1):
        first = next((r for r in range(len(prob)) if top[r, t, 0] == ids[t + 1]), None)
        where = "never top" if first is None else ("top from embed" if first == 0 else
                                                   f"top from block {first - 1}")
        cells = " ".join(f"{p:.2f}" for p in prob[:, t])
        lines.append(f"{t:4d} {labels[t]} -> {readable(decode(ids[t + 1]))}: {cells}  ({where})")
    return "\n".join(lines)


def write_lens(out: Path, lens: dict, labels: list[str], decode, title: str,
               window: tuple[int, int]) -> list[Path]:
    """lens.npz (everything) and lens.png (positions in window) into the folder out."""
    import plots

    out = writable_folder(out)
    a, b = window
    written = [atomic_write(out / "lens.npz", lambda f: np.savez(f, **lens))]
    top1 = [[readable(decode(i)) for i in row[a:b, 0]] for row in lens["top_ids"]]
    written.append(plots.logit_lens(lens["next_token_prob"][:, a:b], top1,
                                    distinct(labels)[a:b], out / "lens.png", title))
    return written


# ---------------------------------------------------------------------------------------------
# Writing every view of one input
# ---------------------------------------------------------------------------------------------


def write_views(out: Path, att: np.ndarray, ids: np.ndarray, labels: list[str], title: str,
                scores: dict, window: tuple[int, int] | None = None,
                head: tuple[int, int] | None = None) -> list[Path]:
    """Write into the folder out: attention.npz (everything, as computed), heads.png, scores.png,
    attention.html and, for head = (layer, head), layer{L}-head{H}.png. The pictures and the page
    show the tokens in window = (a, b) only. Every file is written whole or not at all."""
    import plots

    out = writable_folder(out)
    a, b = window or (0, att.shape[-1])
    shown = att[:, :, a:b, a:b]
    names = distinct(labels)[a:b]
    written = [atomic_write(out / "attention.npz", lambda f: np.savez(
        f, attention=att.astype(np.float32), ids=np.asarray(ids, dtype=np.int64),
        **{f"score_{k}": v for k, v in scores.items()}))]
    written.append(plots.all_heads(shown, out / "heads.png", title, names))
    written.append(plots.head_scores(scores, out / "scores.png", title))
    page = html_page(shown, names, title, first=a)
    written.append(atomic_write(out / "attention.html", lambda f: f.write(page.encode())))
    if head is not None:
        layer, h = head
        written.append(plots.one_head(shown[layer, h], names, out / f"layer{layer}-head{h}.png",
                                      f"{title}: layer {layer}, head {h}"))
    return written


def writable_folder(out: Path) -> Path:
    """Make the folder out if needed and check that files can be written into it."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"cannot write into {out}: {e.strerror or e}") from None
    return out


def check_head(layer, head, n_layer: int, n_head: int) -> tuple[int, int] | None:
    """--layer and --head, both or neither, within the model -> (layer, head) or None."""
    if (layer is None) != (head is None):
        raise UserError("--layer and --head go together: name one head, e.g. --layer 1 --head 0")
    if layer is not None and not (0 <= layer < n_layer and 0 <= head < n_head):
        raise UserError(f"no head {layer}.{head}: the model has layers 0-{n_layer - 1} and "
                         f"heads 0-{n_head - 1}")
    return None if layer is None else (layer, head)


def report(att: np.ndarray, scores: dict, labels: list[str], window: tuple[int, int],
           head: tuple[int, int] | None = None) -> str:
    """The score table, the top heads of each kind and, for one head on at most 20 tokens, its
    probabilities as numbers."""
    lines = [score_table(scores), *top_lines(scores)]
    a, b = window
    if head is not None and b - a <= 20:
        layer, h = head
        lines.append(f"layer {layer}, head {h}: row = query (attending), column = key")
        lines.append(head_numbers(att[layer, h, a:b, a:b], distinct(labels)[a:b]))
    return "\n".join(lines)


def head_numbers(att: np.ndarray, labels: list[str]) -> str:
    """One head's (T, T) probabilities as a table: a row per query, a column per key."""
    names = [n[:8] for n in labels]
    lines = [" " * 9 + " ".join(f"{n:>8}" for n in names)]
    for name, row in zip(names, att):
        lines.append(f"{name:>8} " + " ".join(f"{v:8.3f}" for v in row))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The page: one self-contained HTML file, no network request of any kind
# ---------------------------------------------------------------------------------------------

# Probabilities travel as integers in units of 1/SCALE (4 decimals), lower triangles only: the
# masked future is exactly 0, and this keeps GPT-2's 144 heads on 100 tokens near 3 MB.
SCALE = 10_000
# The page's HTML, style and script, with TITLE and DATA for html_page to fill in
PAGE = Path(__file__).with_name("attention.html.template")


def page_data(att: np.ndarray, labels: list[str], title: str, first: int = 0) -> dict:
    """What the page embeds: att (L, H, T, T) as rounded lower triangles, one list per head."""
    L, H, T, _ = att.shape
    rows, cols = np.tril_indices(T)  # row-major: query q's keys 0..q start at q (q + 1) / 2
    tri = np.rint(att[:, :, rows, cols] * SCALE).astype(np.int64).reshape(L * H, -1)
    return {"title": title, "tokens": labels, "first": first, "layers": L, "heads": H,
            "scale": SCALE, "att": tri.tolist()}


def html_page(att: np.ndarray, labels: list[str], title: str, first: int = 0) -> str:
    data = json.dumps(page_data(att, labels, title, first), ensure_ascii=False,
                      separators=(",", ":"))
    data = data.replace("</", "<\\/")  # a token "</script>" must not end the data block
    safe_title = title.replace("&", "&amp;").replace("<", "&lt;")
    return PAGE.read_text(encoding="utf-8").replace("TITLE", safe_title).replace("DATA", data)



# ---------------------------------------------------------------------------------------------
# One call for a model: forward, scores, every view
# ---------------------------------------------------------------------------------------------


def name_heads(share: np.ndarray, kind: str, what: str, where: str, bar: float = 0.9) -> str:
    """One line naming the heads whose share (L, H) of positions shows what (e.g. "strongest
    attention on the mirrored digit") reaches bar; if none does, the best head and its share."""
    found = [f"L{layer}H{h} {share[layer, h]:.1%}" for layer, h in np.argwhere(share >= bar)]
    if found:
        return f"{kind} heads ({what}, {where}): {', '.join(found)}"
    layer, h = np.unravel_index(share.argmax(), share.shape)
    return (f"{kind} heads: none reaches {bar:.0%} ({where}); the best, L{layer}H{h}: {what} "
            f"{share[layer, h]:.1%} of the time")


def attention_maps(model, idx, logits=True):
    """Logits (B, T, vocab) and every head's attention (B, n_layer, n_head, T, T) for ids (B, T)
    from one pass, read at each layer's hook_pattern: what is shown is the very probabilities
    the pass multiplied its values with. logits=False: the maps alone (None for the logits,
    never computed)."""
    from tinygrad import Tensor

    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.config.n_layer)]
    # causal, unpadded: as a prefill, block by block, which tinygrad schedules sooner
    start = 0 if model.config.causal and model.config.pad_id is None else None
    out, cache = model.run_with_cache(idx, names, None if logits else model.final_stream,
                                      start_pos=start)
    return (out if logits else None), Tensor.stack(*[cache[n] for n in names], dim=1)


def attention_of_rows(model, rows: list[np.ndarray], length: int) -> list[np.ndarray]:
    """Every head's attention (L, H, T, T) on each row of ids (T,), from one forward pass on
    the rows padded on the right to length. Attention is causal, so no real position sees the
    padding, and each row's real rows and columns are its unpadded pass's."""
    from tinygrad import Tensor

    batch = np.zeros((len(rows), length), dtype=np.int32)
    for b, ids in enumerate(rows):
        batch[b, : len(ids)] = ids
    # only the maps: the logits are never read (a quarter of the work on GPT-2)
    _, att = attention_maps(model, Tensor(batch), logits=False)
    att = att.numpy()
    return [att[b, :, :, : len(ids), : len(ids)] for b, ids in enumerate(rows)]


def padded_attention(model, ids: np.ndarray) -> np.ndarray:
    """Every head's attention (L, H, T, T) on ids (T,), padded on the right to its bucket
    (generate.prefill_bucket): texts of other lengths in the bucket run the same kernels,
    kept on disk, instead of generating new ones."""
    from generate import padded_length

    return attention_of_rows(model, [ids], padded_length(model, len(ids)))[0]


def probe_induction(model, seed: int = 0, key: str | None = None,
                    text: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(L, H) induction scores of model on its probe: 4 random sequences of distinct tokens, each
    repeated once, as long as the model's context allows (up to 2 x 50 tokens).

    The scores depend on the weights alone, and the probe is the costliest pass of --attention,
    so with a key (one that names the checkpoint file as it is now: gpt.py passes its path, size
    and mtime) they are kept in tinygrad's disk cache beside its kernels and read back by later
    runs; CACHELEVEL=0 turns that off with the kernel cache.

    text: ids (T,) whose attention the caller wants too. When the probe runs and the text fits
    its rows, the text is a fifth row of the probe's pass, padded on the right (causal models):
    one pass instead of two: on a new checkpoint, GPT-2's --attention does not schedule and run
    a pass for the text alone (docs/speed.md). Returns the scores and the text's attention
    (L, H, T, T), or None where it was not computed."""
    from tinygrad.helpers import diskcache_get, diskcache_put

    if key is not None:
        key = f"{key}|seed={seed}"
        kept = diskcache_get("tinygpt_induction", key)
        if kept is not None:
            return kept, None
    n = min(50, model.config.n_ctx // 2, model.config.vocab_size)
    repeated = repeated_random_tokens(np.random.default_rng(seed), n, model.config.vocab_size, 4)
    rows = list(repeated)
    # padding is safe where the mask hides it and no token id means padding (as attention_maps)
    c = model.config
    if text is not None and len(text) <= 2 * n and c.causal and c.pad_id is None:
        rows.append(text)
    att = attention_of_rows(model, rows, 2 * n)
    scores = induction_scores(np.stack(att[:4]), repeated)
    if key is not None:
        diskcache_put("tinygpt_induction", key, scores)
    return scores, (att[4] if len(att) == 5 else None)


def inspect_model(model, ids: np.ndarray, labels: list[str], out: Path, title: str,
                  tokens: str | None = None, layer: int | None = None, head: int | None = None,
                  seed: int = 0, probe_key: str | None = None) -> tuple[list[Path], str]:
    """Run model (a transformer.Transformer) on ids (T,), score every head, write every view into
    out; tokens is --tokens' window "A:B", layer and head name one head to draw large. The
    induction score needs its own input (probe_induction; probe_key: see there).
    Returns the files written and the report to print (see report). Bad arguments raise
    UserError, an unwritable folder OSError, both before any work."""
    chosen = check_head(layer, head, model.config.n_layer, model.config.n_head)
    window = parse_window(tokens, len(ids))
    writable_folder(out)
    induction, att = probe_induction(model, seed, probe_key, text=ids)
    if att is None:  # the probe's scores were kept, or the text does not fit its pass
        att = padded_attention(model, ids)  # (L, H, T, T)
    scores = {**text_scores(att), "induction": induction}
    written = write_views(out, att, ids, labels, title, scores, window, chosen)
    return written, report(att, scores, labels, window, chosen)
