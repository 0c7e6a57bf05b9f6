"""A diffusers ``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x, SDXL) as a VP ScoreModel."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from ..features import FeatureLayer, as_tensor, submodule
from ..parametrization import check_prediction
from ..protocols import Cond, Prediction
from ..schedules import VariancePreserving
from .module import cast_cond, weights_dtype
from .targets import UNET_TARGETS, LoraTargets

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

SDXL_KEYS = ("encoder_hidden_states", "text_embeds", "time_ids")
"""SDXL's condition: embeddings (B, L, 2048), pooled text embeds (B, 1280) and the six size/crop
``time_ids`` (B, 6) of its ``text_time`` added conditioning."""


def unet_cond(cond: Cond) -> tuple[Tensor, dict[str, Tensor] | None]:
    """``(encoder_hidden_states, added_cond_kwargs)`` from a tensor (SD 1.x/2.x) or an SDXL dict."""
    if isinstance(cond, Tensor):
        return cond, None
    if isinstance(cond, Mapping) and set(cond) == set(SDXL_KEYS):
        return cond["encoder_hidden_states"], {"text_embeds": cond["text_embeds"],
                                               "time_ids": cond["time_ids"]}
    raise ValueError("UNet conditioning must be encoder_hidden_states (B, L, D) or, for SDXL, "
                     f"a dict with exactly the keys {SDXL_KEYS}")


_PREDICTION_TYPES: dict[str, Prediction] = {"epsilon": "epsilon", "v_prediction": "v",
                                             "sample": "x0"}


@dataclass(frozen=True, eq=False)
class UNetScoreModel:
    """A UNet predicting epsilon, v (Salimans & Ho 2022) or x0 on DDPM's VP schedule.

    ``t`` (B,) is the integer training step as float; ``cond`` is ``encoder_hidden_states``
    (B, L, D), or for SDXL (``addition_embed_type="text_time"``) the dict of `SDXL_KEYS`
    passed on as ``added_cond_kwargs``. Inputs are cast to the weights' dtype, the output
    (B, C, H, W) is float32.

    Attributes:
        module: diffusers' ``UNet2DConditionModel``.
        prediction: The parametrisation it outputs: "epsilon", "v" or "x0".
        schedule: The VP schedule (default Stable Diffusion 1.x/2.x's); `from_scheduler_config`
            reads both from a diffusers scheduler.

    Example:
        >>> model = UNetScoreModel.from_scheduler_config(unet, scheduler)
        >>> eps = model(x_t, t, {"encoder_hidden_states": e, "text_embeds": p,
        ...                      "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * B)})
    """

    module: UNet2DConditionModel
    prediction: Prediction = "epsilon"
    schedule: VariancePreserving = field(default_factory=VariancePreserving)
    lora_targets: ClassVar[LoraTargets] = UNET_TARGETS

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

    def feature_layer(self, layer: str | None = None) -> FeatureLayer:
        """The mid-block's output (N, C, H/2^k, W/2^k) by default (DMD2's bottleneck features,
        ``classify_forward``'s last output); another layer by name if it returns one tensor."""
        name = layer or "mid_block"
        channels = self.module.config.block_out_channels[-1] if name == "mid_block" else None
        return FeatureLayer(name, submodule(self.module, name, "UNetScoreModel"), channels,
                            lambda out, _: as_tensor(out, name))

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Prediction (B, C, H, W) float32 for ``x_t`` (B, C, H, W) at steps ``t`` (B,)."""
        dtype = weights_dtype(self.module)
        states, added = unet_cond(cast_cond(cond, dtype))
        out = self.module(x_t.to(dtype), t.float(), encoder_hidden_states=states,
                          added_cond_kwargs=added, return_dict=False)[0]
        return out.float()
