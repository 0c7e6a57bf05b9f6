"""TSD-SR's networks for training (Alg. 1 lines 1-2): LoRA roles on one SD3 transformer, the VAE
with its encoder LoRA, and the LPIPS reconstruction loss."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from examples.tsdsr.models.backbone import load_backbone
from examples.tsdsr.training.config import TrainConfig
from examples.tsdsr.training.regularisers import discriminator_head
from scoredistill.adapters import (
    ATTENTION_TARGETS,
    STUDENT_TARGETS,
    LoraRoles,
    SD3ScoreModel,
    add_vae_lora,
    lora_config,
    lora_roles,
    lora_state_dict,
    read_lora,
)
from scoredistill.cli import UserError
from scoredistill.messages import brief
from scoredistill.perceptual import alexnet_lpips
from scoredistill.sr.latents import encode

log = logging.getLogger("tsdsr.train")
VAE_ADAPTER = "default"


@dataclass(frozen=True, eq=False)
class TSDSRModels:
    """Student (transformer + VAE-encoder LoRA), teacher and fake score on one backbone; LPIPS;
    the discriminator head of the regularisers that have one (trained with the fake score)."""

    roles: LoraRoles
    vae: nn.Module
    lpips: nn.Module
    head: nn.Module | None = None

    def student_parameters(self) -> list[nn.Parameter]:
        """theta: the student's transformer LoRA and the VAE encoder's LoRA."""
        return [*self.roles.student.parameters(),
                *lora_state_dict(self.vae, VAE_ADAPTER).values()]

    def fake_parameters(self) -> list[nn.Parameter]:
        """phi: the fake score's ("LoRA model") adapter, then the head's (DMD2 trains its head
        with the fake score)."""
        head = [] if self.head is None else list(self.head.parameters())
        return [*self.roles.fake.parameters(), *head]


def build_models(config: TrainConfig, dtype: torch.dtype, device: torch.device) -> TSDSRModels:
    """Load the backbone (local SD3 folder or tiny), add the LoRAs; trainable weights stay fp32.

    The files given as --lpips-backbone and --teacher-lora are read first, so a bad one fails
    in one line (UserError naming the flag) before the backbone loads."""
    lpips = make_lpips(config.lpips_backbone).to(device)
    if config.teacher_lora is not None:
        with _flag_named("--teacher-lora"):
            read_lora(config.teacher_lora)
    backbone = load_backbone(config.pretrained, dtype, device)
    transformer, vae = backbone.transformer, backbone.vae
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
        vae.enable_gradient_checkpointing()
    # A teacher LoRA of another model reads, but its modules do not fit.
    with _flag_named("--teacher-lora") if config.teacher_lora else nullcontext():
        roles = lora_roles(SD3ScoreModel(transformer),
                           student=lora_config(STUDENT_TARGETS, config.student_rank),
                           fake=lora_config(ATTENTION_TARGETS, config.fake_rank),
                           teacher_lora=config.teacher_lora)
    add_vae_lora(vae, config.vae_rank, VAE_ADAPTER)
    head = discriminator_head(config.regulariser, roles)
    models = TSDSRModels(roles, vae, lpips, None if head is None else head.to(device))
    for p in (*models.student_parameters(), *models.fake_parameters()):
        p.data = p.data.float()  # fp32 LoRA weights under fp16 mixed precision (release)
    return models


def make_lpips(backbone: str | None) -> nn.Module:
    """LPIPS (Zhang et al. 2018) with lpips' own linear layers; AlexNet from a local file or random.

    ``lpips.LPIPS(pretrained=True)`` would download torchvision's AlexNet, so the backbone is
    built random (``pnet_rand=True``, seeded) and, given ``backbone``, loaded from that state dict
    (a ``.safetensors`` file or a tensors-only ``torch.save``; never unpickled otherwise).
    """
    state = None if backbone is None else alexnet_state(backbone)
    model = alexnet_lpips()
    if state is None:
        log.warning("LPIPS uses a RANDOM AlexNet backbone (no --lpips-backbone given): its "
                    "values are not comparable to published LPIPS")
    else:
        import torchvision

        with torch.device("meta"):  # no random init (and no global RNG draw) to overwrite
            alexnet = torchvision.models.alexnet()
        try:
            alexnet.load_state_dict(state, assign=True)
        except (RuntimeError, TypeError) as exc:  # other keys or shapes, or not a dict
            raise UserError(f"--lpips-backbone {backbone} is not torchvision's AlexNet state "
                            f"dict ({brief(' '.join(str(exc).split()))}): give "
                            "torchvision.models.alexnet(weights=...).state_dict()") from None
        # lpips splits AlexNet's `features` into slices whose children keep their indices.
        for block in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4,
                      model.net.slice5):
            for name, layer in block.named_children():
                layer.load_state_dict(alexnet.features[int(name)].state_dict())
    return model.eval().requires_grad_(False)


def alexnet_state(path: str | Path) -> object:
    """What ``path`` holds, read as tensors only (safetensors, or ``torch.load`` with
    ``weights_only``): a pickled model or other objects are refused, one line, unexecuted."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if Path(path).suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message would suggest unpickling it anyway
        raise UserError(f"--lpips-backbone {path} holds pickled objects, not only tensors (a "
                        "whole pickled model?), and loading it could run code: save AlexNet's "
                        "state_dict() with torch.save, or as .safetensors") from None
    except (OSError, RuntimeError, EOFError, SafetensorError) as exc:  # truncated, not torch's
        raise UserError(f"--lpips-backbone {path} cannot be read "
                        f"({brief(' '.join(str(exc).split()))}): give torchvision AlexNet's "
                        "state dict (.pth or .safetensors)") from None


@contextmanager
def _flag_named(flag: str) -> Iterator[None]:
    # The loaders' ValueErrors name the file; the user also needs the flag that gave it.
    try:
        yield
    except ValueError as exc:
        raise UserError(f"{flag}: {brief(' '.join(str(exc).split()))}") from None


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
