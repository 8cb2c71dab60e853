"""Named hook points: every activation of a forward pass that a tool reads or replaces has a
name, and a model runs with functions at any of them. The idea and the names are
TransformerLens's (HookPoint, run_with_hooks, run_with_cache); transformer.py puts the points
in its forward pass, and every lab tool (heads.py) works through them:

    logits, cache = model.run_with_cache(ids, ["blocks.0.attn.hook_pattern"])  # (B, H, T, T)
    logits = model.run_with_hooks(ids, {"blocks.1.attn.hook_z": lambda z: z * 0})
    with model.hooks({"blocks.0.hook_resid_pre": fn}): ...  # on for as long as it is open

GPT-2's points, per block l: blocks.{l}.hook_resid_pre, ln1.hook_scale, attn.hook_q, hook_k,
hook_v (B, T, H, hs), attn.hook_pattern (B, H, T, S), attn.hook_z (each head's output before
c_proj, B, T, H, hs), hook_attn_out, hook_resid_mid, ln2.hook_scale, hook_mlp_out,
hook_resid_post; and hook_embed, hook_pos_embed, ln_final.hook_scale. An encoder-decoder's are
those of encoder.* and decoder.*, whose blocks add cross_attn.* and hook_cross_out.
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager

from tinygrad import Tensor


class HookPoint:
    """A named place in the forward pass, as TransformerLens's HookPoint: the identity until a
    hook is added, a function that gets the activation and returns it or a replacement. Without
    hooks it returns the very tensor it got: the same pass, kernels and numbers. Slots, not a
    __dict__, so get_state_dict (checkpoints, optimizers) does not walk into it."""
    __slots__ = ("fns",)

    def __init__(self):
        self.fns = []  # applied in the order they were added

    def __call__(self, x: Tensor) -> Tensor:
        for fn in self.fns:
            x = fn(x)
        return x


# Attribute names as in GPT-2's checkpoint; hook names as in TransformerLens where they differ
HOOK_NAMES = {"h": "blocks", "ln_1": "ln1", "ln_2": "ln2", "ln_f": "ln_final",
              "crossattention": "cross_attn"}


def hook_points(obj, prefix: str = "", found: dict | None = None) -> dict[str, HookPoint]:
    """Every HookPoint under obj by name, e.g. "blocks.0.attn.hook_pattern"; one met again under
    another name (a shared layer) keeps its first."""
    found = {} if found is None else found
    if isinstance(obj, HookPoint):
        if all(p is not obj for p in found.values()):
            found[prefix.rstrip(".")] = obj
    elif isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            hook_points(x, f"{prefix}{i}.", found)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for k, v in vars(obj).items():
            hook_points(v, f"{prefix}{HOOK_NAMES.get(k, k)}.", found)
    return found


class Hooked:
    """What a model with hook points can do (transformer.Model derives from it)."""

    def hook_points(self) -> dict[str, HookPoint]:
        """Every hook point of the model by name, e.g. "blocks.0.attn.hook_pattern"."""
        return hook_points(self)

    @contextmanager
    def hooks(self, hooks: dict):
        """While open, each hook point named in hooks applies its function, name -> fn(tensor)
        returning the tensor or a replacement; they stack with hooks already on. An unknown
        name is a KeyError, before anything runs."""
        points = self.hook_points()
        unknown = [name for name in hooks if name not in points]
        if unknown:
            near = difflib.get_close_matches(unknown[0], points, 3) or list(points)[:3]
            raise KeyError(f"no hook point {unknown[0]!r} in this model (of its {len(points)}: "
                           f"{', '.join(near)}, ...)")
        for name, fn in hooks.items():
            points[name].fns.append(fn)
        try:
            yield
        finally:
            for name, fn in hooks.items():
                points[name].fns.remove(fn)

    def run_with_hooks(self, inputs, hooks: dict, forward=None, **kwargs) -> Tensor:
        """forward(inputs) (self's by default; inputs a tensor or a tuple of them) with hooks
        (see hooks) on for this pass. A hook that the pass never reached is an error, never a
        silent no-op."""
        ran = set()
        track = lambda name, fn: lambda x: ran.add(name) or fn(x)
        with self.hooks({name: track(name, fn) for name, fn in hooks.items()}):
            out = (forward or self)(*(inputs if isinstance(inputs, tuple) else (inputs,)),
                                    **kwargs)
        if missed := [name for name in hooks if name not in ran]:
            raise ValueError(f"hook point {missed[0]!r} was not reached by this pass")
        return out

    def run_with_cache(self, inputs, names=None, forward=None,
                       **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
        """forward(inputs) and the activations at names (every hook point by default), realized
        together: the very tensors of the pass, so keeping them adds no work."""
        cache = {}
        keep = lambda name: lambda x: cache.setdefault(name, x)
        hooks = {name: keep(name) for name in names or self.hook_points()}
        out = self.run_with_hooks(inputs, hooks, forward, **kwargs)
        Tensor.realize(out, *cache.values())
        return out, cache
