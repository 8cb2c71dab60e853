"""What attention heads do: scores that name a head's habit, readable token labels, and a
self-contained HTML page to explore every head of a model on one sentence.

Everything here works on attention probabilities already computed by the model's own forward
pass (transformer.attention_maps), as NumPy arrays (L, H, T, T) for one sequence or
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

import numpy as np


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
