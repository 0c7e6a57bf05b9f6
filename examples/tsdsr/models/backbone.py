"""The recipe's backbone: a local SD3 diffusers folder, or the embedded tiny default pre-fitted
by :mod:`~examples.tsdsr.models.tiny_fit` (so training and inference agree on the base weights;
only LoRA files move between the two)."""

from __future__ import annotations

from pathlib import Path

import torch

from examples.tsdsr.models.tiny import random_backbone
from examples.tsdsr.models.tiny_fit import fitted_states
from scoredistill.sr.loading import Backbone, load_sd3


def fitted_backbone(*, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", cache_dir: str | Path | None = None
                    ) -> Backbone:
    """The "tiny-fit" backbone with tiny_fit.py's pre-fitted weights (cached; fitted on a miss).

    Its VAE reconstructs and its transformer is a rectified-flow denoiser of that VAE's latents,
    so TSD-SR's teacher means something; ``cond`` is the seeded default prompt it was fitted with.
    """
    states = fitted_states("tiny-fit", seed, cache_dir=cache_dir)
    parts = random_backbone("tiny-fit", seed=seed)
    parts.transformer.load_state_dict(states["transformer.safetensors"])
    parts.vae.load_state_dict(states["vae.safetensors"])
    return Backbone(torch.nn.Module.to(parts.transformer, device, dtype),
                    torch.nn.Module.to(parts.vae, device, dtype),
                    {k: v.to(device, dtype) for k, v in parts.cond.items()})


def load_backbone(pretrained: str | None, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> Backbone:
    """SD3's transformer and VAE from a local diffusers folder, or the pre-fitted tiny default
    (:func:`fitted_backbone`) if None.

    The folder's prompt embeddings need the text encoders, so ``cond`` is None for it: the
    default prompt comes precomputed (e.g. the release's ``prompt_embeds.pt``).
    """
    if pretrained is None:
        return fitted_backbone(dtype=dtype, device=device)
    return load_sd3(pretrained, dtype, device)
