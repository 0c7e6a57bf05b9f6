"""The random TSD-SR model the inference benchmarks run, and the pipeline's forward over it:
SD3-shaped backbone with nonzero student and VAE-encoder LoRAs, merged as the pipeline loads."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from unittest import mock

import torch
from torch import Tensor

from examples.tsdsr.models.tiny import random_backbone
from scoredistill.adapters import (
    STUDENT_TARGETS,
    SD3ScoreModel,
    add_lora,
    add_vae_lora,
    lora_config,
    lora_state_dict,
)
from scoredistill.sr import pipeline as sr_pipeline
from scoredistill.sr.latents import decoder_input
from scoredistill.sr.loading import SRModel, merge_lora
from scoredistill.sr.pipeline import TSDSRPipeline

Forward = Callable[[Tensor], Tensor]
RANKS = {"tiny": 4, "sd3-medium": 64}
"""LoRA rank per config: TSD-SR's 64 for SD3-medium; 4 keeps the tiny model's ratio of rank to
width (its layers are 4-32 wide) and so the relative cost of unmerged adapters."""

def build(config: str, dtype: torch.dtype, device: str) -> SRModel:
    """Random backbone with student and VAE-encoder LoRAs (nonzero B, so merging changes the
    weights), unmerged."""
    parts = random_backbone(config, dtype=dtype, device=device)
    add_lora(parts.transformer, lora_config(STUDENT_TARGETS, RANKS[config]), "student")
    add_vae_lora(parts.vae, RANKS[config])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module, adapter in ((parts.transformer, "student"), (parts.vae, "default")):
            for key, p in lora_state_dict(module, adapter).items():
                if ".lora_B." in key:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            module.requires_grad_(False)
    return SRModel(SD3ScoreModel(parts.transformer), parts.vae, parts.cond)


def merge_and_fuse(model: SRModel) -> None:
    """What inference does: LoRA folded into the weights, Q/K/V projections fused."""
    for module in (model.student.module, model.vae):
        merge_lora(module)
        module.fuse_qkv_projections()


MODES: dict[str, dict[str, bool]] = {
    "compiled": {"compile": True, "cuda_graphs": False},
    "compiled + CUDA graphs": {"compile": True, "cuda_graphs": True},
    "compiled + FP8": {"compile": True, "cuda_graphs": False, "fp8": True},
}
"""The pipeline's fast modes (TSDSRPipeline options), each timed after the eager rows."""


def pipeline_forward(model: SRModel, batch: int, **mode: bool) -> Forward:
    """The pipeline's forward of a (batch, 3, H, W) input in [-1, 1], untiled, in ``mode``."""
    pipe = TSDSRPipeline(model, tiles=None, batch_size=batch, **mode)
    return lambda x: pipe.forward([x])[0]


def _decode_unclamped(vae: Any, latent: Tensor) -> Tensor:
    return vae.decode(decoder_input(vae, latent)).sample.float()


@contextmanager
def unclamped() -> Iterator[None]:
    """Pipelines built and run inside return the decoder's output before its clamp to [-1, 1]:
    the check compares there, where a clamp cannot hide an error in saturated pixels."""
    with mock.patch.object(sr_pipeline, "decode", _decode_unclamped):
        yield
