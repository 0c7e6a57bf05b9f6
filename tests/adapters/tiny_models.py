"""Tiny offline SD3 / SD3.5 / FLUX.1 / FLUX.2 / UNet / SDXL / VAE models (diffusers' test
configs), helpers."""

from __future__ import annotations

import pytest
import torch

from scoredistill.adapters import SD3_TARGETS, LoraTargets, lora_config, lora_state_dict

LATENT = (16, 8, 8)
"""Latent shape (C, H, W) of the tiny SD3 transformer in the tests."""


def tiny_sd3_transformer() -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=16, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
        pooled_projection_dim=64, out_channels=16).eval()


def tiny_sd35_transformer() -> torch.nn.Module:
    """SD3.5's additions: RMS qk-norm and a dual-attention (MMDiT-X) first block."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
        pooled_projection_dim=64, out_channels=16, qk_norm="rms_norm",
        dual_attention_layers=(0,)).eval()


FLUX_LATENT = (4, 8, 8)
"""Latent shape of the tiny FLUX transformer: 4 channels, packed into 16-channel 2x2 patches."""


def tiny_flux_transformer(guidance_embeds: bool = True) -> torch.nn.Module:
    """FLUX.1-dev's layout (double- and single-stream blocks, guidance embedding) in miniature."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 6, 6), guidance_embeds=guidance_embeds).eval()


def flux_cond(batch: int, seed: int = 1, guidance: float | None = 3.5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cond = {"prompt_embeds": torch.randn(batch, 5, 32, generator=g),
            "pooled_projections": torch.randn(batch, 32, generator=g)}
    if guidance is not None:
        cond["guidance"] = torch.full((batch,), guidance)
    return cond


FLUX2_LATENT = (16, 4, 6)
"""Latent shape of the tiny FLUX.2 transformer (its in_channels; FLUX.2: 128 = 4 x 32); not
square, so a swap of rows and columns shows."""


def tiny_flux2_transformer(guidance_embeds: bool = True) -> torch.nn.Module:
    """FLUX.2-dev's layout (shared modulation, fused single-stream blocks, 4 RoPE axes); without
    the guidance embedding, FLUX.2-klein's."""
    import inspect

    import diffusers

    cls = getattr(diffusers, "Flux2Transformer2DModel", None)
    if cls is None:
        pytest.skip(f"diffusers {diffusers.__version__} has no Flux2Transformer2DModel (0.36+)")
    # diffusers 0.36 always embeds the guidance (FLUX.2-dev); later ones add guidance_embeds.
    klein = {} if guidance_embeds else {"guidance_embeds": False}
    if klein and "guidance_embeds" not in inspect.signature(cls.__init__).parameters:
        pytest.skip(f"diffusers {diffusers.__version__}'s FLUX.2 has no guidance_embeds option")
    torch.manual_seed(0)
    return cls(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), **klein).eval()


def flux2_cond(batch: int, seed: int = 1, guidance: float | None = 4.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cond = {"prompt_embeds": torch.randn(batch, 5, 32, generator=g)}
    if guidance is not None:
        cond["guidance"] = torch.full((batch,), guidance)
    return cond


def tiny_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
        attention_head_dim=2, norm_num_groups=2).eval()


def tiny_sdxl_unet() -> torch.nn.Module:
    """SDXL's ``text_time`` added conditioning: pooled text (8) + 6 time ids x 4 = 32 inputs."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
        attention_head_dim=2, norm_num_groups=2, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4).eval()


def sdxl_cond(batch: int, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).expand(batch, 6)
    return {"encoder_hidden_states": torch.randn(batch, 5, 8, generator=g),
            "text_embeds": torch.randn(batch, 8, generator=g),
            "time_ids": sizes + torch.randint(0, 8, (batch, 6), generator=g)}


def unet_cond(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 8, generator=torch.Generator().manual_seed(seed))


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


def matches(name: str, target: str) -> bool:
    """peft's rule for a list of targets: the full name or a dotted suffix of it."""
    return name == target or name.endswith(f".{target}")


def small_config(role: str, targets: LoraTargets = SD3_TARGETS):
    """A family's module lists (default: TSD-SR's on SD3) at rank 4, which keeps tests fast."""
    return lora_config(targets.student if role == "student" else targets.fake, rank=4,
                       exclude=targets.exclude)


@torch.no_grad()
def randomize_lora(module: torch.nn.Module, adapter: str, seed: int, scale: float = 0.05) -> None:
    """Give an adapter nonzero weights, so it changes the output (Gaussian init has B = 0)."""
    g = torch.Generator().manual_seed(seed)
    for p in lora_state_dict(module, adapter).values():
        p.copy_(torch.randn(p.shape, generator=g) * scale)
