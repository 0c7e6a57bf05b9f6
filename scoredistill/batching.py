"""Evaluate several score-model calls with as few backbone calls as possible.

Calls on the same model object are concatenated along the batch into one call. Models that share a
backbone with other models (LoRA roles on one transformer, `scoredistill.adapters.shared`)
declare it through the `Fusable` hook and are evaluated together in one backbone call, also
through wrappers such as `scoredistill.CFG` that state their inner calls
(`Plannable`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .conditioning import cat_cond
from .protocols import Call, Cond, ScoreModel


@runtime_checkable
class Fusable(Protocol):
    """A ScoreModel view on a backbone that other views share.

    Calls on views with equal ``fuse_key`` are handed together to ``predict_fused`` of one of them,
    which evaluates them all (typically in one backbone call with per-sample adapter selection)
    and returns one prediction per call, in order, each with its ``x_t``'s shape.
    """

    fuse_key: Hashable

    def predict_fused(self, calls: Sequence[Call]) -> list[Tensor]: ...


@runtime_checkable
class Plannable(Protocol):
    """A wrapper (e.g. CFG) that states its inner calls and how it combines their predictions."""

    def plan(self, x_t: Tensor, t: Tensor, cond: Cond
             ) -> tuple[list[Call], Callable[[list[Tensor]], Tensor]]: ...


Finish = Callable[[list[Tensor]], Tensor]


def _lower(call: Call) -> tuple[list[Call], Finish]:
    """Rewrite a call on a wrapper as the calls on the models it wraps, recursively."""
    model, x_t, t, cond = call
    if not isinstance(model, Plannable):
        return [call], lambda preds: preds[0]
    inner, combine = model.plan(x_t, t, cond)
    lowered = [_lower(c) for c in inner]

    def finish(preds: list[Tensor]) -> Tensor:
        outs, start = [], 0
        for leaf_calls, done in lowered:
            outs.append(done(preds[start:start + len(leaf_calls)]))
            start += len(leaf_calls)
        return combine(outs)

    return [leaf for leaf_calls, _ in lowered for leaf in leaf_calls], finish


def _concatenated(model: ScoreModel, calls: Sequence[Call]) -> list[Tensor]:
    if len(calls) == 1:
        _, x, t, c = calls[0]
        return [model(x, t, c)]
    xs, ts, cs = zip(*(c[1:] for c in calls), strict=True)
    pred = model(torch.cat(xs), torch.cat(ts), cat_cond(cs))
    return list(pred.split([x.shape[0] for x in xs]))


def predict_batched(calls: Sequence[Call]) -> list[Tensor]:
    """Run ``calls`` with as few backbone calls as possible; predictions in the order of ``calls``.

    Calls on the same model are concatenated along the batch into one call. Calls on
    `Fusable` models with one ``fuse_key``, directly or through `Plannable` wrappers
    such as CFG, are fused into one ``predict_fused`` call. Each prediction has its ``x_t``'s shape.
    """
    plans = [_lower(call) for call in calls]
    leaves = [leaf for leaf_calls, _ in plans for leaf in leaf_calls]
    groups: dict[Hashable, list[int]] = {}
    for i, (model, *_) in enumerate(leaves):
        key = ("fuse", model.fuse_key) if isinstance(model, Fusable) else ("model", id(model))
        groups.setdefault(key, []).append(i)
    preds: list[Tensor | None] = [None] * len(leaves)
    for (kind, _), members in groups.items():
        model = leaves[members[0]][0]
        group = [leaves[i] for i in members]
        outs = model.predict_fused(group) if kind == "fuse" else _concatenated(model, group)
        for i, out in zip(members, outs, strict=True):
            preds[i] = out
    results, start = [], 0
    for leaf_calls, finish in plans:
        results.append(finish(preds[start:start + len(leaf_calls)]))  # type: ignore[arg-type]
        start += len(leaf_calls)
    return results
