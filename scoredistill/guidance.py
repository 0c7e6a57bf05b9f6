"""Classifier-free guidance as a ScoreModel (Ho & Salimans 2022), one batched backbone call."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .batching import check_output
from .conditioning import cat_cond, expand_cond
from .messages import brief
from .protocols import Call, Cond, NoiseSchedule, Prediction, ScoreModel


@dataclass(frozen=True)
class CFG:
    """``uncond + scale * (cond - uncond)`` with both branches in one call of ``model``.

    Guidance is linear, so it is exact in any parametrisation.

    Attributes:
        model: The guided ScoreModel; its ``prediction`` and ``schedule`` are the CFG's.
        scale: The guidance scale, a finite number (TSD-SR uses 7.5; 1 is the conditional
            prediction alone).
        null_cond: The null-prompt conditioning, batch 1 (broadcast explicitly) or batch B.

    Example:
        >>> teacher = CFG(model, scale=7.5, null_cond=null_embeds)
        >>> pred = teacher(x_t, t, cond)  # one backbone call on a 2B batch
    """

    model: ScoreModel
    scale: float
    null_cond: Cond

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, int | float) or (
                not math.isfinite(self.scale)):
            raise ValueError(f"CFG scale must be a finite number, got {brief(self.scale)}")

    @property
    def prediction(self) -> Prediction:
        return self.model.prediction

    @property
    def schedule(self) -> NoiseSchedule:
        return self.model.schedule

    def plan(self, x_t: Tensor, t: Tensor, cond: Cond
             ) -> tuple[list[Call], Callable[[list[Tensor]], Tensor]]:
        """The inner call (one, on a 2B batch) and how to combine its prediction.

        `scoredistill.predict_batched` uses it to fuse this call with others on the same
        backbone; ``x_t`` (B, ...), ``t`` (B,), ``cond`` batch B.
        """
        if self.scale == 1.0:
            return [(self.model, x_t, t, cond)], lambda preds: preds[0]
        if (self.null_cond is None) != (cond is None):
            raise ValueError(
                "CFG needs null_cond shaped like cond (e.g. the empty prompt's embeddings), got "
                + ("null_cond=None" if self.null_cond is None else "cond=None"))
        null = expand_cond(self.null_cond, x_t.shape[0], "null_cond")
        call = (self.model, torch.cat([x_t, x_t]), torch.cat([t, t]), cat_cond([cond, null]))

        return [call], lambda preds: self.guide(*preds[0].chunk(2))

    def guide(self, pred_cond: Tensor, pred_null: Tensor) -> Tensor:
        """``pred_null + scale * (pred_cond - pred_null)`` for the two branches' predictions."""
        return pred_null + self.scale * (pred_cond - pred_null)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Guided prediction; ``x_t`` (B, ...), ``t`` (B,), ``cond`` batch B."""
        calls, combine = self.plan(x_t, t, cond)
        return combine([check_output(model(x, tt, c), x, "CFG's model")
                        for model, x, tt, c in calls])
