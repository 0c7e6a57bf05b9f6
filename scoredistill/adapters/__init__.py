"""Backbones as ScoreModels, and LoRA roles on one shared backbone (diffusers/peft, lazily)."""

from .flux import FluxScoreModel
from .flux2 import Flux2ScoreModel, flux2_latents, flux2_vae_latents
from .lora import (
    LoraRoles,
    add_vae_lora,
    lora_config,
    lora_roles,
    vae_lora_targets,
)
from .lora_io import (
    RELEASED_FILES,
    LoraMismatchError,
    add_lora,
    load_lora,
    load_tsdsr_release,
    lora_state_dict,
    read_lora,
    save_lora,
)
from .module import ModuleScoreModel
from .sd3 import SD3ScoreModel
from .shared import BASE, AdapterRole, SharedBackbone
from .targets import (
    ATTENTION_TARGETS,
    FLUX2_TARGETS,
    FLUX_TARGETS,
    SD3_TARGETS,
    STUDENT_TARGETS,
    UNET_TARGETS,
    LoraTargets,
)
from .unet import SDXL_KEYS, UNetScoreModel

__all__ = [
    "ATTENTION_TARGETS",
    "BASE",
    "FLUX2_TARGETS",
    "FLUX_TARGETS",
    "RELEASED_FILES",
    "SD3_TARGETS",
    "SDXL_KEYS",
    "STUDENT_TARGETS",
    "UNET_TARGETS",
    "AdapterRole",
    "Flux2ScoreModel",
    "FluxScoreModel",
    "LoraMismatchError",
    "LoraRoles",
    "LoraTargets",
    "ModuleScoreModel",
    "SD3ScoreModel",
    "SharedBackbone",
    "UNetScoreModel",
    "add_lora",
    "add_vae_lora",
    "flux2_latents",
    "flux2_vae_latents",
    "load_lora",
    "load_tsdsr_release",
    "lora_config",
    "lora_roles",
    "lora_state_dict",
    "read_lora",
    "save_lora",
    "vae_lora_targets",
]
