"""FLUX.2's ``Flux2Transformer2DModel`` as a rectified-flow ScoreModel (Black Forest Labs 2025).

FLUX.2 diffuses in the transformer's latent space: the VAE's 32-channel latents cut into 2x2
patches (128 channels at 1/16 of the image size) and normalised by the VAE's batch-norm running
statistics, where the noise is N(0, I) (diffusers' ``Flux2Pipeline``: ``prepare_latents`` draws
the noise there, ``_encode_vae_image`` patchifies and normalises, the decode branch inverts both).
The patchify and the normalisation belong to the VAE side (`flux2_latents`,
`flux2_vae_latents`); `Flux2ScoreModel` takes the (B, 128, h, w) latents and makes one token per
position, as the pipeline's ``_pack_latents`` does.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ..features import FeatureLayer
from ..protocols import Cond, Prediction
from ..schedules import RectifiedFlow, empirical_shift
from .flux import (
    built_size,
    check_built_size,
    dit_feature_layer,
    flow_schedule,
    from_tokens,
    grid_ids,
    guided_cond,
    patchify,
    to_tokens,
    unpatchify,
)
from .module import cast_cond, weights_dtype
from .targets import FLUX2_TARGETS, LoraTargets

if TYPE_CHECKING:
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel


def text_ids(length: int, device: torch.device) -> Tensor:
    """Position ids (L, 4) ``(0, 0, 0, l)`` of the text tokens (``_prepare_text_ids``)."""
    ids = torch.zeros(length, 4, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids


def _bn_stats(vae: AutoencoderKLFlux2) -> tuple[Tensor, Tensor]:
    if tuple(vae.config.patch_size) != (2, 2):
        raise ValueError(f"FLUX.2's VAE patches are 2x2, got patch_size {vae.config.patch_size}")
    mean = vae.bn.running_mean.float()[:, None, None]
    std = (vae.bn.running_var.float() + vae.config.batch_norm_eps).sqrt()[:, None, None]
    return mean, std


def flux2_latents(vae: AutoencoderKLFlux2, latents: Tensor) -> Tensor:
    """The transformer's latents (B, 4C, H/2, W/2) float32 of VAE latents (B, C, H, W): 2x2
    patches normalised by ``vae.bn``'s running statistics (``_encode_vae_image``)."""
    mean, std = _bn_stats(vae)
    return (patchify(latents.float()) - mean.to(latents.device)) / std.to(latents.device)


def flux2_vae_latents(vae: AutoencoderKLFlux2, latents: Tensor) -> Tensor:
    """What ``vae.decode`` takes (B, C, 2h, 2w) float32 for the transformer's latents
    (B, 4C, h, w): the inverse of `flux2_latents`."""
    mean, std = _bn_stats(vae)
    return unpatchify(latents.float() * std.to(latents.device) + mean.to(latents.device))


@dataclass(frozen=True, eq=False)
class Flux2ScoreModel:
    """FLUX.2's transformer predicting the flow velocity ``eps - x0`` on (B, 128, h, w) latents.

    ``x_t`` is in the transformer's latent space (see the module docstring: `flux2_latents`).
    One token per position, image ids ``(0, row, col, 0)`` and text ids ``(0, 0, 0, l)`` on
    FLUX.2's four RoPE axes, and ``t = sigma * 1000`` passed as ``sigma`` (the transformer
    multiplies timestep and guidance by 1000), as ``Flux2Pipeline`` does. ``cond`` is
    ``{"prompt_embeds": (B, L, D)}`` plus ``"guidance"`` (B,) for the guidance-distilled
    FLUX.2-dev (``guidance_embeds=True``); FLUX.2-klein embeds none and takes real CFG.

    Attributes:
        module: diffusers' ``Flux2Transformer2DModel``.
        schedule: The table for the resolution and the sampling step count: build it with
            `for_resolution`.
        size: The latent (h, w) the schedule is for, recorded by `for_resolution`; latents with
            another token count (``h * w``) are then a ValueError, since their shift differs
            (None: no check).

    Example:
        >>> model = Flux2ScoreModel.for_resolution(transformer, 64, 64)  # 1024 px: 4096 tokens
        >>> v = model(x_t, t, {"prompt_embeds": e, "guidance": torch.full((B,), 4.0)})
    """

    module: Flux2Transformer2DModel
    schedule: RectifiedFlow
    size: tuple[int, int] | None = None
    prediction: ClassVar[Prediction] = "flow"
    lora_targets: ClassVar[LoraTargets] = FLUX2_TARGETS

    @classmethod
    def for_resolution(cls, module: Flux2Transformer2DModel, height: int, width: int,
                       num_inference_steps: int = 50,
                       scheduler_config: Mapping[str, Any] | None = None) -> Flux2ScoreModel:
        """The model with FLUX.2's schedule for (height, width) transformer latents.

        The shift is `empirical_shift` ``(height * width, num_inference_steps)``, the ``mu`` that
        ``Flux2Pipeline`` passes to its dynamic-shifting scheduler.

        Args:
            module: diffusers' ``Flux2Transformer2DModel``.
            height: The transformer latent height h.
            width: The transformer latent width w.
            num_inference_steps: The sampling step count the shift is fitted for
                (``Flux2Pipeline``'s default: 50).
            scheduler_config: The checkpoint's FlowMatch scheduler config; one without
                ``use_dynamic_shifting`` uses its fixed ``shift`` and fits any latent size.
        """
        config = scheduler_config or {"use_dynamic_shifting": True}
        return cls(module, flow_schedule(
            config, lambda _: empirical_shift(height * width, num_inference_steps)),
            built_size(height, width, config))

    def feature_layer(self, layer: str | None = None) -> FeatureLayer:
        """A block's image tokens as a map (N, D, h, w) (`dit_feature_layer`)."""
        return dit_feature_layer(self, layer, 1)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Velocity (B, C, h, w) float32 for latents ``x_t`` (B, C, h, w) at ``t`` (B,)."""
        channels = self.module.config.in_channels
        if x_t.ndim != 4 or x_t.shape[1] != channels:
            raise ValueError(f"FLUX.2 takes the transformer's latents (B, {channels}, h, w): VAE "
                             f"latents patchified and normalised (flux2_latents); got "
                             f"{tuple(x_t.shape)}")
        height, width = x_t.shape[-2:]
        check_built_size("Flux2ScoreModel", self.size, (height, width), operator.mul,
                         self.schedule.shift)
        dtype = weights_dtype(self.module)
        (embeds,), guidance = guided_cond(
            cast_cond(cond, dtype), {"prompt_embeds": "(B, L, D)"},
            # diffusers 0.36 has no guidance_embeds option: FLUX.2-dev's embedding always exists
            self.module.config.get("guidance_embeds", True), ("FLUX.2-dev", "FLUX.2-klein"))
        out = self.module(
            hidden_states=to_tokens(x_t.to(dtype)), timestep=t.float() / self.schedule.num_steps,
            guidance=guidance, encoder_hidden_states=embeds,
            img_ids=grid_ids(height, width, 4, x_t.device),
            txt_ids=text_ids(embeds.shape[1], x_t.device), return_dict=False)[0]
        return from_tokens(out, height).float()
