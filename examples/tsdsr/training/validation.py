"""Validation during TSD-SR training: the one-step student on fixed LQ/HQ pairs, PNG grids, PSNR."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from examples.tsdsr.data import DegradationConfig, degrade, upsample_lq
from examples.tsdsr.metrics import psnr_y, ssim_y
from examples.tsdsr.training.models import TSDSRModels
from examples.tsdsr.training.step import student_forward
from scoredistill.sr.imageio import list_images, load_image, save_png


@dataclass(frozen=True)
class ValPair:
    """A named LQ (3, H, W), bicubic-upsampled to the HQ size, and its HQ (3, H, W), in [0, 1]."""

    name: str
    lq: Tensor
    hq: Tensor


def load_val_pairs(hq_dir: str | Path, lq_dir: str | Path | None, multiple: int = 16,
                   seed: int = 0, degradation: DegradationConfig | None = None) -> list[ValPair]:
    """HQ images (cropped to a multiple of ``multiple``) with stored LQ, or LQ degraded once."""
    pairs = []
    lq_files = {p.stem: p for p in list_images(lq_dir)} if lq_dir is not None else {}
    for i, path in enumerate(list_images(hq_dir)):
        hq = load_image(path).rgb
        h, w = (s // multiple * multiple for s in hq.shape[-2:])
        hq = hq[:, :h, :w]
        if lq_dir is not None:
            lq = load_image(lq_files[path.stem]).rgb[None]
        else:  # a fixed draw per image, so every validation sees the same inputs
            g = torch.Generator().manual_seed(seed + i)
            lq = degrade(hq[None], degradation or DegradationConfig(), g).lq
        pairs.append(ValPair(path.stem, upsample_lq(lq, size=(h, w))[0], hq))
    return pairs


@torch.no_grad()
def super_resolve(models: TSDSRModels, lq: Tensor, default: dict[str, Tensor]) -> Tensor:
    """The student's SR (B, 3, H, W) in [0, 1] of upsampled LQ (B, 3, H, W) in [0, 1]; the
    posterior mean, as inference."""
    _, x_hat = student_forward(models, lq * 2 - 1, default, posterior="mode")
    return (x_hat + 1) / 2


def validate(models: TSDSRModels, pairs: list[ValPair], default: dict[str, Tensor],
             out_dir: str | Path, step: int, device: torch.device, write: bool = True
             ) -> dict[str, float]:
    """Mean PSNR/SSIM (Y channel) of the student on ``pairs``; with ``write``, also save
    LQ | SR | HQ side by side per image."""
    psnr, ssim = [], []
    if write:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    for pair in pairs:
        sr = super_resolve(models, pair.lq[None].to(device), default)[0].cpu().clamp(0, 1)
        if write:
            save_png(torch.cat([pair.lq, sr, pair.hq], dim=-1),
                     Path(out_dir) / f"step-{step:08d}_{pair.name}.png")
        psnr.append(float(psnr_y(sr[None], pair.hq[None])))
        ssim.append(float(ssim_y(sr[None], pair.hq[None])))
    return {"val/psnr": sum(psnr) / len(psnr), "val/ssim": sum(ssim) / len(ssim)}
