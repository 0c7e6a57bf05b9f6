"""A diffusers ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x) as a VP ScoreModel."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..parametrization import check_prediction
from ..protocols import Cond, Prediction
from ..schedules import VariancePreserving
from .module import cast_cond, weights_dtype

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

_PREDICTION_TYPES: dict[str, Prediction] = {"epsilon": "epsilon", "v_prediction": "v",
                                             "sample": "x0"}


@dataclass(frozen=True, eq=False)
class UNetScoreModel:
    """A UNet predicting epsilon, v (Salimans & Ho 2022) or x0 on DDPM's VP schedule.

    ``t`` (B,) is the integer training step as float; ``cond`` is ``encoder_hidden_states``
    (B, L, D). Inputs are cast to the weights' dtype, the output (B, C, H, W) is float32.

    Example:
        >>> model = UNetScoreModel.from_scheduler_config(unet, scheduler)
    """

    module: UNet2DConditionModel
    prediction: Prediction = "epsilon"
    schedule: VariancePreserving = field(default_factory=VariancePreserving)

    def __post_init__(self) -> None:
        check_prediction(self.prediction)

    @classmethod
    def from_scheduler_config(cls, module: UNet2DConditionModel,
                              scheduler: Mapping[str, Any] | Any) -> UNetScoreModel:
        """``prediction_type`` and the schedule of a diffusers VP scheduler or its config.

        The schedule is :meth:`VariancePreserving.from_diffusers`'s (any beta schedule,
        zero terminal SNR included); a flow-matching scheduler is refused.
        """
        config = scheduler if isinstance(scheduler, Mapping) else scheduler.config
        kind = config.get("prediction_type", "epsilon")
        if kind not in _PREDICTION_TYPES:
            raise ValueError(f"unsupported prediction_type {kind!r}; expected one of "
                             f"{sorted(_PREDICTION_TYPES)}")
        schedule = VariancePreserving.from_diffusers(scheduler)
        return cls(module, _PREDICTION_TYPES[kind], schedule)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Prediction (B, C, H, W) float32 for ``x_t`` (B, C, H, W) at steps ``t`` (B,)."""
        dtype = weights_dtype(self.module)
        out = self.module(x_t.to(dtype), t.float(), encoder_hidden_states=cast_cond(cond, dtype),
                          return_dict=False)[0]
        return out.float()
