"""Trace a prediction to its parts, through the hook points (hooks.py): activation patching
(causal tracing, Meng et al. 2022; the IOI circuit, Wang et al. 2022), attribution patching
(Nanda 2023; AtP*, Kramár et al. 2024) and direct logit attribution.

A clean text and a corrupted one of the same length, an answer token and a wrong one. The metric
is the logit difference logit[answer] - logit[wrong] at the last position: high on the clean
text, low on the corrupted one. Patching copies one activation of the clean run into the
corrupted run and asks how much of the clean difference comes back (recovered: 0 is the
corrupted run, 1 the clean one). Attribution patching estimates the same grids from one clean
forward, one corrupted forward and one backward: (clean - corrupted) x gradient, which misses
what a saturated softmax hides. Direct logit attribution splits the clean run's own difference
into what each part writes into the residual stream, read through the final LayerNorm with its
scale frozen (TransformerLens's apply_ln_to_stack): the parts add up to the difference.

    grids = activation_patching(model, clean_ids, corrupt_ids, answer, wrong)
    estimates = attribution_patching(model, clean_ids, corrupt_ids, answer, wrong)
    parts = direct_logit_attribution(model, clean_ids, answer, wrong)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tinygrad import Tensor

from flags import UserError, atomic_write
from heads import check_head, distinct, writable_folder

# The grids patched position by position: name -> each block's hook point, activations (B, T, C)
POSITION_GRIDS = {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out",
                  "mlp_out": "hook_mlp_out"}


def logit_diff(logits: Tensor, answer: int, wrong: int) -> Tensor:
    """(B,) logit[answer] - logit[wrong] at the last position of logits (B, T, V)."""
    last = logits[:, -1]  # (B, V)
    return last[:, answer] - last[:, wrong]


def recovered(value, clean: float, corrupt: float):
    """The share of the clean logit difference that a patched run brings back."""
    return (np.asarray(value) - corrupt) / (clean - corrupt)


def check_pair(model, clean_ids: np.ndarray, corrupt_ids: np.ndarray):
    """Patching compares position with position: both texts as long, neither empty, and both
    within the model's context."""
    T, S = len(clean_ids), len(corrupt_ids)
    if not T or not S:
        raise UserError("the clean and the corrupted text need a token each at least")
    if T != S:
        raise UserError(f"the clean text has {T} tokens and the corrupted one {S}: patching "
                        "needs the same number")
    if T > model.config.n_ctx:
        raise UserError(f"the texts have {T} tokens; the model sees at most {model.config.n_ctx}")


def grid_points(model) -> dict[str, str]:
    """The position grids this model has: an attention-only model has no hook_mlp_out."""
    return {kind: point for kind, point in POSITION_GRIDS.items()
            if kind != "mlp_out" or model.config.mlp}


def cache_pair(model, clean_ids: np.ndarray, corrupt_ids: np.ndarray, answer: int,
               wrong: int) -> dict:
    """One run of both texts as a batch (row 0 clean, row 1 corrupted), keeping every block's
    hook_resid_pre and the activations the grids patch: name -> (2, T, ...). Also the two
    logit differences, "clean_logit_diff" and "corrupt_logit_diff"."""
    check_pair(model, clean_ids, corrupt_ids)
    points = [*grid_points(model).values(), "attn.hook_z"]
    names = [f"blocks.{layer}.{point}" for layer in range(model.config.n_layer)
             for point in points]
    logits, acts = model.run_with_cache(Tensor(np.stack([clean_ids, corrupt_ids])
                                               .astype(np.int32)), names)
    clean, corrupt = logit_diff(logits, answer, wrong).tolist()
    return {**acts, "clean_logit_diff": clean, "corrupt_logit_diff": corrupt}


def from_layer(model, layer: int):
    """A forward pass that starts at block layer: the stream entering it (B, T, C) -> the last
    position's logits (B, 1, V), all that logit_diff reads. A patch at layer l leaves the blocks
    before l as they were in the corrupted run, so the patched runs start at l from its cached
    stream and skip them (TransformerLens #382)."""
    def forward(x: Tensor) -> Tensor:
        for block in model.h[layer:]:
            x = block(x)
        # the last position alone: GPT-2's unembedding of every position of every patched run
        # was as much work as the blocks (T x 50257 x 768 per run)
        return model.unembed(x[:, -1:])
    return forward


def patch(model, acts: dict, answer: int, wrong: int, name: str, where: Tensor) -> np.ndarray:
    """Logit differences of len(where) corrupted runs, run b taking the clean text's activation
    at the hook point name (in layer l, "blocks.l.*") wherever where[b] is true (where
    broadcasts against one row's activation: (rows, T, 1) picks positions of (T, C)). acts is
    cache_pair's. Each run starts at block l from the corrupted stream. -> (rows,)."""
    layer = int(name.split(".")[1])
    rows = where.shape[0]
    start = acts[f"blocks.{layer}.hook_resid_pre"][1:].expand(rows, -1, -1)  # (rows, T, C)
    clean = acts[name][0]  # (T, ...)
    logits = model.run_with_hooks(start, {name: lambda x: where.where(clean, x)},
                                  forward=from_layer(model, layer))
    return logit_diff(logits, answer, wrong).numpy().astype(np.float64)


def activation_patching(model, clean_ids: np.ndarray, corrupt_ids: np.ndarray, answer: int,
                        wrong: int, heads: list[tuple[int, int]] = (),
                        progress=None, kinds=None) -> dict[str, np.ndarray]:
    """The logit difference of the corrupted run with one clean activation patched in, for
    every layer and position of each POSITION_GRIDS kind (n_layer, T), every head at all
    positions ("z", (n_layer, n_head): its output before c_proj, hook_z), and for each of
    heads, every position ("z_pos", (len(heads), T)). Each row of a grid is one batch (see
    patch): row b patches position (or head) b. Also the clean and corrupted differences.
    progress(done, total, name): called after each patched batch (name its hook point), for a
    caller that shows how far the scan is (the workbench); one that raises stops the scan.
    kinds: the grids to compute, of GRID_KEYS (None: all; "z_pos" goes with "z")."""
    check_pair(model, clean_ids, corrupt_ids)
    L, H, T = model.config.n_layer, model.config.n_head, len(clean_ids)
    for layer, head in heads:
        check_head(layer, head, L, H)
    acts = cache_pair(model, clean_ids, corrupt_ids, answer, wrong)
    out = {key: acts[key] for key in ("clean_logit_diff", "corrupt_logit_diff")}
    wanted = lambda kind: kinds is None or kind in kinds
    points = {kind: point for kind, point in grid_points(model).items() if wanted(kind)}
    total, done = (len(points) + wanted("z")) * L + len(heads) * wanted("z"), 0

    def patched(name, where):
        nonlocal done
        row = patch(model, acts, answer, wrong, name, where)
        done += 1
        if progress is not None:
            progress(done, total, name)
        return row

    by_position = Tensor(np.eye(T, dtype=bool)[:, :, None])  # (T, T, 1), row b: position b
    for kind, point in points.items():
        out[kind] = np.stack([patched(f"blocks.{layer}.{point}", by_position)
                              for layer in range(L)])  # (L, T)
    if not wanted("z"):
        return out
    by_head = Tensor(np.eye(H, dtype=bool)[:, None, :, None])  # (H, 1, H, 1), row b: head b
    out["z"] = np.stack([patched(f"blocks.{layer}.attn.hook_z", by_head)
                         for layer in range(L)])  # (L, H)
    rows = []
    for layer, head in heads:
        one = np.zeros((T, 1, H, 1), dtype=bool)
        one[:, 0, head] = True
        rows.append(patched(f"blocks.{layer}.attn.hook_z",
                            Tensor(np.eye(T, dtype=bool)[:, :, None, None] & one)))
    out["z_pos"] = np.stack(rows) if rows else np.zeros((0, T))  # (len(heads), T)
    return out


def attribution_patching(model, clean_ids: np.ndarray, corrupt_ids: np.ndarray, answer: int,
                         wrong: int) -> dict[str, np.ndarray]:
    """First-order estimates of activation_patching's grids (Nanda 2023): at each activation
    A, (A_clean - A_corrupted) times the gradient of the corrupted run's logit difference with
    respect to A, summed over the features: per layer and position for the POSITION_GRIDS,
    per layer and head (over every position) for "z". Exact for a model linear in A."""
    check_pair(model, clean_ids, corrupt_ids)
    L = model.config.n_layer
    points = {**grid_points(model), "z": "attn.hook_z"}
    names = {kind: [f"blocks.{layer}.{point}" for layer in range(L)]
             for kind, point in points.items()}
    every = [name for group in names.values() for name in group]
    acts = {}
    keep = lambda name: lambda x: acts.setdefault(name, x)
    ids = np.stack([clean_ids, corrupt_ids]).astype(np.int32)  # row 0 clean, row 1 corrupted
    with model.hooks({name: keep(name) for name in every}):
        logits = model(Tensor(ids))
    # one graph for both forwards and the backward, so tinygrad schedules it once
    grads = dict(zip(every, logit_diff(logits, answer, wrong)[1].gradient(
        *[acts[name] for name in every])))
    out = {}
    for kind, group in names.items():
        terms = [(acts[n][0] - acts[n][1]) * grads[n][1] for n in group]  # (T, C) or (T, H, hs)
        sums = [t.sum(-1) if kind != "z" else t.sum((0, 2)) for t in terms]
        out[kind] = Tensor.stack(*sums)  # (L, T) or (L, H)
    Tensor.realize(*out.values())  # one schedule: the backward pass they share runs once
    return {kind: grid.numpy().astype(np.float64) for kind, grid in out.items()}


def direct_logit_attribution(model, ids: np.ndarray, answer: int, wrong: int) -> dict:
    """What each part of the model writes into the residual stream at the last position, as
    logit difference: each vector v through the final LayerNorm with the run's own scale s,
    (v - mean v) / s . (w_ln * (W_U[answer] - W_U[wrong])). The parts: "embed", "pos_embed",
    "heads" (n_layer, n_head: each head through its slice of c_proj, no bias), "mlp" (n_layer,),
    "biases" (every attention c_proj bias, and the LayerNorm's own bias); they add up to
    "logit_diff", the model's own. Pre-LN residual models only: elsewhere the stream is no sum."""
    c = model.config
    if not (c.prenorm and c.residual and c.layernorm and not c.shared_layers):
        raise UserError("direct logit attribution needs a pre-LN model with residual "
                        "connections, where the stream is the sum of its parts")
    if not len(ids):
        raise UserError("direct logit attribution needs a text of a token at least")
    L, H, C = c.n_layer, c.n_head, c.n_embd
    names = ["hook_embed", "ln_final.hook_scale", *[f"blocks.{layer}.attn.hook_z"
                                                    for layer in range(L)]]
    names += [f"blocks.{layer}.hook_mlp_out" for layer in range(L) if c.mlp]
    if c.positions != "none":
        names.append("hook_pos_embed")
    logits, cache = model.run_with_cache(Tensor(np.asarray(ids, np.int32)[None]), names)
    get = lambda name: cache[name].numpy().astype(np.float64)
    wte = model.wte.weight.float()
    direction = (wte[answer] - wte[wrong]).numpy().astype(np.float64)  # (C,)
    gain = model.ln_f.weight.numpy().astype(np.float64) * direction  # (C,)
    scale = get("ln_final.hook_scale")[0, -1, 0]

    def through_ln(v: np.ndarray) -> np.ndarray:  # (..., C) -> (...)
        return ((v - v.mean(-1, keepdims=True)) / scale) @ gain

    heads, biases = np.zeros((L, H)), float(model.ln_f.bias.numpy() @ direction)
    for layer, block in enumerate(model.h):
        z = get(f"blocks.{layer}.attn.hook_z")[0, -1]  # (H, hs)
        w = block.attn.c_proj.weight.numpy().astype(np.float64).reshape(C, H, C // H)  # out, H, hs
        heads[layer] = through_ln(np.einsum("hd,chd->hc", z, w))  # (H, C) -> (H,)
        biases += through_ln(block.attn.c_proj.bias.numpy().astype(np.float64))
    mlp = np.array([through_ln(get(f"blocks.{layer}.hook_mlp_out")[0, -1])
                    for layer in range(L) if c.mlp])
    pos = through_ln(get("hook_pos_embed")[-1]) if c.positions != "none" else 0.0
    return {"embed": through_ln(get("hook_embed")[0, -1]), "pos_embed": pos, "heads": heads,
            "mlp": mlp, "biases": biases,
            "logit_diff": float(logit_diff(logits, answer, wrong).item())}


# ---------------------------------------------------------------------------------------------
# What the CLIs write and print
# ---------------------------------------------------------------------------------------------

GRID_KEYS = ("resid_pre", "attn_out", "mlp_out", "z")  # the grids of both npz files


def disagreements(exact: dict, estimate: dict, threshold: float) -> list[str]:
    """The cells where attribution patching's estimate of a patch's effect is more than
    threshold (a share of the clean logit difference) away from the effect patching measured:
    "resid_pre L3 t5: patched +0.62, estimated +0.08" (worst first)."""
    corrupt = exact["corrupt_logit_diff"]
    span = exact["clean_logit_diff"] - corrupt
    found = []
    for key in GRID_KEYS:
        if key not in estimate or key not in exact:  # a grid left out (activation_patching's kinds)
            continue
        effect = (exact[key] - corrupt) / span
        guess = estimate[key] / span
        for (layer, k), gap in np.ndenumerate(np.abs(effect - guess)):
            if gap > threshold:
                where = f"H{k}" if key == "z" else f"t{k}"
                found.append((gap, f"{key} L{layer} {where}: patched {effect[layer, k]:+.2f}, "
                                   f"estimated {guess[layer, k]:+.2f}"))
    return [line for _, line in sorted(found, reverse=True)]


def patching_report(exact: dict, estimate: dict, labels: list[str], threshold: float,
                    heads: list[tuple[int, int]] = ()) -> str:
    """The clean and corrupted differences, each grid as the share recovered (rows: layers),
    and where the estimate and the measurement disagree."""
    clean, corrupt = exact["clean_logit_diff"], exact["corrupt_logit_diff"]
    lines = [f"logit difference: clean {clean:+.4f}, corrupted {corrupt:+.4f}; each cell is the "
             "share of the clean difference a patch brings back (0: corrupted, 1: clean)"]
    for key in GRID_KEYS:
        if key not in exact:
            continue
        columns = [f"H{h}" for h in range(exact[key].shape[1])] if key == "z" else labels
        lines.append(f"{key} (patched), then attribution patching's estimate:")
        lines.append("layer " + " ".join(f"{c[:7]:>7}" for c in columns))
        for name, grid in ((" ", recovered(exact[key], clean, corrupt)),
                           ("~", recovered(corrupt + estimate[key], clean, corrupt))):
            lines += [f"{name}{layer:4d} " + " ".join(f"{v:+7.2f}" for v in row)
                      for layer, row in enumerate(grid)]
    for (layer, head), row in zip(heads, exact.get("z_pos", [])):
        cells = " ".join(f"{v:+.2f}" for v in recovered(row, clean, corrupt))
        lines.append(f"head {layer}.{head} by position: {cells}")
    missed = disagreements(exact, estimate, threshold)
    lines.append(f"attribution patching is off by more than {threshold:.2f} in {len(missed)} "
                 "cells" + (":" if missed else ""))
    lines += [f"  {line}" for line in missed[:10]]
    return "\n".join(lines)


def write_patching(out: Path, exact: dict, estimate: dict, labels: list[str],
                   title: str) -> list[Path]:
    """patching.npz (the patched runs' raw logit differences), attribution.npz (the estimated
    differences, corrupted + estimate) and a picture per grid, of the share recovered."""
    import plots

    out = writable_folder(out)
    clean, corrupt = exact["clean_logit_diff"], exact["corrupt_logit_diff"]
    ends = {"clean_logit_diff": clean, "corrupt_logit_diff": corrupt}
    raw = {key: exact[key] for key in GRID_KEYS if key in exact}
    guessed = {key: corrupt + estimate[key] for key in raw}
    written = [atomic_write(out / "patching.npz", lambda f: np.savez(
                   f, **ends, **raw, z_pos=exact.get("z_pos", np.zeros((0, len(labels)))))),
               atomic_write(out / "attribution.npz", lambda f: np.savez(f, **ends, **guessed))]
    names = distinct(labels)
    for kind, grids in (("patching", raw), ("attribution", guessed)):
        for key, grid in grids.items():
            columns = [f"H{h}" for h in range(grid.shape[1])] if key == "z" else names
            layers = [f"layer {i}" for i in range(grid.shape[0])]
            written.append(plots.patching_grid(
                recovered(grid, clean, corrupt), layers, columns, out / f"{kind}-{key}.png",
                f"{title}: {key}, {kind}", "head" if key == "z" else "token"))
    return written


def patch_and_write(model, clean_ids: np.ndarray, corrupt_ids: np.ndarray, answer: int,
                    wrong: int, labels: list[str], out: Path, title: str,
                    heads: list[tuple[int, int]] = (), threshold: float = 0.1):
    """What --patch does for either CLI: both grids, written into out, and the report to print.
    -> (files written, report, the exact grids)."""
    exact = activation_patching(model, clean_ids, corrupt_ids, answer, wrong, heads)
    estimate = attribution_patching(model, clean_ids, corrupt_ids, answer, wrong)
    return (write_patching(out, exact, estimate, labels, title),
            patching_report(exact, estimate, labels, threshold, heads), exact)


def write_dla(out: Path, parts: dict, title: str) -> list[Path]:
    """dla.npz (every part, and the logit difference they add up to) and dla.png."""
    import plots

    out = writable_folder(out)
    written = [atomic_write(out / "dla.npz", lambda f: np.savez(f, **parts))]
    written.append(plots.logit_attribution(parts, out / "dla.png", title))
    return written


def dla_report(parts: dict, k: int = 5) -> str:
    """The parts in order of size, and the check that they add up."""
    L, H = parts["heads"].shape
    named = [("embed", parts["embed"]), ("pos_embed", parts["pos_embed"]),
             ("biases", parts["biases"])]
    named += [(f"mlp {layer}", v) for layer, v in enumerate(parts["mlp"])]
    named += [(f"head {layer}.{h}", parts["heads"][layer, h]) for layer in range(L)
              for h in range(H)]
    total = sum(v for _, v in named)
    lines = [f"direct logit attribution of {parts['logit_diff']:+.4f}, largest parts first:"]
    lines += [f"  {name:>10} {v:+.4f}" for name, v in sorted(named, key=lambda nv: -abs(nv[1]))
              [: k + 3]]
    lines.append(f"the {len(named)} parts add up to {total:+.6f}; the model's logit difference is "
                 f"{parts['logit_diff']:+.6f} (off by {abs(total - parts['logit_diff']):.1e})")
    return "\n".join(lines)
