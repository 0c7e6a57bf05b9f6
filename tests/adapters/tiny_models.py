"""Tiny offline SD3 / UNet / VAE models (diffusers' own test configs) and helpers."""

from __future__ import annotations

import torch

from scoredistill.adapters import ATTENTION_TARGETS, STUDENT_TARGETS, lora_config, lora_state_dict

LATENT = (16, 8, 8)
"""Latent shape (C, H, W) of the tiny SD3 transformer in the tests."""


def tiny_sd3_transformer() -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=16, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
        pooled_projection_dim=64, out_channels=16).eval()


def tiny_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
        attention_head_dim=2, norm_num_groups=2).eval()


def tiny_vae() -> torch.nn.Module:
    """A 2x VAE with SD3's latent channels; ``quant_conv`` on so its LoRA is exercised."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), layers_per_block=1,
        latent_channels=16, norm_num_groups=1, use_quant_conv=True, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035).eval()


def sd3_cond(batch: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(batch, 5, 32, generator=g),
            "pooled_projections": torch.randn(batch, 64, generator=g)}


def small_config(role: str):
    """TSD-SR's module lists at rank 4, which keeps the tests fast."""
    return lora_config(STUDENT_TARGETS if role == "student" else ATTENTION_TARGETS, rank=4)


@torch.no_grad()
def randomize_lora(module: torch.nn.Module, adapter: str, seed: int, scale: float = 0.05) -> None:
    """Give an adapter nonzero weights, so it changes the output (Gaussian init has B = 0)."""
    g = torch.Generator().manual_seed(seed)
    for p in lora_state_dict(module, adapter).values():
        p.copy_(torch.randn(p.shape, generator=g) * scale)
