"""Published backbone configurations (denoiser + VAE) of five families, and building them without
memory.

Families: ``sd3`` (SD3 / SD3.5), ``flux`` (FLUX.1), ``flux2`` (FLUX.2), ``sdxl`` and ``sd2`` (the
UNets of SDXL and SD 2.x). Models are built on the meta device (instant at any size), then every
parameter and buffer is made a fake tensor of the target device
(:class:`~torch._subclasses.fake_tensor.FakeTensorMode`): shapes, dtypes and devices are real, no
memory is allocated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

FAMILIES: dict[str, tuple[str, str]] = {
    "sd3": ("SD3Transformer2DModel", "AutoencoderKL"),
    "flux": ("FluxTransformer2DModel", "AutoencoderKL"),
    "flux2": ("Flux2Transformer2DModel", "AutoencoderKLFlux2"),
    "sdxl": ("UNet2DConditionModel", "AutoencoderKL"),
    "sd2": ("UNet2DConditionModel", "AutoencoderKL"),
}
"""Family -> diffusers class names of its denoiser and its VAE."""

_VAE_BLOCKS: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, norm_num_groups=32, act_fn="silu")
# stabilityai/stable-diffusion-3-medium-diffusers, vae/config.json.
_SD3_VAE: dict[str, Any] = dict(
    _VAE_BLOCKS, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
    shift_factor=0.0609, scaling_factor=1.5305, sample_size=1024)
_SD3: dict[str, Any] = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                            attention_head_dim=64, joint_attention_dim=4096,
                            pooled_projection_dim=2048)
# black-forest-labs/FLUX.1-dev, vae/config.json (as InvokeAI's tests and Open-Sora's configs
# restate it): SD3's layout, 16 channels, its own shift and scale.
_FLUX_VAE: dict[str, Any] = dict(
    _VAE_BLOCKS, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
    shift_factor=0.1159, scaling_factor=0.3611, force_upcast=True, sample_size=1024)
# black-forest-labs/FLUX.2-dev, vae/config.json: AutoencoderKLFlux2's defaults in diffusers
# 0.42 (32 channels, quant convs, the batch norm of 2x2 patches), written out.
_FLUX2_VAE: dict[str, Any] = dict(
    _VAE_BLOCKS, latent_channels=32, use_quant_conv=True, use_post_quant_conv=True,
    mid_block_add_attention=True, batch_norm_eps=1e-4, batch_norm_momentum=0.1,
    patch_size=(2, 2), sample_size=1024)
# stabilityai/stable-diffusion-xl-base-1.0 and stable-diffusion-2-1, vae/config.json.
_SDXL_VAE: dict[str, Any] = dict(_VAE_BLOCKS, latent_channels=4, scaling_factor=0.13025,
                                 force_upcast=True, sample_size=1024)
_SD2_VAE: dict[str, Any] = dict(_VAE_BLOCKS, latent_channels=4, scaling_factor=0.18215,
                                sample_size=768)
_VAES = {"sd3": _SD3_VAE, "flux": _FLUX_VAE, "flux2": _FLUX2_VAE, "sdxl": _SDXL_VAE,
         "sd2": _SD2_VAE}
TOKENS = {"sd3": 333, "flux": 512, "flux2": 512, "sdxl": 77, "sd2": 77}
"""Prompt tokens a family's pipeline conditions on: SD3 77 CLIP-L/G + 256 T5-XXL (TSD-SR);
FLUX.1 512 T5-XXL (FluxPipeline's max_sequence_length for dev) plus the pooled CLIP-L vector;
FLUX.2 512 Mistral tokens (Flux2Pipeline's max_sequence_length); SDXL and SD 2.x 77 CLIP
tokens."""


@dataclass(frozen=True)
class BackboneSpec:
    """Constructor kwargs of a family's denoiser (``transformer``: an SD3/FLUX/FLUX.2
    transformer or an SDXL/SD 2.x UNet) and VAE (`FAMILIES`); prompt tokens."""

    transformer: dict[str, Any]
    vae: dict[str, Any] = field(default_factory=lambda: dict(_SD3_VAE))
    tokens: int = TOKENS["sd3"]
    family: str = "sd3"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown backbone family {self.family!r}; expected one of "
                             f"{', '.join(FAMILIES)}")


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
    # black-forest-labs/FLUX.1-dev, transformer/config.json (benchmarks/train_step_flux.py's
    # "flux-dev"): 19 double- + 38 single-stream blocks, 3072 wide, guidance-distilled.
    "flux.1-dev": BackboneSpec(
        dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
             pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        dict(_FLUX_VAE), TOKENS["flux"], "flux"),
    # black-forest-labs/FLUX.2-dev, transformer/config.json: Flux2Transformer2DModel's
    # documented defaults in diffusers 0.42 (8 double- + 48 single-stream blocks, 6144 wide;
    # text: 3 stacked Mistral-Small-3.1 layers, 3 x 5120 = 15360), written out.
    "flux.2-dev": BackboneSpec(
        dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48,
             attention_head_dim=128, num_attention_heads=48, joint_attention_dim=15360,
             timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
             rope_theta=2000, eps=1e-6),
        dict(_FLUX2_VAE), TOKENS["flux2"], "flux2"),
    # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json: text 2048-d (CLIP-L 768 +
    # OpenCLIP-G 1280), added condition = pooled 1280 + 6 time ids x 256 = 2816.
    "sdxl": BackboneSpec(
        dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
             block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
             transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             use_linear_projection=True, addition_embed_type="text_time",
             addition_embed_type_num_heads=64, addition_time_embed_dim=256,
             projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5),
        dict(_SDXL_VAE), TOKENS["sdxl"], "sdxl"),
    # stabilityai/stable-diffusion-2-1, unet/config.json: OpenCLIP-H text, 1024-d.
    "sd2.1": BackboneSpec(
        dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
             block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
             cross_attention_dim=1024,
             down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
             up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
             use_linear_projection=True, upcast_attention=True, norm_num_groups=32,
             norm_eps=1e-5),
        dict(_SD2_VAE), TOKENS["sd2"], "sd2"),
}


def read_spec(path: str | Path, tokens: int | None = None) -> BackboneSpec:
    """A spec from a local diffusers folder (``transformer/`` or ``unet/``, and ``vae/``
    config.json) or a denoiser ``config.json`` alone (then its family's published VAE).

    The family comes from the denoiser's ``_class_name`` (a UNet with SDXL's ``text_time``
    added conditioning is ``sdxl``, else ``sd2``); ``tokens`` None: the family's `TOKENS`.
    """
    path = Path(path)
    if path.is_dir():
        denoiser = next((path / d / "config.json" for d in ("transformer", "unet")
                         if (path / d / "config.json").exists()), path / "transformer" /
                        "config.json")
        files = {"transformer": denoiser, "vae": path / "vae" / "config.json"}
    else:
        files = {"transformer": path}
    raw = {part: _read_config(file) for part, file in files.items()}
    family = _family(raw["transformer"], files["transformer"])
    if "vae" in raw and raw["vae"].get("_class_name", FAMILIES[family][1]) != FAMILIES[family][1]:
        raise ValueError(f"{files['vae']} is a {raw['vae']['_class_name']}, but a {family} "
                         f"backbone's VAE is a {FAMILIES[family][1]}")
    # "_class_name", "_diffusers_version", ...: diffusers' bookkeeping, not arguments.
    configs = {part: {k: v for k, v in config.items() if not k.startswith("_")}
               for part, config in raw.items()}
    return BackboneSpec(configs["transformer"], configs.get("vae", dict(_VAES[family])),
                        TOKENS[family] if tokens is None else tokens, family)


def _read_config(file: Path) -> dict[str, Any]:
    try:
        raw = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{file} is not a readable config.json ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file} holds {type(raw).__name__}, not a JSON object of constructor "
                         "arguments")
    return raw


def _family(config: dict[str, Any], file: Path) -> str:
    name = config.get("_class_name")
    if name == "UNet2DConditionModel":
        return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd2"
    for family, (denoiser, _) in FAMILIES.items():
        if name == denoiser:
            return family
    known = sorted({denoiser for denoiser, _ in FAMILIES.values()})
    raise ValueError(f"{file} has _class_name {name!r}; expected one of {', '.join(known)} "
                     "(diffusers' save_pretrained writes it)")


@dataclass
class Backbone:
    """The denoiser (``transformer``, a UNet for sdxl/sd2) and the VAE (real or fake tensors)."""

    transformer: nn.Module
    vae: nn.Module


def classes(spec: BackboneSpec) -> tuple[type[nn.Module], type[nn.Module]]:
    """The diffusers classes of the spec's denoiser and VAE."""
    import diffusers

    return tuple(getattr(diffusers, name) for name in FAMILIES[spec.family])  # type: ignore


def build_meta(spec: BackboneSpec) -> Backbone:
    """The spec's modules on the meta device (no memory, no init compute)."""
    denoiser, vae = classes(spec)
    with torch.device("meta"):
        return Backbone(denoiser(**spec.transformer), vae(**spec.vae))


def build_real(spec: BackboneSpec, dtype: torch.dtype, device: str = "cpu",
               seed: int = 0) -> Backbone:
    """The spec's modules with random weights in ``dtype`` on ``device``."""
    denoiser, vae = classes(spec)
    torch.manual_seed(seed)
    with torch.device(device):
        return Backbone(denoiser(**spec.transformer).to(dtype), vae(**spec.vae).to(dtype))


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
