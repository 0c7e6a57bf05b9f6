"""Evaluate several score-model calls with as few backbone calls as possible.

Calls on the same model object are concatenated along the batch into one call. Models that share a
backbone with other models (LoRA roles on one transformer, :mod:`scoredistill.adapters.shared`)
declare it through the :class:`Fusable` hook and are evaluated together in one backbone call, also
through wrappers such as :class:`~scoredistill.CFG` (see :func:`predict_batched`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .conditioning import cat_cond
from .protocols import Cond, ScoreModel

Call = tuple[ScoreModel, Tensor, Tensor, Cond]
"""``(model, x_t, t, cond)``: one requested evaluation."""


@runtime_checkable
class Fusable(Protocol):
    """A ScoreModel view on a backbone that other views share.

    Calls on views with equal ``fuse_key`` are handed together to ``predict_fused`` of one of them,
    which evaluates them all (typically in one backbone call with per-sample adapter selection)
    and returns one prediction per call, in order, each with its ``x_t``'s shape.
    """

    fuse_key: Hashable

    def predict_fused(self, calls: Sequence[Call]) -> list[Tensor]: ...


class _Recorder:
    """Stands in for a wrapper's inner model: records the call, answers with a placeholder."""

    def __init__(self, model: Any) -> None:
        self.model, self.calls = model, []

    def __getattr__(self, name: str) -> Any:  # prediction, schedule, ... of the inner model
        if name == "model":  # not yet set (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        self.calls.append((self.model, x_t, t, cond))
        return torch.zeros_like(x_t, dtype=torch.float32)


class _Replay(_Recorder):
    """Stands in for a wrapper's inner model: answers with a prediction computed elsewhere."""

    def __init__(self, model: Any, pred: Tensor) -> None:
        super().__init__(model)
        self.pred = pred

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return self.pred


def _wraps_fusable(model: Any) -> bool:
    inner = getattr(model, "model", None) if dataclasses.is_dataclass(model) else None
    return inner is not None and (isinstance(inner, Fusable) or _wraps_fusable(inner))


Finish = Callable[[list[Tensor]], Tensor]


def _lower(call: Call) -> tuple[list[Call], Finish]:
    """Rewrite a call on a wrapper of a fusable model as calls on the fusable model itself.

    A wrapper is a dataclass with a ``model`` field that calls ``model`` once (e.g. CFG): it is run
    twice with stand-ins, first to record its inner call, then to combine the real prediction, so
    its own arithmetic is reused rather than restated here.
    """
    model, x_t, t, cond = call
    if not _wraps_fusable(model):
        return [call], lambda preds: preds[0]
    recorder = _Recorder(model.model)
    dataclasses.replace(model, model=recorder)(x_t, t, cond)
    if len(recorder.calls) != 1:  # not a single-call wrapper: evaluate it as it is
        return [call], lambda preds: preds[0]
    leaves, inner_finish = _lower(recorder.calls[0])

    def finish(preds: list[Tensor]) -> Tensor:
        replay = _Replay(model.model, inner_finish(preds))
        return dataclasses.replace(model, model=replay)(x_t, t, cond)

    return leaves, finish


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
    :class:`Fusable` models with one ``fuse_key``, directly or through single-call wrappers such as
    CFG, are fused into one ``predict_fused`` call. Each prediction has its ``x_t``'s shape.
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
