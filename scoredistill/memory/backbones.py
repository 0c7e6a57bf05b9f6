"""Published SD3-family configurations (transformer + VAE) and building them without memory.

Models are built on the meta device (instant at any size), then every parameter and buffer is
made a fake tensor of the target device (:class:`~torch._subclasses.fake_tensor.FakeTensorMode`):
shapes, dtypes and devices are real, no memory is allocated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

_SD3_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, use_quant_conv=False,
    use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
    sample_size=1024)
_SD3: dict[str, Any] = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                            attention_head_dim=64, joint_attention_dim=4096,
                            pooled_projection_dim=2048)


@dataclass(frozen=True)
class BackboneSpec:
    """Constructor kwargs of ``SD3Transformer2DModel`` and ``AutoencoderKL``; prompt tokens."""

    transformer: dict[str, Any]
    vae: dict[str, Any] = field(default_factory=lambda: dict(_SD3_VAE))
    tokens: int = 333  # 77 CLIP-L/G + 256 T5-XXL tokens (SD3's pipelines, TSD-SR)


SPECS: dict[str, BackboneSpec] = {
    # The recipe's tiny preset (examples/tsdsr/models/tiny.py "tiny"): SD3-shaped, 8x VAE.
    "tiny": BackboneSpec(
        dict(sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8,
             num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
             pooled_projection_dim=64, out_channels=16, pos_embed_max_size=96),
        dict(_SD3_VAE, block_out_channels=(4, 8, 16, 16), layers_per_block=1, norm_num_groups=2,
             sample_size=64), tokens=12),
    # SD3-shaped, ~100 M transformer parameters: what a real CPU run validates the planner on.
    "sd3-100m": BackboneSpec(
        dict(_SD3, num_layers=4, num_attention_heads=12, caption_projection_dim=768,
             joint_attention_dim=1024, pooled_projection_dim=768, pos_embed_max_size=96),
        dict(_SD3_VAE, block_out_channels=(16, 32, 64, 64), layers_per_block=1,
             norm_num_groups=8, sample_size=256), tokens=77),
    # stabilityai/stable-diffusion-3-medium-diffusers: transformer/ and vae/ config.json.
    "sd3-medium": BackboneSpec(dict(_SD3, num_layers=24, num_attention_heads=24,
                                    caption_projection_dim=1536, pos_embed_max_size=192)),
    # stabilityai/stable-diffusion-3.5-medium: MMDiT-X (dual attention in blocks 0-12), QK norm.
    "sd3.5-medium": BackboneSpec(dict(_SD3, num_layers=24, num_attention_heads=24,
                                      caption_projection_dim=1536, pos_embed_max_size=384,
                                      qk_norm="rms_norm",
                                      dual_attention_layers=tuple(range(13)))),
    # stabilityai/stable-diffusion-3.5-large.
    "sd3.5-large": BackboneSpec(dict(_SD3, num_layers=38, num_attention_heads=38,
                                     caption_projection_dim=2432, pos_embed_max_size=192,
                                     qk_norm="rms_norm")),
}


def read_spec(path: str | Path, tokens: int = 333) -> BackboneSpec:
    """A spec from a local diffusers SD3 folder (``transformer/`` and ``vae/`` config.json) or a
    transformer ``config.json`` alone (then SD3's published VAE)."""
    path = Path(path)
    files = ({"transformer": path / "transformer" / "config.json", "vae": path / "vae" /
              "config.json"} if path.is_dir() else {"transformer": path})
    configs = {}
    for part, file in files.items():
        try:
            raw = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{file} is not a readable config.json ({exc})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{file} holds {type(raw).__name__}, not a JSON object of "
                             "constructor arguments")
        # "_class_name", "_diffusers_version", ...: diffusers' bookkeeping, not arguments.
        configs[part] = {k: v for k, v in raw.items() if not k.startswith("_")}
    return BackboneSpec(configs["transformer"], configs.get("vae", dict(_SD3_VAE)), tokens)


@dataclass
class Backbone:
    """The transformer and the VAE (real or fake tensors)."""

    transformer: nn.Module
    vae: nn.Module


def build_meta(spec: BackboneSpec) -> Backbone:
    """The spec's modules on the meta device (no memory, no init compute)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    with torch.device("meta"):
        return Backbone(SD3Transformer2DModel(**spec.transformer), AutoencoderKL(**spec.vae))


def build_real(spec: BackboneSpec, dtype: torch.dtype, device: str = "cpu",
               seed: int = 0) -> Backbone:
    """The spec's modules with random weights in ``dtype`` on ``device``."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        return Backbone(SD3Transformer2DModel(**spec.transformer).to(dtype),
                        AutoencoderKL(**spec.vae).to(dtype))


def make_fake(module: nn.Module, device: str) -> None:
    """Replace ``module``'s meta parameters and buffers by fake tensors on ``device``, in place.

    Call inside the FakeTensorMode. ``module.to()`` cannot do it: it swaps parameters with
    ``torch.utils.swap_tensors``, which refuses tensors holding weak references (peft's).
    """
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = nn.Parameter(_like(p, device), requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = _like(b, device)


def _like(t: torch.Tensor, device: str) -> torch.Tensor:
    # Strides kept: a channels-last weight stays channels-last.
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
