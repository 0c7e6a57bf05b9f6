"""TSD-SR's one-step super-resolution of an image tensor or file (Dong et al., CVPR 2025).

The LQ image is bicubic-upsampled by ``upscale`` (its short side raised to ``process_size``
first, then the result resized back), padded to a multiple of VAE factor x patch size (16 for
SD3), encoded, moved by one transformer call at t = 1000, decoded and colour-aligned to the
upsampled LQ.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from scoredistill.sr.colorfix import color_fix
from scoredistill.sr.imageio import load_image, save_png
from scoredistill.sr.latents import decode, encode, one_step
from scoredistill.sr.loading import SRModel
from scoredistill.sr.tiling import TileConfig, tiled_decode, tiled_encode, tiled_one_step

MIN_SIDE = 8
"""Inputs with a side below this many pixels are refused: too little content to upsample."""
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, PIL's "L" conversion
DEFAULT_TILES = TileConfig()


@torch.no_grad()
def sr_forward(model: SRModel, lq: Tensor, tiles: TileConfig | None = None) -> Tensor:
    """TSD-SR's one-step forward: (B, 3, H, W) in [-1, 1] -> (B, 3, H, W) in [-1, 1].

    ``D(z_L - v(z_L, 1000, c))`` with ``z_L = E(lq)`` (posterior mode: deterministic output);
    ``tiles`` tiles each stage whose input exceeds its tile (None: never).
    """
    cond = {k: v.expand(lq.shape[0], *v.shape[1:]) for k, v in model.cond.items()}
    if tiles is None:
        return decode(model.vae, one_step(model.student, encode(model.vae, lq, posterior="mode"),
                                          cond))
    z = tiled_encode(model.vae, lq, tile=tiles.encoder, overlap=tiles.encoder_overlap)
    z_hat = tiled_one_step(model.student, z, cond, tile=tiles.latent,
                           overlap=tiles.latent_overlap,
                           align=model.student.module.config.patch_size)
    return tiled_decode(model.vae, z_hat, tile=tiles.decoder, overlap=tiles.decoder_overlap)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)


@torch.no_grad()
def super_resolve(model: SRModel, image: Tensor, *, upscale: float = 4.0,
                  process_size: int = 512, tiles: TileConfig | None = DEFAULT_TILES,
                  color: str = "wavelet") -> Tensor:
    """Super-resolve (3, h, w) in [0, 1] to (3, round(h*upscale), round(w*upscale)) in [0, 1]."""
    h, w = image.shape[-2:]
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"image is {w}x{h} px; at least {MIN_SIDE} px per side is needed")
    target = (round(h * upscale), round(w * upscale))
    # The model saw >= 512 px crops: raise the short side to process_size (release: LQ 128 px).
    grow = max(1.0, process_size / min(target))
    work = (round(target[0] * grow), round(target[1] * grow))
    dtype = next(model.vae.parameters()).dtype
    lq = _resize(image[None].to(model.cond["prompt_embeds"].device, torch.float32),
                 work).clamp(0, 1)
    m = model.multiple
    pad = (0, -work[1] % m, 0, -work[0] % m)  # replicate-pad, then crop: no resampling
    x = F.pad(lq * 2 - 1, pad, mode="replicate").to(dtype)
    sr = (sr_forward(model, x, tiles)[..., :work[0], :work[1]] + 1) / 2
    sr = color_fix(sr, lq, color)
    return _resize(sr, target).clamp(0, 1)[0]


def upscale_file(model: SRModel, src: Path, dst: Path, **options: object) -> None:
    """Read ``src`` (RGB/RGBA/grey, 8/16 bit), super-resolve, write ``dst`` atomically (PNG at
    the input's bit depth)."""
    loaded = load_image(src)
    sr = super_resolve(model, loaded.rgb, **options)  # type: ignore[arg-type]
    if loaded.grey:
        sr = torch.einsum("chw,c->hw", sr, sr.new_tensor(_LUMA))[None]
    if loaded.alpha is not None:
        alpha = _resize(loaded.alpha[None].to(sr), tuple(sr.shape[-2:]))[0].clamp(0, 1)
        # save_png writes 1, 3 or 4 channels: grey + alpha goes out as RGBA with equal channels.
        sr = torch.cat([sr.expand(3, -1, -1), alpha])
    save_png(sr.cpu(), dst, bits=loaded.bits)


def plan_outputs(inputs: Sequence[Path], out_dir: Path) -> tuple[list[tuple[Path, Path]],
                                                                  dict[str, str]]:
    """``(src, dst)`` pairs, and failures for names that would overwrite an input or each other."""
    taken = {p.resolve() for p in inputs}
    jobs, failed, claimed = [], {}, set()
    for src in inputs:
        dst = out_dir / f"{src.stem}.png"
        if dst.resolve() in taken:
            failed[str(src)] = f"output {dst} would overwrite an input"
        elif dst in claimed:
            failed[str(src)] = f"output {dst} is already the output of another input"
        else:
            claimed.add(dst)
            jobs.append((src, dst))
    return jobs, failed
