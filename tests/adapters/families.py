"""Every adapter family on a tiny config: how to build it, its inputs, and LoRA roles on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from tiny_models import (
    FLUX2_LATENT,
    FLUX_LATENT,
    LATENT,
    flux2_cond,
    flux_cond,
    randomize_lora,
    sd3_cond,
    sdxl_cond,
    small_config,
    tiny_flux2_transformer,
    tiny_flux_transformer,
    tiny_sd3_transformer,
    tiny_sd35_transformer,
    tiny_sdxl_unet,
    tiny_unet,
    unet_cond,
)

from scoredistill import ScoreModel
from scoredistill.adapters import (
    Flux2ScoreModel,
    FluxScoreModel,
    LoraRoles,
    SD3ScoreModel,
    UNetScoreModel,
    add_lora,
    lora_roles,
    lora_state_dict,
)

SCHNELL = {"use_dynamic_shifting": False, "shift": 1.0}


@dataclass(frozen=True)
class Family:
    """A tiny backbone (same weights on every build), its ScoreModel, latent shape and condition."""

    module: Callable[[], torch.nn.Module]
    wrap: Callable[[torch.nn.Module], ScoreModel]
    shape: tuple[int, ...]
    cond: Callable[[int, int], object]

    def build(self) -> ScoreModel:
        return self.wrap(self.module())

    def roles(self) -> LoraRoles:
        """Student, teacher and fake roles with the family's default targets, adapters random."""
        base = self.build()
        roles = lora_roles(base, student=small_config("student", base.lora_targets),
                           fake=small_config("fake", base.lora_targets))
        randomize_lora(base.module, "student", seed=2)
        randomize_lora(base.module, "fake", seed=3)
        return roles

    def single_role_copy(self, roles: LoraRoles, adapter: str | None) -> ScoreModel:
        """A fresh copy of the base carrying only ``adapter`` (the two-copy layout)."""
        model = self.build()
        model.module.requires_grad_(False)
        if adapter is not None:
            add_lora(model.module, small_config(adapter, model.lora_targets), adapter)
            with torch.no_grad():
                shared = lora_state_dict(roles.backbone.module, adapter)
                for key, p in lora_state_dict(model.module, adapter).items():
                    p.copy_(shared[key])
        return model


FAMILIES = {
    "sd3": Family(tiny_sd3_transformer, SD3ScoreModel, LATENT, sd3_cond),
    "sd35": Family(tiny_sd35_transformer, SD3ScoreModel, LATENT, sd3_cond),
    "flux-dev": Family(tiny_flux_transformer, lambda m: FluxScoreModel.for_resolution(m, 8, 8),
                       FLUX_LATENT, flux_cond),
    "flux-schnell": Family(partial(tiny_flux_transformer, guidance_embeds=False),
                           lambda m: FluxScoreModel.for_resolution(m, 8, 8, SCHNELL),
                           FLUX_LATENT, partial(flux_cond, guidance=None)),
    "flux2-dev": Family(tiny_flux2_transformer,
                        lambda m: Flux2ScoreModel.for_resolution(m, *FLUX2_LATENT[1:]),
                        FLUX2_LATENT, flux2_cond),
    "flux2-klein": Family(partial(tiny_flux2_transformer, guidance_embeds=False),
                          lambda m: Flux2ScoreModel.for_resolution(m, *FLUX2_LATENT[1:]),
                          FLUX2_LATENT, partial(flux2_cond, guidance=None)),
    "sdxl": Family(tiny_sdxl_unet, partial(UNetScoreModel, prediction="epsilon"), (4, 8, 8),
                   sdxl_cond),
    "sdxl-v": Family(tiny_sdxl_unet, partial(UNetScoreModel, prediction="v"), (4, 8, 8),
                     sdxl_cond),
    "sd2": Family(tiny_unet, partial(UNetScoreModel, prediction="v"), (4, 8, 8), unet_cond),
}


class CallCounter:
    """Counts backbone forward calls and calls of one checkpointed block every gradient crosses
    (a transformer's first block; a UNet's last up-block ResNet, next to the output)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.block_calls = 0
        module.register_forward_pre_hook(lambda *_: self._count("calls"))
        blocks = getattr(module, "transformer_blocks", None)
        first = blocks[0] if blocks is not None else module.up_blocks[-1].resnets[0]
        first.register_forward_pre_hook(lambda *_: self._count("block_calls"))

    def _count(self, what: str) -> None:
        setattr(self, what, getattr(self, what) + 1)
