"""What a backbone family changes in the planner's steps: the library's ScoreModel adapter on the
denoiser, the condition it takes (shapes of the published text encoders' outputs), and the VAE's
map between images and the denoiser's latents."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..protocols import Cond, ScoreModel
from .backbones import BackboneSpec


def score_model(spec: BackboneSpec, module: nn.Module, latent: tuple[int, int]) -> ScoreModel:
    """The adapter of ``spec.family`` on ``module``, for denoiser latents of size ``latent``
    (h, w): FLUX's schedules are shifted by the token count."""
    from scoredistill.adapters import (
        Flux2ScoreModel,
        FluxScoreModel,
        SD3ScoreModel,
        UNetScoreModel,
    )

    family = spec.family
    if family == "sd3":
        return SD3ScoreModel(module)
    if family == "flux":
        return FluxScoreModel.for_resolution(module, *latent)
    if family == "flux2":
        return Flux2ScoreModel.for_resolution(module, *latent)
    # SDXL's scheduler: epsilon on SD's scaled-linear betas; SD 2.1 (768 px): v-prediction.
    return UNetScoreModel(module, "epsilon" if family == "sdxl" else "v")


def guidance_embedded(spec: BackboneSpec) -> bool:
    """Whether the denoiser embeds the guidance scale (FLUX.1-dev, FLUX.2-dev): the teacher and
    the fake score then take it in the condition instead of real CFG with a null prompt."""
    # diffusers 0.36's FLUX.2 has no guidance_embeds option: the embedding always exists.
    default = spec.family == "flux2"
    return spec.family in ("flux", "flux2") and spec.transformer.get("guidance_embeds", default)


def prompt(spec: BackboneSpec, n: int, device: str, dtype: torch.dtype) -> Cond:
    """A random condition of batch ``n`` as the family's adapter takes it.

    sd3, flux: ``prompt_embeds`` (n, L, D) and ``pooled_projections`` (n, P); flux2:
    ``prompt_embeds`` (n, L, D); both FLUX with ``guidance`` (n,) where embedded; sdxl:
    ``encoder_hidden_states`` (n, L, D), ``text_embeds`` (n, P), ``time_ids`` (n, 6); sd2:
    the tensor (n, L, D). ``L = spec.tokens``.
    """
    dims, family = spec.transformer, spec.family

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    if family in ("sdxl", "sd2"):
        embeds = randn(n, spec.tokens, dims["cross_attention_dim"])
        if family == "sd2":
            return embeds
        # The added condition's input: pooled text, then 6 time ids of addition_time_embed_dim.
        pooled = dims["projection_class_embeddings_input_dim"] - 6 * dims["addition_time_embed_dim"]
        return {"encoder_hidden_states": embeds, "text_embeds": randn(n, pooled),
                "time_ids": torch.rand(n, 6, device=device) * 1024}
    cond = {"prompt_embeds": randn(n, spec.tokens, dims["joint_attention_dim"])}
    if family in ("sd3", "flux"):
        cond["pooled_projections"] = randn(n, dims["pooled_projection_dim"])
    if guidance_embedded(spec):
        cond["guidance"] = torch.full((n,), 3.5, device=device)
    return cond


def latent_size(spec: BackboneSpec, height: int, width: int) -> tuple[int, int]:
    """The denoiser's latent (h, w) for an image of ``height`` x ``width`` px: the VAE's
    downsampling (2 per block after the first), and FLUX.2's 2x2 patches on top."""
    factor = 2 ** (len(spec.vae["block_out_channels"]) - 1) * (2 if spec.family == "flux2" else 1)
    return height // factor, width // factor


def encode(spec: BackboneSpec, vae: nn.Module, image: Tensor, posterior: str) -> Tensor:
    """The denoiser's latent (B, C, h, w) float32 of ``image`` (B, 3, H, W) in [-1, 1]: the
    posterior's sample or mode, shifted and scaled (:func:`scoredistill.sr.latents.encode`),
    or for FLUX.2 patchified and normalised (:func:`scoredistill.adapters.flux2_latents`)."""
    from scoredistill.sr import latents

    if spec.family != "flux2":
        return latents.encode(vae, image, posterior=posterior)  # type: ignore[arg-type]
    from scoredistill.adapters import flux2_latents
    from scoredistill.adapters.module import weights_dtype

    latents.check_posterior(posterior)
    dist = vae.encode(image.to(weights_dtype(vae))).latent_dist
    return flux2_latents(vae, dist.sample() if posterior == "sample" else dist.mode())


def decode(spec: BackboneSpec, vae: nn.Module, latent: Tensor) -> Tensor:
    """Image (B, 3, H, W) float32 in [-1, 1] of the denoiser's latent (inverse of `encode`)."""
    from scoredistill.sr import latents

    if spec.family != "flux2":
        return latents.decode(vae, latent)
    from scoredistill.adapters import flux2_vae_latents
    from scoredistill.adapters.module import weights_dtype

    raw = flux2_vae_latents(vae, latent).to(weights_dtype(vae))
    return vae.decode(raw).sample.float().clamp(-1.0, 1.0)
