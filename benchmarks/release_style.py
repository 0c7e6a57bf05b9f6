"""The TSD-SR release's inference, image by image, as the end-to-end benchmark's baseline.

Reproduces ``test/test_tsdsr.py`` of github.com/Microtreei/TSD-SR run with ``--is_use_tile``
(its script's defaults otherwise), per file: Pillow reads the LQ and ``convert('RGB')``s it;
the target size is ``upscale`` x the LQ (the LQ's short side first raised to
``process_size // upscale``, sides cut to multiples of 8); the LQ goes to the device in fp16 and
is bicubic-upsampled there; the VAE encoder (its LoRA unmerged) runs untiled up to
``1024 + 2 x 32`` px, else tile by tile (1024 px cores, 32 px pad) with the tiles waiting on the
CPU between GroupNorms; the posterior is sampled and scaled (no shift, as the release); the
transformer (LoRA unmerged, fp16) runs on one 64-latent tile at a time, overlap 8, blended with
Gaussian weights (std 0.1 of the tile); the latent step is ``z - v``; the decoder runs untiled up
to ``224 + 2 x 11`` latent px, else by tiles (224 latent px cores, 11 px pad) as the encoder; the
output is copied to the host, turned into an 8-bit Pillow image, wavelet colour-fixed on the CPU
against the LQ resized by Pillow, saved as PNG, and ``torch.cuda.empty_cache()`` is called.

Approximations, all on this project's modules rather than the release's code: the tiled VAE is
:func:`scoredistill.sr.vae_tiling.run_tiled` (the same design as the release's ``vaehook.py``:
tiles one at a time, offloaded, whole-image GroupNorm statistics; its tile layout picks
near-equal cores where vaehook picks "best" sizes, same tile counts at 4096 and 8192 px; its
attention is PyTorch's SDPA where vaehook uses xformers when installed); latent tile positions
are spread evenly by :func:`scoredistill.sr.tiling.tiled_apply` where the release steps by
56 and puts the last tile on the edge (same tile counts: 81 at 4096 px, 361 at 8192 px); the
colour fix is this project's wavelet fix (equal to StableSR's) on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from scoredistill.adapters.module import weights_dtype
from scoredistill.sr.colorfix import wavelet_color_fix
from scoredistill.sr.loading import SRModel
from scoredistill.sr.tiling import tiled_apply
from scoredistill.sr.timing import StageTimer
from scoredistill.sr.vae_steps import decoder_network, encoder_network
from scoredistill.sr.vae_tiling import run_tiled


@dataclass(frozen=True)
class ReleaseSettings:
    """test_tsdsr.py's defaults: tiles (latent px for the transformer and the decoder, image
    px for the encoder), the VAE tiles' pads, upscale and process size."""

    latent_tile: int = 64
    latent_overlap: int = 8
    encoder_tile: int = 1024
    encoder_pad: int = 32
    decoder_tile: int = 224
    decoder_pad: int = 11
    upscale: int = 4
    process_size: int = 512


def release_size(width: int, height: int, s: ReleaseSettings) -> tuple[int, int, bool]:
    """test_tsdsr.py's processing size (width, height) of an LQ, and whether the output must be
    resized back to ``upscale`` x the LQ afterwards."""
    small = s.process_size // s.upscale
    resize = width < small or height < small
    if resize:
        scale = small / min(width, height)
        width, height = int(scale * width), int(scale * height)
    width, height = s.upscale * width, s.upscale * height
    if width % 8 or height % 8:
        resize, width, height = True, width - width % 8, height - height % 8
    return width, height, resize


@contextmanager
def stage(timer: StageTimer, name: str, device: torch.device) -> Iterator[None]:
    """Book the enclosed work to ``name``, waiting for the device at its end: the release
    synchronises once per image anyway (its output goes to the host), and syncing at the few
    stage boundaries too attributes each stage's GPU time exactly."""
    t0 = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timer.add(name, time.perf_counter() - t0)


def _to_tensor(image: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def _to_pil(image: Tensor) -> Image.Image:
    # torchvision's ToPILImage on a float tensor: x * 255 truncated to uint8.
    return Image.fromarray(image.mul(255).byte().permute(1, 2, 0).numpy())


@torch.no_grad()
def release_forward(model: SRModel, x: Tensor, s: ReleaseSettings, timer: StageTimer,
                    generator: torch.Generator | None = None) -> Tensor:
    """test_tsdsr.py's ``main``: (1, 3, H, W) in [-1, 1] (fp16) -> (3, H, W) in [-1, 1]."""
    vae, transformer = model.vae, model.student.module
    factor = vae.config.scaling_factor
    with stage(timer, "VAE encode", x.device):
        if max(x.shape[-2:]) > s.encoder_tile + 2 * s.encoder_pad:
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            dist = DiagonalGaussianDistribution(run_tiled(
                encoder_network(vae), x, tile=s.encoder_tile, margin=s.encoder_pad,
                offload=True))
        else:
            dist = vae.encode(x).latent_dist
        z = (dist.sample(generator) * factor).to(x.dtype)
    timestep = torch.tensor([1000.0], device=x.device, dtype=x.dtype)
    cond = model.cond

    def velocity(tile: Tensor) -> Tensor:
        return transformer(hidden_states=tile, timestep=timestep,
                           encoder_hidden_states=cond["prompt_embeds"],
                           pooled_projections=cond["pooled_projections"], return_dict=False)[0]

    with stage(timer, "transformer", x.device):
        v = tiled_apply(velocity, z, tile=s.latent_tile, overlap=s.latent_overlap,
                        align=transformer.config.patch_size).to(x.dtype)
        latent = (z - v) / factor
    with stage(timer, "VAE decode", x.device):
        if max(latent.shape[-2:]) > s.decoder_tile + 2 * s.decoder_pad:
            image = run_tiled(decoder_network(vae), latent, tile=s.decoder_tile,
                              margin=s.decoder_pad, offload=True)
        else:
            image = vae.decode(latent, return_dict=False)[0]
        return image[0].clamp(-1, 1)


def release_upscale_file(model: SRModel, src: Path, dst: Path, timer: StageTimer,
                         s: ReleaseSettings = ReleaseSettings(),
                         generator: torch.Generator | None = None) -> None:
    """One file the release's way (see the module docstring); stages booked on ``timer``."""
    device, dtype = model.cond["prompt_embeds"].device, weights_dtype(model.vae)
    with stage(timer, "I/O", device):
        lr = Image.open(src).convert("RGB")
    width, height = lr.size
    new_w, new_h, resize = release_size(width, height, s)
    target = (width * s.upscale, height * s.upscale)
    with stage(timer, "upload + resize", device):
        lr_scale = lr.resize(target)  # Pillow's default filter: bicubic
        pixels = _to_tensor(lr)[None].to(device, dtype)
        x = F.interpolate(pixels, size=(new_h, new_w), mode="bicubic", align_corners=False)
        x = (x * 2 - 1).to(device, dtype).clamp(-1, 1)
    image = release_forward(model, x, s, timer, generator)
    with stage(timer, "colour fix + resize", device):
        sr = _to_pil((image.cpu().float() / 2 + 0.5).clamp(0, 1))
        if resize:
            sr = sr.resize(target)
        fixed = wavelet_color_fix(_to_tensor(sr)[None], _to_tensor(lr_scale)[None])[0]
        sr = _to_pil(fixed.clamp(0, 1))
    with stage(timer, "I/O", device):
        sr.save(dst)
    if device.type == "cuda":
        with stage(timer, "empty_cache", device):
            torch.cuda.empty_cache()
