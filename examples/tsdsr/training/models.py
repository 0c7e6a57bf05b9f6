"""TSD-SR's networks for training (Alg. 1 lines 1-2): LoRA roles on one SD3 transformer, the VAE
with its encoder LoRA, and the LPIPS reconstruction loss."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from examples.tsdsr.config import TrainConfig
from examples.tsdsr.tiny import load_backbone
from scoredistill.adapters import (
    ATTENTION_TARGETS,
    STUDENT_TARGETS,
    LoraRoles,
    SD3ScoreModel,
    add_vae_lora,
    lora_config,
    lora_roles,
    lora_state_dict,
)
from scoredistill.sr.latents import encode

log = logging.getLogger("tsdsr.train")
VAE_ADAPTER = "default"


@dataclass(frozen=True, eq=False)
class TSDSRModels:
    """Student (transformer + VAE-encoder LoRA), teacher and fake score on one backbone; LPIPS."""

    roles: LoraRoles
    vae: nn.Module
    lpips: nn.Module

    def student_parameters(self) -> list[nn.Parameter]:
        """theta: the student's transformer LoRA and the VAE encoder's LoRA."""
        return [*self.roles.student.parameters(),
                *lora_state_dict(self.vae, VAE_ADAPTER).values()]

    def fake_parameters(self) -> list[nn.Parameter]:
        """phi: the fake score's ("LoRA model") adapter."""
        return self.roles.fake.parameters()


def build_models(config: TrainConfig, dtype: torch.dtype, device: torch.device) -> TSDSRModels:
    """Load the backbone (local SD3 folder or tiny), add the LoRAs; trainable weights stay fp32."""
    backbone = load_backbone(config.pretrained, dtype, device)
    transformer, vae = backbone.transformer, backbone.vae
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    roles = lora_roles(SD3ScoreModel(transformer),
                       student=lora_config(STUDENT_TARGETS, config.student_rank),
                       fake=lora_config(ATTENTION_TARGETS, config.fake_rank),
                       teacher_lora=config.teacher_lora)
    add_vae_lora(vae, config.vae_rank, VAE_ADAPTER)
    models = TSDSRModels(roles, vae, make_lpips(config.lpips_backbone).to(device))
    for p in (*models.student_parameters(), *models.fake_parameters()):
        p.data = p.data.float()  # fp32 LoRA weights under fp16 mixed precision (release)
    return models


def make_lpips(backbone: str | None) -> nn.Module:
    """LPIPS (Zhang et al. 2018) with lpips' own linear layers; AlexNet from a local file or random.

    ``lpips.LPIPS(pretrained=True)`` would download torchvision's AlexNet, so the backbone is
    built random (``pnet_rand=True``, seeded) and, given ``backbone``, loaded from that state dict.
    """
    import lpips

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    if backbone is None:
        log.warning("LPIPS uses a RANDOM AlexNet backbone (no --lpips-backbone given): its "
                    "values are not comparable to published LPIPS")
    else:
        import torchvision

        alexnet = torchvision.models.alexnet()
        alexnet.load_state_dict(torch.load(backbone, map_location="cpu", weights_only=True))
        # lpips splits AlexNet's `features` into slices whose children keep their indices.
        for block in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4,
                      model.net.slice5):
            for name, layer in block.named_children():
                layer.load_state_dict(alexnet.features[int(name)].state_dict())
    return model.eval().requires_grad_(False)


@contextmanager
def adapters_off(module: nn.Module) -> Iterator[None]:
    """The module's base weights only (peft adapters disabled), restored afterwards."""
    module.disable_adapters()
    try:
        yield
    finally:
        module.enable_adapters()


@torch.no_grad()
def hq_latent(vae: nn.Module, hq: Tensor) -> Tensor:
    """``z = E_psi(x_H)`` (Alg. 1 line 6): the frozen encoder, posterior mean; ``hq`` in [-1, 1]."""
    with adapters_off(vae):
        return encode(vae, hq, posterior="mode")
