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


def check_output(pred: object, x_t: Tensor, role: str) -> Tensor:
    """``pred`` if it is what a ScoreModel must return for ``x_t``: a floating tensor of its shape.

    No broadcasting: a (B, 1, ...) or batch-1 output would otherwise give a finite, wrong loss.
    No host sync (shapes and dtypes live on the host).

    Args:
        pred: What the model returned.
        x_t: The model's input (B, ...).
        role: The model's role in messages (teacher, fake, ...).

    Returns:
        ``pred``, unchanged.

    Raises:
        ValueError: Naming ``role`` and both shapes, for anything but a floating tensor of
            ``x_t``'s shape.
    """
    if not isinstance(pred, Tensor):
        raise ValueError(f"the {role} returned a {type(pred).__name__}, not a tensor (a diffusers "
                         "model's output object? wrap the model with scoredistill.adapters)")
    if pred.shape != x_t.shape:
        raise ValueError(f"the {role} returned a prediction of shape {tuple(pred.shape)} for "
                         f"x_t of shape {tuple(x_t.shape)}: a ScoreModel's output must have its "
                         "input's shape (nothing is broadcast)")
    if not pred.is_floating_point():
        raise ValueError(f"the {role} returned a {pred.dtype} prediction; it must be floating")
    return pred


def _concatenated(model: ScoreModel, calls: Sequence[Call], roles: Sequence[str]) -> list[Tensor]:
    if len(calls) == 1:
        _, x, t, c = calls[0]
        return [check_output(model(x, t, c), x, roles[0])]
    xs, ts, cs = zip(*(c[1:] for c in calls), strict=True)
    x_cat = torch.cat(xs)
    role = " and ".join(dict.fromkeys(roles))
    pred = check_output(model(x_cat, torch.cat(ts), cat_cond(cs)), x_cat,
                        f"{role} (one call for {len(calls)} evaluations)")
    return list(pred.split([x.shape[0] for x in xs]))


def predict_batched(calls: Sequence[Call], roles: Sequence[str] | None = None) -> list[Tensor]:
    """Run ``calls`` with as few backbone calls as possible; predictions in the order of ``calls``.

    Calls on the same model are concatenated along the batch into one call. Calls on
    `Fusable` models with one ``fuse_key``, directly or through `Plannable` wrappers
    such as CFG, are fused into one ``predict_fused`` call. Each prediction has its ``x_t``'s shape:
    every backbone output is checked (`check_output`).

    Args:
        calls: ``(model, x_t, t, cond)`` evaluations.
        roles: A name per call for messages (e.g. "teacher", "fake"; default "model of call i").

    Returns:
        One prediction per call, in the order of ``calls``, each of its ``x_t``'s shape.

    Raises:
        ValueError: Naming the call's entry in ``roles`` for a wrong backbone output.
    """
    if roles is None:
        roles = [f"model of call {i}" for i in range(len(calls))]
    if len(roles) != len(calls):
        raise ValueError(f"{len(calls)} calls but {len(roles)} roles")
    plans = [_lower(call) for call in calls]
    leaves = [leaf for leaf_calls, _ in plans for leaf in leaf_calls]
    leaf_roles = [role for role, (leaf_calls, _) in zip(roles, plans, strict=True)
                  for _ in leaf_calls]
    groups: dict[Hashable, list[int]] = {}
    for i, (model, *_) in enumerate(leaves):
        key = ("fuse", model.fuse_key) if isinstance(model, Fusable) else ("model", id(model))
        groups.setdefault(key, []).append(i)
    preds: list[Tensor | None] = [None] * len(leaves)
    for (kind, _), members in groups.items():
        model = leaves[members[0]][0]
        group = [leaves[i] for i in members]
        group_roles = [leaf_roles[i] for i in members]
        if kind == "fuse":
            outs = model.predict_fused(group)
            if len(outs) != len(group):
                raise ValueError(f"{type(model).__name__}.predict_fused returned {len(outs)} "
                                 f"predictions for {len(group)} calls")
            outs = [check_output(out, call[1], role)
                    for out, call, role in zip(outs, group, group_roles, strict=True)]
        else:
            outs = _concatenated(model, group, group_roles)
        for i, out in zip(members, outs, strict=True):
            preds[i] = out
    results, start = [], 0
    for leaf_calls, finish in plans:
        results.append(finish(preds[start:start + len(leaf_calls)]))  # type: ignore[arg-type]
        start += len(leaf_calls)
    return results
