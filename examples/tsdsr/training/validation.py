"""Validation during TSD-SR training: the one-step student on fixed LQ/HQ pairs, PNG grids, PSNR,
SSIM and the grid-artifact measure."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from examples.tsdsr.data import DegradationConfig, degrade, upsample_lq
from examples.tsdsr.evaluation.metrics import GRID_PERIOD, grid_db, psnr_y, ssim_y
from examples.tsdsr.training.checkpoint import write_error
from examples.tsdsr.training.models import TSDSRModels
from examples.tsdsr.training.step import student_forward
from scoredistill.sr.imageio import list_images, load_image, save_png

log = logging.getLogger("tsdsr.train")


@dataclass(frozen=True)
class ValPair:
    """A named LQ (3, H, W), bicubic-upsampled to the HQ size, and its HQ (3, H, W), in [0, 1]."""

    name: str
    lq: Tensor
    hq: Tensor


def load_val_pairs(hq_dir: str | Path, lq_dir: str | Path | None, multiple: int = 16,
                   seed: int = 0, degradation: DegradationConfig | None = None,
                   ) -> tuple[list[ValPair], dict[Path, str]]:
    """HQ images (cropped to a multiple of ``multiple``) with stored LQ, or LQ degraded once;
    and ``{file: problem}`` for the images that cannot be used (undecodable, smaller than
    ``multiple``, no LQ file of the same stem)."""
    pairs, problems = [], {}
    lq_files = {p.stem: p for p in list_images(lq_dir)} if lq_dir is not None else {}
    for i, path in enumerate(list_images(hq_dir)):
        try:
            hq = load_image(path).rgb
            h, w = (s // multiple * multiple for s in hq.shape[-2:])
            if not h or not w:
                raise ValueError(f"{path} is {hq.shape[-1]}x{hq.shape[-2]}, smaller than "
                                 f"{multiple} px a side")
            hq = hq[:, :h, :w]
            if lq_dir is not None:
                if path.stem not in lq_files:
                    raise ValueError(f"no LQ image {Path(lq_dir) / path.stem}.* for {path}")
                lq = load_image(lq_files[path.stem]).rgb[None]
            else:  # a fixed draw per image, so every validation sees the same inputs
                g = torch.Generator().manual_seed(seed + i)
                lq = degrade(hq[None], degradation or DegradationConfig(), g).lq
        except ValueError as exc:
            problems[path] = " ".join(str(exc).split())
            continue
        pairs.append(ValPair(path.stem, upsample_lq(lq, size=(h, w))[0], hq))
    return pairs, problems


@torch.no_grad()
def super_resolve(models: TSDSRModels, lq: Tensor, default: dict[str, Tensor]) -> Tensor:
    """The student's SR (B, 3, H, W) in [0, 1] of upsampled LQ (B, 3, H, W) in [0, 1]; the
    posterior mean, as inference."""
    _, x_hat = student_forward(models, lq * 2 - 1, default, posterior="mode")
    return (x_hat + 1) / 2


def validate(models: TSDSRModels, pairs: list[ValPair], default: dict[str, Tensor],
             out_dir: str | Path, step: int, device: torch.device, write: bool = True,
             grid_period: int = GRID_PERIOD) -> dict[str, float]:
    """Mean PSNR/SSIM (Y channel) and grid-artifact measure of the student on ``pairs``; with
    ``write``, also save LQ | SR | HQ side by side per image.

    ``val/grid``: :func:`~scoredistill.sr.artifacts.grid_score` (dB) at ``grid_period`` px,
    averaged over the images of at least 4 periods a side (absent if there is none).
    """
    psnr, ssim, grid = [], [], []
    if write:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    for pair in pairs:
        sr = super_resolve(models, pair.lq[None].to(device), default)[0].cpu().clamp(0, 1)
        if write:
            path = Path(out_dir) / f"step-{step:08d}_{pair.name}.png"
            try:
                save_png(torch.cat([pair.lq, sr, pair.hq], dim=-1), path)
            except Exception as exc:  # a picture is not worth the run: the metrics go on
                problem = write_error(exc)
                if problem is None:
                    raise
                log.warning("could not write validation image %s (%s)", path, problem)
        psnr.append(float(psnr_y(sr[None], pair.hq[None])))
        ssim.append(float(ssim_y(sr[None], pair.hq[None])))
        grid.append(grid_db(sr[None], grid_period))
    metrics = {"val/psnr": sum(psnr) / len(psnr), "val/ssim": sum(ssim) / len(ssim)}
    grid = [g for g in grid if g is not None]
    if grid:
        metrics["val/grid"] = sum(grid) / len(grid)
    return metrics
