"""TSD-SR's backbone parts: the embedded tiny SD3-shaped default, SD3-medium's shapes, or a
local SD3 diffusers folder.

The tiny backbones are rebuilt bit-identically from a seed (on the CPU in fp32, then moved);
the default one is then pre-fitted once by tiny_fit.py and cached, so training and inference
agree on the base weights; only LoRA files move between the two. ``random_backbone("tiny")``
is the instant, unfitted one for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from scoredistill.sr.loading import Backbone, load_sd3

if TYPE_CHECKING:
    pass

_SD3_VAE_COMMON: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, use_quant_conv=False,
    use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)


@dataclass(frozen=True)
class BackboneConfig:
    """Constructor kwargs of the SD3 transformer and VAE, and the prompt length (tokens)."""

    transformer: dict[str, Any]
    vae: dict[str, Any]
    tokens: int


CONFIGS: dict[str, BackboneConfig] = {
    # SD3-shaped (patch 2, 16 latent channels, joint attention, 8x VAE with 4 blocks) but tiny.
    "tiny": BackboneConfig(
        transformer=dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2,
                         attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                         caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
                         pos_embed_max_size=96),
        vae=dict(_SD3_VAE_COMMON, block_out_channels=(4, 8, 16, 16), layers_per_block=1,
                 norm_num_groups=2, sample_size=64),
        tokens=12),
    # What load_backbone(None) returns after tiny_fit.py pre-fits it: a 4x VAE (three blocks),
    # because at this width 16 channels per 8x8 patch (SD3's 12x compression) do not
    # reconstruct in a CPU minute, while per 4x4 patch (3x) they do; SD3's 16 latent channels,
    # shift and scale are kept. A wider transformer, so the teacher can learn to denoise.
    "tiny-fit": BackboneConfig(
        transformer=dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2,
                         attention_head_dim=16, num_attention_heads=4, joint_attention_dim=32,
                         caption_projection_dim=64, pooled_projection_dim=64, out_channels=16,
                         pos_embed_max_size=96),
        vae=dict(_SD3_VAE_COMMON, down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32),
                 layers_per_block=1, norm_num_groups=8, sample_size=64),
        tokens=12),
    # stabilityai/stable-diffusion-3-medium-diffusers: transformer/ and vae/ config.json; 333
    # tokens = 77 CLIP-L/G + 256 T5-XXL.
    "sd3-medium": BackboneConfig(
        transformer=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                         attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                         caption_projection_dim=1536, pooled_projection_dim=2048,
                         out_channels=16, pos_embed_max_size=192),
        vae=dict(_SD3_VAE_COMMON, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 norm_num_groups=32, sample_size=1024),
        tokens=333),
}


def random_cond(config: str = "tiny", batch: int = 1, seed: int = 0) -> dict[str, Tensor]:
    """Seeded prompt embeddings shaped like ``config``'s: (batch, L, D) and pooled (batch, P)."""
    spec = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    dims = spec.transformer
    return {"prompt_embeds": torch.randn(batch, spec.tokens, dims["joint_attention_dim"],
                                         generator=g),
            "pooled_projections": torch.randn(batch, dims["pooled_projection_dim"], generator=g)}


def random_backbone(config: str = "tiny", *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> Backbone:
    """Randomly initialised backbone of ``config`` (a CONFIGS key), in eval mode.

    The tiny configs are built on the CPU in fp32 (identical on every machine); larger configs
    are built on ``device`` directly (fast, but the weights depend on the device's RNG).

    Example:
        >>> parts = random_backbone("tiny")  # instant and unfitted, for tests
    """
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    spec = CONFIGS[config]
    where = torch.device("cpu") if config.startswith("tiny") else torch.device(device)
    cuda = [where.index if where.index is not None else torch.cuda.current_device()
            ] if where.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), where:
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**spec.transformer)
        vae = AutoencoderKL(**spec.vae)
    cond = {k: v.to(device, dtype) for k, v in random_cond(config, seed=seed + 1).items()}
    # nn.Module.to, not diffusers' override: that one warns about modules to keep in fp32,
    # which only matters for pretrained weights loaded with `torch_dtype`.
    return Backbone(torch.nn.Module.to(transformer, device, dtype).eval(),
                    torch.nn.Module.to(vae, device, dtype).eval(), cond)


def fitted_backbone(*, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", cache_dir: str | Path | None = None
                    ) -> Backbone:
    """The "tiny-fit" backbone with tiny_fit.py's pre-fitted weights (cached; fitted on a miss).

    Its VAE reconstructs and its transformer is a rectified-flow denoiser of that VAE's latents,
    so TSD-SR's teacher means something; ``cond`` is the seeded default prompt it was fitted with.
    """
    from examples.tsdsr.tiny_fit import fitted_states

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
