"""Batch-dimension operations on conditioning pytrees (tensors, tuples, lists, dicts, None)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .messages import brief
from .protocols import Cond


def tree_map(fn: Callable[..., Tensor], *trees: Cond) -> Cond:
    """Apply ``fn`` leaf-wise to pytrees of identical structure."""
    first = trees[0]
    if first is None:
        if any(t is not None for t in trees):
            raise ValueError("conditioning structures differ: None vs a value")
        return None
    if isinstance(first, Tensor):
        return fn(*trees)
    if isinstance(first, Mapping):
        for t in trees:
            if not isinstance(t, Mapping) or t.keys() != first.keys():
                other = list(t) if isinstance(t, Mapping) else type(t).__name__
                raise ValueError(f"conditioning structures differ: a dict with keys "
                                 f"{brief(list(first))} vs {brief(other)}")
        return {k: tree_map(fn, *(t[k] for t in trees)) for k in first}
    if isinstance(first, Sequence) and not isinstance(first, str):
        if any(len(t) != len(first) for t in trees):
            raise ValueError("conditioning sequences have different lengths")
        return type(first)(tree_map(fn, *parts) for parts in zip(*trees, strict=True))
    raise ValueError(f"unsupported conditioning leaf of type {type(first).__name__}")


def leaves(tree: Cond) -> list[Tensor]:
    """The tensor leaves of a conditioning pytree, in a fixed order."""
    out: list[Tensor] = []

    def visit(x: Tensor) -> Tensor:
        out.append(x)
        return x

    tree_map(visit, tree)
    return out


def cat_cond(conds: Sequence[Cond]) -> Cond:
    """Concatenate conditioning pytrees along the batch dimension."""
    return tree_map(lambda *xs: torch.cat(xs, dim=0), *conds)


def split_cond(cond: Cond, sizes: Sequence[int]) -> list[Cond]:
    """Inverse of `cat_cond`."""
    parts = [tree_map(lambda x, i=i: x.split(list(sizes), dim=0)[i], cond)
             for i in range(len(sizes))]
    return parts


def expand_cond(cond: Cond, batch: int, name: str = "cond") -> Cond:
    """Repeat a batch-1 conditioning to ``batch``; a batch of ``batch`` is returned unchanged."""

    def expand(x: Tensor) -> Tensor:
        if x.shape[0] == batch:
            return x
        if x.shape[0] == 1:
            return x.expand(batch, *x.shape[1:])
        raise ValueError(f"{name} has batch {x.shape[0]}; expected 1 or {batch}")

    return tree_map(expand, cond)


def check_cond(cond: Cond, batch: int, device: torch.device, name: str = "cond") -> None:
    """Raise a ``ValueError`` unless every leaf has batch ``batch`` and lives on ``device``."""
    for x in leaves(cond):
        if x.ndim == 0 or x.shape[0] != batch:
            raise ValueError(f"{name} leaf of shape {tuple(x.shape)} does not have batch {batch}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the latents are on {device}")
