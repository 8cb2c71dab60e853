"""Every figure of the project, drawn with matplotlib: attention maps, head scores, training curves.

One small module so that the training loop and the models stay free of plotting code. Figures are
drawn off-screen (the Agg backend: no display needed) and written under a temporary name, then
renamed, so an interrupted run never leaves half a PNG.

    python gpt.py --attention "The cat sat on the mat"   # heads.png, scores.png, ...
    python transformer.py --task reverse --attention     # the same views for a toy model
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from flags import atomic_write


def subplots(*grid, figsize, layout=None, **kw):
    """A figure of its own and its axes, as plt.subplots makes them, without pyplot: its import
    (its cost: docs/speed.md) and its table of open windows do nothing for a file. savefig draws
    with Agg, off-screen."""
    fig = Figure(figsize=figsize, layout=layout)
    return fig, fig.subplots(*grid, **kw)


def save(fig, path: Path, dpi: int = 100) -> Path:
    """Write fig as a PNG under a temporary name, then rename it into place. A title over all
    panels (the command of a training run) also goes into the file's Title field."""
    return atomic_write(path, lambda f: fig.savefig(
        f, dpi=dpi, format="png", metadata={"Title": fig.get_suptitle() or None}))


# ---------------------------------------------------------------------------------------------
# Attention maps and head scores
# ---------------------------------------------------------------------------------------------

CMAP = "Blues"  # white at 0, so the masked future (exactly 0) reads as empty


def tick_labels(ax, labels: list[str], max_labels: int = 64):
    """Every token on both axes when they fit; otherwise every k-th, so long inputs still read."""
    T = len(labels)
    every = max(1, -(-T // max_labels))
    ticks = list(range(0, T, every))
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=8)
    ax.set_yticks(ticks, [labels[i] for i in ticks], fontsize=8)


def mosaic_gap(T: int, S: int) -> int:
    """The grey gap between a mosaic's (T, S) panels, in cells."""
    return max(1, max(T, S) // 8)


def mosaic(ax, att, fontsize: int = 9):
    """att (L, H, T, S) into ax as one image: a (T, S) panel per head, layers as rows and heads
    as columns, grey gaps between, on the colour scale [0, 1]. One image instead of one axes per
    head: matplotlib lays out, ticks and draws each axes on its own, 144 times for GPT-2
    (docs/speed.md, "The figures")."""
    L, H, T, S = att.shape
    gap = mosaic_gap(T, S)
    image = np.full((L * (T + gap) - gap, H * (S + gap) - gap), np.nan)  # NaN: the gaps
    for layer in range(L):
        for head in range(H):
            y, x = layer * (T + gap), head * (S + gap)
            image[y : y + T, x : x + S] = att[layer, head]
    cmap = matplotlib.colormaps[CMAP].with_extremes(bad="0.8")  # grey gaps frame each panel
    shown = ax.imshow(image, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    centres = lambda n, size: [i * (size + gap) + (size - 1) / 2 for i in range(n)]
    ax.set_xticks(centres(H, S), [f"head {h}" for h in range(H)], fontsize=fontsize)
    ax.set_yticks(centres(L, T), [f"layer {layer}" for layer in range(L)], fontsize=fontsize)
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    return shown


# heads.png names the tokens on its maps' axes up to this many: beyond, a panel of 1.3 inches
# has no room for them (heads.py's report and the page name every token)
MOSAIC_LABELS = 20


def token_axes(ax, labels: list[str], L: int, H: int, gap: int):
    """Name the tokens of a mosaic's panels: keys under each panel of the bottom row, queries
    left of each panel of the left column. The layer names move to the right side."""
    T = len(labels)
    fontsize = 6 if T > 10 else 7
    keys = ax.secondary_xaxis("bottom")
    keys.set_xticks([h * (T + gap) + k for h in range(H) for k in range(T)], labels * H,
                    rotation=90, fontsize=fontsize)
    queries = ax.secondary_yaxis("left")
    queries.set_yticks([layer * (T + gap) + q for layer in range(L) for q in range(T)],
                       labels * L, fontsize=fontsize)
    for side in (keys, queries):
        side.tick_params(length=0, pad=1)
        side.spines[:].set_visible(False)
    ax.yaxis.tick_right()


def all_heads(att, path: Path, title: str = "", labels: list[str] | None = None) -> Path:
    """att (L, H, T, T): every head as a small heatmap (mosaic), all on one colour scale [0, 1]
    so heads compare; with labels (one per token) and at most MOSAIC_LABELS tokens, the maps'
    axes name them."""
    L, H, T = att.shape[:3]
    size = 1.3 if L * H > 16 else 2.0
    named = labels is not None and T <= MOSAIC_LABELS
    grow = 0.6 if named else 0  # room for the token names under and left of the maps
    fig, ax = subplots(figsize=(size * H + 1.2 + grow, size * L + 0.8 + grow),
                       layout="constrained")
    image = mosaic(ax, att)
    if named:
        token_axes(ax, labels, L, H, mosaic_gap(T, T))
    fig.colorbar(image, ax=ax, shrink=0.6, label="attention")
    fig.supxlabel("each map: a row per query (first token at top), a column per key", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return save(fig, path, dpi=80)


def encoder_decoder_heads(maps: dict, path: Path, title: str = "", caption: str = "") -> Path:
    """An encoder-decoder's three kinds of attention side by side, each (L, H, queries, keys):
    the encoder's self-attention (source x source), the decoder's masked self-attention (target
    x target) and cross-attention (target x source), where a translation's alignment shows."""
    kinds = (("encoder", "encoder self-attention\nsource x source"),
             ("decoder", "decoder self-attention (masked)\ntarget x target"),
             ("cross", "cross-attention\ntarget (rows) x source (columns)"))
    L, H = maps["cross"].shape[:2]
    fig, axes = subplots(1, 3, figsize=(3 * (1.3 * H + 0.4), 1.3 * L + 1.4),
                             layout="constrained")
    for ax, (kind, label) in zip(axes, kinds):
        image = mosaic(ax, maps[kind], fontsize=8)
        ax.set_xlabel(label, fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention")
    if title:
        fig.suptitle(title, fontsize=10)
    if caption:  # which token each row and column is
        fig.supxlabel(caption, fontsize=9)
    return save(fig, path, dpi=80)


def one_head(att, labels: list[str], path: Path, title: str) -> Path:
    """att (T, T) of one head, large: queries down, keys across, every token labelled."""
    T = len(labels)
    side = min(12.0, max(4.0, 0.28 * T + 2))
    fig, ax = subplots(figsize=(side + 1.5, side), layout="constrained")
    image = ax.imshow(att, cmap=CMAP, vmin=0, vmax=1, interpolation="nearest")
    tick_labels(ax, labels)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention")
    return save(fig, path)


def layer_head_axes(ax, values, fmt: str, dark):
    """Label a layers x heads heatmap's axes and, when the grid is small enough to read, write
    each value in its cell (white where dark(value) says the colour is dark)."""
    L, H = values.shape
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    if L * H <= 64:
        for (layer, head), v in np.ndenumerate(values):
            ax.text(head, layer, fmt.format(v), ha="center", va="center", fontsize=7,
                    color="white" if dark(v) else "black")


def head_scores(scores: dict, path: Path, title: str = "") -> Path:
    """One layers x heads heatmap per score (name -> (L, H) array), each with its colour bar and
    each value written in its cell when the grid is small enough to read. Laid out by hand, in
    inches: a layout engine measures every tick label first, a pass the hand layout does without
    (docs/speed.md, "The figures")."""
    n = len(scores)
    L, H = next(iter(scores.values())).shape
    w, h = max(1.4, 0.3 * H), max(1.2, 0.3 * L)  # one heatmap, in inches
    left, bar, gap, bottom, top = 0.55, 0.95, 0.55, 0.5, 0.55  # labels, colour bar, titles
    width, height = left + n * (w + bar) + (n - 1) * gap, bottom + h + top
    fig = Figure(figsize=(width, height))
    for i, (name, values) in enumerate(scores.items()):
        x = left + i * (w + bar + gap)
        ax = fig.add_axes((x / width, bottom / height, w / width, h / height))
        cax = fig.add_axes(((x + w + 0.1) / width, bottom / height, 0.12 / width, h / height))
        top_value = max(1.0, float(values.max())) if name == "entropy" else 1.0
        image = ax.imshow(values, cmap="viridis", vmin=0, vmax=top_value, aspect="auto")
        ax.set_title(name, fontsize=10)
        layer_head_axes(ax, values, "{:.2f}", lambda v, t=top_value: v < 0.6 * t)
        fig.colorbar(image, cax=cax, label="nats" if name == "entropy" else "attention")
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.06 / height, va="top")
    return save(fig, path, dpi=80)


def ablation(delta, path: Path, title: str, label: str) -> Path:
    """delta (L, H): what knocking out each head alone did to a score, as a layers x heads
    heatmap on a scale centred at 0 (red: worse, blue: better for a loss), values in the cells
    when the grid is small enough to read, and a colour bar that names the score."""
    L, H = delta.shape
    top = max(float(np.abs(delta).max()), 1e-9)
    fig, ax = subplots(figsize=(max(4.2, 0.45 * H + 2.6), max(2.5, 0.4 * L + 1.5)),
                           layout="constrained")
    image = ax.imshow(delta, cmap="RdBu_r", vmin=-top, vmax=top, aspect="auto")
    layer_head_axes(ax, delta, "{:+.3f}", lambda v: abs(v) > 0.6 * top)
    fig.colorbar(image, ax=ax, shrink=0.8, label=label)
    ax.set_title(title, fontsize=10)
    return save(fig, path)


def logit_lens(prob, top1: list[list[str]], labels: list[str], path: Path, title: str) -> Path:
    """prob (L + 1, T): the probability of each position's actual next token, read from the
    stream after the embedding (row 0) and after each block; top1[row][t] is the likeliest token
    there, written in its cell. Columns are the input tokens; the last has no next token."""
    rows, T = prob.shape
    fig, ax = subplots(figsize=(max(4.0, 0.62 * T + 2), max(2.5, 0.36 * rows + 1.6)),
                           layout="constrained")
    image = ax.imshow(np.nan_to_num(prob, nan=0.0), cmap=CMAP, vmin=0, vmax=1, aspect="auto")
    for (row, t), p in np.ndenumerate(prob):
        ax.text(t, row, top1[row][t][:7], ha="center", va="center", fontsize=7,
                color="white" if p > 0.6 else "black")
    ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(rows), ["embed"] + [f"block {i}" for i in range(rows - 1)], fontsize=7)
    ax.set_xlabel("input token (the cell's text: the likeliest next token at that layer)")
    fig.colorbar(image, ax=ax, shrink=0.9, label="P(actual next token)")
    ax.set_title(title, fontsize=10)
    return save(fig, path)


def patching_grid(share, rows: list[str], columns: list[str], path: Path, title: str,
                  xlabel: str) -> Path:
    """share (R, K): the share of the clean logit difference each patch brought back (0: the
    corrupted run, 1: the clean one) on a diverging scale centred at 0, rows (layers) by
    columns (tokens or heads), each labelled, the values in the cells when they fit."""
    R, K = share.shape
    top = max(1.0, float(np.nanmax(np.abs(share))))
    fig, ax = subplots(figsize=(max(4.2, 0.5 * K + 2.6), max(2.5, 0.36 * R + 1.8)),
                       layout="constrained")
    image = ax.imshow(share, cmap="RdBu", vmin=-top, vmax=top, aspect="auto")
    if R * K <= 400:
        for (r, k), v in np.ndenumerate(share):
            ax.text(k, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if abs(v) > 0.6 * top else "black")
    ax.set_xticks(range(K), columns, rotation=90 if K > 12 or xlabel == "token" else 0,
                  fontsize=7)
    ax.set_yticks(range(R), rows, fontsize=7)
    ax.set_xlabel(xlabel)
    fig.colorbar(image, ax=ax, shrink=0.9, label="recovered (0: corrupted, 1: clean)")
    ax.set_title(title, fontsize=10)
    return save(fig, path)


def logit_attribution(parts: dict, path: Path, title: str) -> Path:
    """Direct logit attribution: each head's share of the logit difference as a layers x heads
    heatmap centred at 0, and the embeddings, each MLP and the biases as bars beside it."""
    heads = parts["heads"]
    names = ["embed", "pos_embed", *[f"mlp {i}" for i in range(len(parts["mlp"]))], "biases"]
    values = [parts["embed"], parts["pos_embed"], *parts["mlp"], parts["biases"]]
    top = max(1e-9, float(np.abs(heads).max()), *map(abs, values))
    L, H = heads.shape
    fig, (left, right) = subplots(1, 2, figsize=(max(7.5, 0.45 * H + 6), max(3, 0.4 * L + 1.8)),
                                  layout="constrained")
    image = left.imshow(heads, cmap="RdBu", vmin=-top, vmax=top, aspect="auto")
    layer_head_axes(left, heads, "{:+.2f}", lambda v: abs(v) > 0.6 * top)
    left.set_title("each head, through c_proj", fontsize=9)
    fig.colorbar(image, ax=left, shrink=0.9, label="logit difference")
    right.barh(range(len(values)), values, color=["#b2182b" if v < 0 else "#2166ac"
                                                  for v in values])
    right.set_yticks(range(len(values)), names, fontsize=7)
    right.invert_yaxis()
    right.axvline(0, color="black", linewidth=0.6)
    right.set_xlabel("logit difference")
    right.set_title(f"the rest (all add up to {parts['logit_diff']:+.3f})", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return save(fig, path)


def experiment_curves(panels: dict, path: Path) -> Path:
    """One panel per comparison of experiments.py: {title: {label: [(step, val loss), ...]}}."""
    fig, axes = subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False,
                             layout="constrained")
    for ax, (title, curves) in zip(axes[0], panels.items()):
        for label, curve in curves.items():
            steps, losses = zip(*curve)
            ax.plot(steps, losses, marker="o", markersize=3, label=label)
        ax.set(title=title, xlabel="step", ylabel="held-out loss (nats per character)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save(fig, path, dpi=80)


# ---------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------


def series(history: list[dict], key: str) -> list:
    return [h[key] for h in history]


def grokking_curves(history: list[dict], path: Path, chance: float, p: int, run: str = "") -> Path:
    """Accuracy and loss on training and held-out sums, weight norm and Fourier concentration of
    the token embedding, all against a log-scaled step axis (Power et al., 2022; Nanda et al.,
    2023). Dotted lines mark the first step of 99 % training and of 95 % held-out accuracy. run,
    if given, names the run above the panels."""
    steps = series(history, "step")
    fig, (acc, loss, norm) = subplots(1, 3, figsize=(14, 4), layout="constrained")
    if run:
        fig.suptitle(run, fontsize=10)
    marks = [(next((h["step"] for h in history if h[k] >= level), None), label)
             for k, level, label in (("train_acc", 0.99, "memorized"),
                                     ("test_acc", 0.95, "generalized"))]
    for ax in (acc, loss, norm):
        ax.set_xscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        for step, label in marks:
            if step is not None:
                ax.axvline(step, color="grey", linestyle=":", linewidth=1)
                if ax is acc:
                    ax.annotate(label, (step, 0.5), rotation=90, ha="right", color="grey")
    acc.plot(steps, series(history, "train_acc"), label="train")
    acc.plot(steps, series(history, "test_acc"), label="held-out")
    acc.axhline(chance, color="black", linestyle="--", linewidth=1, label=f"chance 1/{p}")
    acc.set(ylabel="accuracy", ylim=(0, 1.02), title=f"(a + b) mod {p}: accuracy")
    acc.legend(loc="upper left")
    loss.plot(steps, series(history, "train_loss"), label="train")
    loss.plot(steps, series(history, "test_loss"), label="held-out")
    loss.set(yscale="log", ylabel="cross-entropy (nats)", title="loss")
    loss.legend()
    norm.plot(steps, series(history, "weight_norm"), color="tab:green")
    norm.set_ylabel("total weight norm", color="tab:green")
    norm.set_title("weight norm and Fourier concentration")
    fourier = norm.twinx()
    fourier.plot(steps, series(history, "fourier"), color="tab:purple")
    fourier.set_ylabel("embedding energy in its 4 strongest frequencies", color="tab:purple")
    fourier.set_ylim(0, 1)
    return save(fig, path)


def induction_curves(history: list[dict], path: Path, chance: float, induction_map,
                     previous_map, ids, names: tuple[str, str], run: str = "") -> Path:
    """Top: loss on the first copy and on the repeat, and the best head's induction score, over
    training steps (the phase change of Olsson et al., 2022). Bottom: the attention pattern of the
    best induction head and of layer 0's previous-token head on one evaluation sequence. run, if
    given, names the run above the panels."""
    steps = series(history, "step")
    fig, axes = subplots(2, 2, figsize=(11, 9), layout="constrained")
    if run:
        fig.suptitle(run, fontsize=10)
    loss, score, ind, prev = axes.flat
    loss.plot(steps, series(history, "first_loss"), label="first copy")
    loss.plot(steps, series(history, "repeat_loss"), label="repeat")
    loss.set(xlabel="step", ylabel="cross-entropy (nats)", title="loss on each half",
             ylim=(0, None))
    loss.legend()
    score.plot(steps, series(history, "best"), label="best head's induction score")
    score.plot(steps, series(history, "previous"), label="best previous-token score, layer 0")
    score.axhline(chance, color="black", linestyle="--", linewidth=1,
                  label=f"uniform attention {chance:.3f}")
    score.set(xlabel="step", ylabel="mean attention", ylim=(0, 1.02), title="the phase change")
    score.legend()
    for ax in (loss, score):
        ax.grid(alpha=0.3)
    for ax, att, title in ((ind, induction_map, f"induction head {names[0]} (layer.head)"),
                           (prev, previous_map, f"previous-token head {names[1]}")):
        image = ax.imshow(att, cmap=CMAP, vmin=0, vmax=1, interpolation="nearest")
        ax.set(title=title, xlabel="key (attended to)", ylabel="query")
        tick_labels(ax, [str(i) for i in ids])
        fig.colorbar(image, ax=ax, shrink=0.8, label="attention")
    return save(fig, path)
