"""Evaluate several score-model calls with as few backbone calls as possible.

Calls on the same model object are concatenated along the batch into one call. Models that share a
backbone with other models (LoRA roles on one transformer, `scoredistill.adapters.shared`)
declare it through the `Fusable` hook and are evaluated together in one backbone call, also
through wrappers such as `scoredistill.CFG` that state their inner calls
(`Plannable`). Hidden states of a call (`scoredistill.features`) are read with a forward hook
during the same backbone call and split per call like the predictions (`predict_features`);
calls a loss does not make itself (DMD2's re-noised GAN sample) ride along the next batched
call (`riding`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from .conditioning import cat_cond
from .features import FeatureLayer, feature_layer
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


Taps = Mapping[int, "str | None"]
"""``{call index: layer}``: read the hidden states of ``layer`` (None: the model's default,
`scoredistill.features.feature_layer`) during that call."""


@contextmanager
def _hooked(layers: Sequence[FeatureLayer]) -> Iterator[dict[FeatureLayer, list]]:
    outputs: dict[FeatureLayer, list] = {layer: [] for layer in layers}
    handles = [layer.module.register_forward_hook(
        lambda _m, _a, out, seen=outputs[layer]: seen.append(out)) for layer in outputs]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def predict_features(calls: Sequence[Call], roles: Sequence[str] | None = None,
                     taps: Taps | None = None) -> tuple[list[Tensor], dict[int, Tensor]]:
    """`predict_batched`, plus the hidden states of the tapped calls from the same backbone calls.

    A tapped call's features are read by a forward hook on its layer during the backbone call
    its group makes (no extra pass) and split per call like the predictions. For a wrapper's
    call (CFG) they are the rows of its first inner call at the call's own ``x_t`` and ``cond``:
    CFG's conditional branch. A layer must run once per backbone call.

    Args:
        calls: ``(model, x_t, t, cond)`` evaluations.
        roles: A name per call for messages.
        taps: ``{call index: layer name or None (the model's default)}``.

    Returns:
        The predictions, in the order of ``calls``, and ``{call index: features (B_i, C, ...)}``
        float32, differentiable where the call ran with autograd on.

    Raises:
        ValueError: A wrong backbone output, a tap on no call, or a layer that does not run
            exactly once in its backbone call.
    """
    if roles is None:
        roles = [f"model of call {i}" for i in range(len(calls))]
    if len(roles) != len(calls):
        raise ValueError(f"{len(calls)} calls but {len(roles)} roles")
    taps = dict(taps or {})
    if not set(taps) <= set(range(len(calls))):
        raise ValueError(f"taps name calls {sorted(set(taps) - set(range(len(calls))))} of "
                         f"{len(calls)} calls")
    plans = [_lower(call) for call in calls]
    leaves = [leaf for leaf_calls, _ in plans for leaf in leaf_calls]
    leaf_roles = [role for role, (leaf_calls, _) in zip(roles, plans, strict=True)
                  for _ in leaf_calls]
    firsts = [sum(len(p[0]) for p in plans[:i]) for i in range(len(plans))]
    tapped = {firsts[i]: (i, feature_layer(leaves[firsts[i]][0], layer))
              for i, layer in taps.items()}
    groups: dict[Hashable, list[int]] = {}
    for i, (model, *_) in enumerate(leaves):
        key = ("fuse", model.fuse_key) if isinstance(model, Fusable) else ("model", id(model))
        groups.setdefault(key, []).append(i)
    preds: list[Tensor | None] = [None] * len(leaves)
    features: dict[int, Tensor] = {}
    for (kind, _), members in groups.items():
        model = leaves[members[0]][0]
        group = [leaves[i] for i in members]
        group_roles = [leaf_roles[i] for i in members]
        layers = list(dict.fromkeys(tapped[i][1] for i in members if i in tapped))
        with _hooked(layers) as seen:
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
        read = {}
        for layer, outputs in seen.items():
            if len(outputs) != 1:
                raise ValueError(f"layer {layer.name!r} ran {len(outputs)} times in one backbone "
                                 "call; read features from a layer that runs once per call")
            rows = sum(call[1].shape[0] for call in group)
            read[layer] = layer.read(outputs[0], (rows, *group[0][1].shape[1:]))
        start = 0
        for i, call in zip(members, group, strict=True):
            if i in tapped:
                index, layer = tapped[i]
                features[index] = read[layer][start:start + calls[index][1].shape[0]]
            start += call[1].shape[0]
    results, start = [], 0
    for leaf_calls, finish in plans:
        results.append(finish(preds[start:start + len(leaf_calls)]))  # type: ignore[arg-type]
        start += len(leaf_calls)
    return results, features


@dataclass(eq=False)
class Rider:
    """Calls that join the next batched call a loss makes (`riding`), and what they got.

    Attributes:
        calls: The extra ``(model, x_t, t, cond)`` evaluations (e.g. DMD2's re-noised sample).
        roles: A name per extra call for messages.
        taps: ``{key: layer or None}``, a key an index into ``calls`` or the role name of a call
            the loss makes (its first call with that role, e.g. "teacher").
        grad: Run the whole batched call with autograd on (the extra calls need a gradient
            w.r.t. their input); a loss running under no_grad still gets detached predictions.
        preds: The extra calls' predictions, once the batched call ran.
        features: ``{key: features}`` of the taps, once the batched call ran.
    """

    calls: Sequence[Call] = ()
    roles: Sequence[str] = ()
    taps: Mapping[int | str, str | None] = field(default_factory=dict)
    grad: bool = False
    preds: list[Tensor] | None = None
    features: dict[int | str, Tensor] = field(default_factory=dict)


_RIDER: ContextVar[Rider | None] = ContextVar("scoredistill_rider", default=None)


@contextmanager
def riding(rider: Rider) -> Iterator[Rider]:
    """Add ``rider``'s calls and taps to the first `predict_batched` call inside the block.

    This is how a loss that batches its own calls (DMD's trajectory) gets one more sample and
    hidden states out of the same backbone call. Later batched calls in the block run as usual.

    Raises:
        RuntimeError: If the block made no batched call.
    """
    token = _RIDER.set(rider)
    try:
        yield rider
    finally:
        _RIDER.reset(token)
    if rider.preds is None:
        raise RuntimeError("no batched model call was made inside riding(...): nothing to join")


def predict_batched(calls: Sequence[Call], roles: Sequence[str] | None = None) -> list[Tensor]:
    """Run ``calls`` with as few backbone calls as possible; predictions in the order of ``calls``.

    Calls on the same model are concatenated along the batch into one call. Calls on
    `Fusable` models with one ``fuse_key``, directly or through `Plannable` wrappers
    such as CFG, are fused into one ``predict_fused`` call. Each prediction has its ``x_t``'s shape:
    every backbone output is checked (`check_output`). Inside `riding`, the first call also
    evaluates the rider's calls and taps.

    Args:
        calls: ``(model, x_t, t, cond)`` evaluations.
        roles: A name per call for messages (e.g. "teacher", "fake"; default "model of call i").

    Returns:
        One prediction per call, in the order of ``calls``, each of its ``x_t``'s shape.

    Raises:
        ValueError: Naming the call's entry in ``roles`` for a wrong backbone output.
    """
    rider = _RIDER.get()
    if rider is None or rider.preds is not None:
        return predict_features(calls, roles)[0]
    roles = list(roles) if roles is not None else [f"model of call {i}" for i in range(len(calls))]
    n, taps = len(calls), {}
    for key, layer in rider.taps.items():
        if isinstance(key, str):
            if key not in roles:
                raise ValueError(f"features of the {key} were asked for, but the loss calls "
                                 f"no {key} (its calls: {sorted(set(roles))})")
            taps[roles.index(key)] = layer
        else:
            taps[n + key] = layer
    host_grad = torch.is_grad_enabled()
    with torch.set_grad_enabled(host_grad or rider.grad):
        preds, feats = predict_features([*calls, *rider.calls], [*roles, *rider.roles], taps)
    rider.preds = preds[n:]
    rider.features = {key: feats[roles.index(key) if isinstance(key, str) else n + key]
                      for key in rider.taps}
    # The loss asked for constants (it runs under no_grad): the graph is the rider's alone.
    return preds[:n] if host_grad else [p.detach() for p in preds[:n]]
