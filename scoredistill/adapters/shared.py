"""One backbone, several LoRA roles: per-sample adapter selection in one backbone call.

The roles of score distillation (student, teacher, fake score) are LoRA adapters on ONE frozen
base network, so its weights are held once. Which adapter a sample uses is chosen per sample and
per call, never by peft's global "active adapter": every LoRA layer receives the call's list of
adapter names (peft's mixed-batch path, ``adapter_names=``), so the teacher's, the fake score's
and the student's rows can share one batch. Under gradient checkpointing the recomputation in
backward re-enters each checkpointed block with the selection of the forward that saved it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..conditioning import cat_cond
from ..protocols import Call, Cond, NoiseSchedule, Prediction, ScoreModel

BASE = "__base__"
"""peft's name for "no adapter" in a mixed batch: the row sees the base weights only."""


class SharedBackbone:
    """A ScoreModel ``base`` whose ``base.module`` carries peft LoRA adapters, one per role.

    Args:
        base: The ScoreModel whose ``module`` carries the adapters.
        trainable: The adapters whose parameters require grad; all others (and the base
            weights) are frozen on every call, whatever peft's ``set_adapter`` did meanwhile.
    """

    def __init__(self, base: ScoreModel, trainable: Sequence[str] = ()) -> None:
        self.base = base
        self.module: nn.Module = base.module  # type: ignore[attr-defined]
        self.trainable = set(trainable)
        self._names: list[str] | None = None
        self._hooked: set[nn.Module] = set()
        self._layers: tuple[Any, list[Any]] = ((), [])
        self._checkpointed = [m for m in self.module.modules()
                              if hasattr(m, "gradient_checkpointing")]
        self._prepare()

    def role(self, adapter: str | None) -> AdapterRole:
        """A ScoreModel view that evaluates the backbone with ``adapter`` (None: base weights)."""
        if adapter is not None and adapter not in self.adapters():
            raise ValueError(f"no adapter {adapter!r} on the backbone; have {self.adapters()}")
        return AdapterRole(self, adapter)

    def adapters(self) -> list[str]:
        """Names of the LoRA adapters injected into the backbone."""
        return sorted({name for layer in self._lora_layers() for name in layer.lora_A})

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        """The LoRA parameters of one adapter, in module order (what its optimiser holds)."""
        return [p for layer in self._lora_layers() if adapter in layer.lora_A
                for p in (*layer.lora_A[adapter].parameters(), *layer.lora_B[adapter].parameters())]

    def predict_fused(self, calls: Sequence[Call]) -> list[Tensor]:
        """Evaluate calls on roles of this backbone in ONE backbone call; one prediction each."""
        names = [role.adapter or BASE for role, x, _, _ in calls for _ in range(x.shape[0])]
        if len(calls) == 1:
            _, x, t, c = calls[0]
            return [self.evaluate(x, t, c, names)]
        xs, ts, cs = zip(*(c[1:] for c in calls), strict=True)
        out = self.evaluate(torch.cat(xs), torch.cat(ts), cat_cond(cs), names)
        return list(out.split([x.shape[0] for x in xs]))

    def evaluate(self, x_t: Tensor, t: Tensor, cond: Cond, names: Sequence[str]) -> Tensor:
        """``base(x_t, t, cond)`` with sample ``i`` using adapter ``names[i]`` (B,)."""
        if len(names) != x_t.shape[0]:
            raise ValueError(f"{len(names)} adapter names for a batch of {x_t.shape[0]}")
        self._prepare()
        names = list(names)
        with self._selected(names), self._pinned_checkpointing(names):
            return self.base(x_t, t, cond)

    def _lora_layers(self) -> list[Any]:
        # Walking the module tree per call costs more than a small model's forward; peft records
        # every injected adapter in `peft_config`, so the layer list changes only with its keys.
        key = tuple(getattr(self.module, "peft_config", {}))
        if key != self._layers[0]:
            from peft.tuners.lora import LoraLayer

            self._layers = (key, [m for m in self.module.modules() if isinstance(m, LoraLayer)])
        return self._layers[1]

    def _prepare(self) -> None:
        # Re-checked per call: adapters may be added or loaded, and peft's set_adapter /
        # enable_adapters flip requires_grad as a side effect.
        for layer in self._lora_layers():
            if layer.disable_adapters:
                raise RuntimeError("adapters are disabled on the shared backbone; roles select "
                                   "them per sample: call enable_adapters() on the model")
            if layer not in self._hooked:
                layer.register_forward_pre_hook(self._inject_names, with_kwargs=True)
                self._hooked.add(layer)
            for adapter in layer.lora_A:
                want = adapter in self.trainable
                for p in (*layer.lora_A[adapter].parameters(), *layer.lora_B[adapter].parameters()):
                    if p.requires_grad != want:
                        p.requires_grad_(want)

    def _inject_names(self, layer: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        if self._names is None:  # a plain call of the module: peft's own active adapters
            return None
        return args, {**kwargs, "adapter_names": self._names}

    @contextmanager
    def _selected(self, names: list[str]) -> Iterator[None]:
        previous, self._names = self._names, names
        try:
            yield
        finally:
            self._names = previous

    @contextmanager
    def _pinned_checkpointing(self, names: list[str]) -> Iterator[None]:
        # diffusers calls `module._gradient_checkpointing_func(block, *args)`, which saves
        # `block.__call__` for recomputation in backward; hand it a callable that re-selects
        # this call's adapters, since by backward time other calls have changed the selection.
        saved = []
        for m in self._checkpointed:
            func = getattr(m, "_gradient_checkpointing_func", None)
            if getattr(m, "gradient_checkpointing", False) and func is not None:
                saved.append((m, func))
                m._gradient_checkpointing_func = partial(_checkpoint_selected, func, self, names)
        try:
            yield
        finally:
            for m, func in reversed(saved):
                m._gradient_checkpointing_func = func

    def _run_selected(self, names: list[str], block: nn.Module, *args: Any) -> Any:
        with self._selected(names):
            return block(*args)


def _checkpoint_selected(func: Any, backbone: SharedBackbone, names: list[str], block: nn.Module,
                         *args: Any) -> Any:
    return func(partial(backbone._run_selected, names, block), *args)


@dataclass(frozen=True, eq=False)
class AdapterRole:
    """One role (adapter, or None for the base weights) of a `SharedBackbone`.

    A ScoreModel; calls on roles of one backbone are fused into one backbone call by
    `scoredistill.predict_batched` (the ``fuse_key`` hook), also through CFG.

    Attributes:
        backbone: The shared backbone.
        adapter: The adapter this role evaluates with (None: the base weights).
    """

    backbone: SharedBackbone
    adapter: str | None

    @property
    def prediction(self) -> Prediction:
        return self.backbone.base.prediction

    @property
    def schedule(self) -> NoiseSchedule:
        return self.backbone.base.schedule

    @property
    def fuse_key(self) -> SharedBackbone:
        return self.backbone

    def predict_fused(self, calls: Sequence[Call]) -> list[Tensor]:
        return self.backbone.predict_fused(calls)

    def parameters(self) -> list[nn.Parameter]:
        """This role's LoRA parameters (empty for the base weights)."""
        return [] if self.adapter is None else self.backbone.adapter_parameters(self.adapter)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """The backbone's prediction (B, ...) float32 with this role's adapter on every sample."""
        return self.backbone.predict_fused([(self, x_t, t, cond)])[0]
