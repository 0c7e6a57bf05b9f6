"""FLUX.1's ``FluxTransformer2DModel`` as a rectified-flow ScoreModel (Black Forest Labs 2024)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from einops import rearrange
from torch import Tensor

from ..protocols import Cond, Prediction
from ..schedules import RectifiedFlow, resolution_shift
from .module import cast_cond, weights_dtype
from .targets import FLUX_TARGETS, LoraTargets

if TYPE_CHECKING:
    from diffusers import FluxTransformer2DModel


def pack_latents(x: Tensor) -> Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens of 2x2 patches, FLUX's layout."""
    if x.shape[-2] % 2 or x.shape[-1] % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: height and width must be even, got "
                         f"{tuple(x.shape[-2:])}")
    return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `pack_latents`: (B, H/2 * W/2, 4C) -> (B, C, H, W)."""
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=height // 2, ph=2, pw=2)


def image_ids(height: int, width: int, device: torch.device) -> Tensor:
    """Position ids (H/2 * W/2, 3): ``(0, row, col)`` of each packed token, FLUX's RoPE axes."""
    rows, cols = torch.meshgrid(torch.arange(height // 2, device=device),
                                torch.arange(width // 2, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()


def flux_cond(cond: Cond, guidance_embeds: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(prompt_embeds (B, L, D), pooled_projections (B, P), guidance (B,) or None)``."""
    if not isinstance(cond, Mapping) or not {"prompt_embeds", "pooled_projections"} <= cond.keys():
        raise ValueError("FLUX conditioning must be a dict with 'prompt_embeds' (B, L, D), "
                         "'pooled_projections' (B, P) and, for guidance-distilled FLUX.1-dev, "
                         "'guidance' (B,)")
    guidance = cond.get("guidance")
    if guidance_embeds and guidance is None:
        raise ValueError("this FLUX transformer embeds the guidance scale (FLUX.1-dev): pass "
                         "cond['guidance'] (B,), e.g. torch.full((B,), 3.5)")
    if not guidance_embeds and guidance is not None:
        raise ValueError("this FLUX transformer has no guidance embedding (FLUX.1-schnell): "
                         "drop cond['guidance']")
    return cond["prompt_embeds"], cond["pooled_projections"], guidance


@dataclass(frozen=True, eq=False)
class FluxScoreModel:
    """FLUX.1's transformer predicting the flow velocity ``eps - x0`` on (B, C, H, W) latents.

    Latents are packed into 2x2 patches with image position ids ``(0, row, col)`` and zero text
    ids, as diffusers' ``FluxPipeline`` does; ``t`` is ``sigma * 1000`` like SD3 and is passed as
    ``sigma`` (FLUX's convention; the transformer casts it to the weights' dtype). ``cond`` is
    ``{"prompt_embeds", "pooled_projections"}`` plus ``"guidance"`` (B,) for FLUX.1-dev, so the
    distilled guidance travels with each sample and CFG with a null prompt stays one batched call.
    ``schedule`` is the resolution's shifted table: build it with `for_resolution`.

    Example:
        >>> model = FluxScoreModel.for_resolution(transformer, 128, 128)  # 1024 px latents
        >>> v = model(x_t, t, {"prompt_embeds": e, "pooled_projections": p,
        ...                    "guidance": torch.full((B,), 3.5)})
    """

    module: FluxTransformer2DModel
    schedule: RectifiedFlow
    prediction: ClassVar[Prediction] = "flow"
    lora_targets: ClassVar[LoraTargets] = FLUX_TARGETS

    @classmethod
    def for_resolution(cls, module: FluxTransformer2DModel, height: int, width: int,
                       scheduler_config: Mapping[str, Any] | None = None) -> FluxScoreModel:
        """The model with FLUX's schedule for (height, width) latents (before 2x2 packing).

        ``scheduler_config`` is the checkpoint's FlowMatch scheduler config; without it FLUX.1-dev's
        (dynamic shifting, base/max shift 0.5/1.15 at 256/4096 tokens). A config without dynamic
        shifting (FLUX.1-schnell: shift 1) uses its fixed ``shift``.
        """
        config = dict(scheduler_config or {"use_dynamic_shifting": True})
        if not config.get("use_dynamic_shifting", False):
            return cls(module, RectifiedFlow(shift=float(config.get("shift", 1.0))))
        shift = resolution_shift(
            (height // 2) * (width // 2), base_seq_len=config.get("base_image_seq_len", 256),
            max_seq_len=config.get("max_image_seq_len", 4096),
            base_shift=config.get("base_shift", 0.5), max_shift=config.get("max_shift", 1.15))
        return cls(module, RectifiedFlow(shift=shift,
                                         num_steps=config.get("num_train_timesteps", 1000)))

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Velocity (B, C, H, W) float32 for latents ``x_t`` (B, C, H, W) at ``t`` (B,)."""
        dtype = weights_dtype(self.module)
        embeds, pooled, guidance = flux_cond(cast_cond(cond, dtype),
                                             self.module.config.guidance_embeds)
        height, width = x_t.shape[-2:]
        out = self.module(
            hidden_states=pack_latents(x_t.to(dtype)), timestep=t.float() / self.schedule.num_steps,
            guidance=guidance, encoder_hidden_states=embeds, pooled_projections=pooled,
            img_ids=image_ids(height, width, x_t.device),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=x_t.device), return_dict=False)[0]
        return unpack_latents(out, height, width).float()
