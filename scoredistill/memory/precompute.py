"""The recipe's precompute stage (``examples/tsdsr/precompute.py``) traced at real sizes.

SD3's three text encoders (CLIP-L, CLIP-G, T5-XXL) built from their published configurations on
fake tensors, run through precompute.py's own ``encode_prompts`` (diffusers'
``StableDiffusion3Pipeline.encode_prompt``), and with ``latents`` the VAE encoder on one HQ image
as its ``--latents`` pass runs it. Everything precompute.py holds at once is resident here too:
the three encoders, and the VAE with ``latents``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .backbones import BackboneSpec, build_meta, make_fake
from .release import source_module
from .trace import Allocated, Phase, Placeholders, Plan, allocated_peak, run_phases, trace

# SD3's text encoders, as stabilityai/stable-diffusion-3-medium-diffusers' text_encoder/,
# text_encoder_2/ and text_encoder_3/ config.json give them (the same values as Stability AI's
# reference implementation, sd3_infer.py: CLIPL_CONFIG, CLIPG_CONFIG, T5_CONFIG): CLIP ViT-L/14
# and OpenCLIP bigG/14 text towers with projections, and T5 v1.1 XXL's encoder.
CLIP_L: dict[str, Any] = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                              num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
                              max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_G: dict[str, Any] = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                              num_hidden_layers=32, num_attention_heads=20, projection_dim=1280,
                              max_position_embeddings=77, hidden_act="gelu")
T5_XXL: dict[str, Any] = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                              num_heads=64, feed_forward_proj="gated-gelu",
                              relative_attention_num_buckets=32,
                              relative_attention_max_distance=128)
T5_TOKENS = 256  # precompute.py's max_sequence_length for SD3 (TSD-SR: 77 + 256 = 333 tokens)


@dataclass(frozen=True)
class PrecomputeRun:
    """precompute.py's flags that change memory: ``--batch-size`` captions per encoder call,
    ``--dtype``, ``--latents`` and the HQ images' size (their latents are encoded one by one)."""

    batch: int = 8
    dtype: torch.dtype = torch.bfloat16  # precompute.py's default --dtype with --pretrained
    latents: bool = False
    image: int = 512  # HQ image side, px


def _encoders(clip_l: dict[str, Any], clip_g: dict[str, Any], t5: dict[str, Any],
              dtype: torch.dtype, device: str) -> list[nn.Module]:
    """CLIP-L, CLIP-G, T5 on ``device`` ("meta": no memory), in ``dtype``."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    # bos/eos ids of precompute.py's stand-in tokenizer (token ids only pick rows: the memory
    # is the same as with CLIP's own tokenizer).
    ids = dict(bos_token_id=2, eos_token_id=3, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        return [CLIPTextModelWithProjection(CLIPTextConfig(**clip_l, **ids)).to(dtype),
                CLIPTextModelWithProjection(CLIPTextConfig(**clip_g, **ids)).to(dtype),
                T5EncoderModel(T5Config(**t5)).to(dtype)]


def _precompute_step(modules: list[nn.Module], vae: nn.Module | None, run: PrecomputeRun,
                     clip_tokens: int, t5_tokens: int, device: str) -> list[Phase]:
    """precompute.py's calls: the default/null prompts (batch 2), one batch of ``run.batch``
    captions, and with a ``vae`` one HQ image's latent."""
    pre = source_module("examples.tsdsr.precompute")
    from scoredistill.sr.latents import encode

    # precompute.py's tokenizer stand-in (word level, no download) cut at CLIP's length; the
    # tiny encoders it comes with are replaced by ``modules``.
    pipe = pre.tiny_pipeline(["a photo"], tokens=2 * clip_tokens)
    for name, module in zip(("text_encoder", "text_encoder_2", "text_encoder_3"), modules,
                            strict=True):
        setattr(pipe, name, module)
    pre.frozen_text_encoders(pipe)
    def prompts(texts: list[str]) -> Phase:
        def phase() -> None:
            pre.encode_prompts(pipe, texts, t5_tokens)
        return phase

    phases = [prompts(["a photo", ""]), prompts(["a photo"] * run.batch)]
    if vae is not None:
        image = torch.rand(1, 3, run.image, run.image, device=device) * 2 - 1

        def latent() -> None:
            encode(vae, image, posterior="mode")  # precompute.py's call, frozen VAE, no graph

        phases.append(latent)
    return phases


def plan_precompute(spec: BackboneSpec, run: PrecomputeRun, device: str = "cpu",
                    encoders: tuple[dict[str, Any], ...] = (CLIP_L, CLIP_G, T5_XXL),
                    t5_tokens: int = T5_TOKENS) -> Plan:
    """precompute.py on fake ``device`` tensors (see :func:`_precompute_step`); ``spec``'s VAE
    with ``run.latents``.

    ``encoders``: CLIP-L, CLIP-G and T5 config kwargs (SD3's by default); ``t5_tokens``: the
    T5 sequence length (CLIP's is its ``max_position_embeddings``).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    modules = _encoders(*encoders, run.dtype, "meta")
    vae = build_meta(spec).vae.to(run.dtype).requires_grad_(False) if run.latents else None
    held = [*modules, *([vae] if vae is not None else [])]
    with FakeTensorMode(), Placeholders():
        for module in held:
            make_fake(module, device)
        for module in modules:
            # make_fake gives every parameter its own tensor: T5's input embedding is tied to
            # its `shared` table (one tensor, 0.49 GiB in fp32 for T5-XXL), tie it again.
            module.tie_weights()
        phases = _precompute_step(modules, vae, run, encoders[0]["max_position_embeddings"],
                                  t5_tokens, device)
        return trace(phases, held, device=device)


def _real_vae(spec: BackboneSpec, dtype: torch.dtype) -> nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    # Alone (build_real would add the transformer), frozen as precompute.py's latent_vae.
    return AutoencoderKL(**spec.vae).to(dtype).requires_grad_(False)


def measure_precompute(spec: BackboneSpec, run: PrecomputeRun,
                       encoders: tuple[dict[str, Any], ...], t5_tokens: int) -> Allocated:
    """Peak bytes allocated during a REAL CPU run of the same calls (weights included)."""
    def setup() -> Callable[[], None]:
        modules = _encoders(*encoders, run.dtype, "cpu")
        vae = _real_vae(spec, run.dtype) if run.latents else None
        phases = _precompute_step(modules, vae, run, encoders[0]["max_position_embeddings"],
                                  t5_tokens, "cpu")
        return lambda: run_phases(phases)

    return allocated_peak(setup)
