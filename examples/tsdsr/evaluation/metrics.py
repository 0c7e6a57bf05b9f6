"""Image quality metrics for TSD-SR evaluation (paper Sec 4.1), numerically matching pyiqa.

PSNR and SSIM are computed here, on the Y channel of YCbCr exactly as pyiqa 0.1.x does (its
numbers are the ones papers report); the learned and distribution metrics are delegated to pyiqa.
The grid and seam artifact measures come from :mod:`scoredistill.sr.artifacts`.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scoredistill.messages import brief
from scoredistill.sr.artifacts import MIN_PERIODS, grid_score, seam_gradient_excess, seam_lines

# ITU-R BT.601 luma on the 0-255 scale, as in MATLAB's rgb2ycbcr.
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0

_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_C1 = (0.01 * 255) ** 2
_SSIM_C2 = (0.03 * 255) ** 2
_PSNR_EPS = 1e-8  # pyiqa adds it to the MSE, so identical images give 80 dB rather than inf


def rgb_to_y(rgb: torch.Tensor) -> torch.Tensor:
    """BT.601 luma Y in [16, 235] from RGB (B,3,H,W) in [0, 1] (MATLAB rgb2ycbcr) -> (B,1,H,W)."""
    _check_rgb(rgb)
    weights = rgb.new_tensor(_Y_WEIGHTS).view(1, 3, 1, 1)
    return (rgb * weights).sum(dim=1, keepdim=True) + _Y_OFFSET


def psnr_y(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """PSNR in dB on unrounded Y/255 in float32, as pyiqa's `psnr` (B,3,H,W) -> (B,)."""
    _check_pair(sr, hr)
    # pyiqa works in float32; float64 differs from its logs by up to 3e-4 dB on clean images.
    y_sr = rgb_to_y(sr.float()) / 255.0
    y_hr = rgb_to_y(hr.float()) / 255.0
    mse = (y_sr - y_hr).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(1.0 / (mse + _PSNR_EPS))


def ssim_y(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """SSIM (Wang et al. 2004) on rounded Y, float64, 11x11 Gaussian, as pyiqa (B,3,H,W) -> (B,)."""
    _check_pair(sr, hr)
    if min(sr.shape[-2:]) < _SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {_SSIM_WINDOW} pixels a side")
    # pyiqa rounds the float32 Y to integers before its float64 SSIM.
    x = rgb_to_y(sr.float()).round().double()
    y = rgb_to_y(hr.float()).round().double()
    stats = _gaussian_filter_valid(torch.cat([x, y, x * x, y * y, x * y], dim=1))
    mu_x, mu_y, xx, yy, xy = stats.unbind(dim=1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x, var_y, cov = xx - mu_xx, yy - mu_yy, xy - mu_xy
    cs = ((2 * cov + _SSIM_C2) / (var_x + var_y + _SSIM_C2)).clamp(min=0)
    luminance = (2 * mu_xy + _SSIM_C1) / (mu_xx + mu_yy + _SSIM_C1)
    return (luminance * cs).mean(dim=(1, 2))


def _gaussian_filter_valid(images: torch.Tensor) -> torch.Tensor:
    """Per-channel 11x11 Gaussian (sigma 1.5, sum 1) filter without padding (B,C,H,W)."""
    coords = torch.arange(_SSIM_WINDOW, dtype=images.dtype, device=images.device)
    coords = coords - (_SSIM_WINDOW - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * _SSIM_SIGMA**2))
    kernel = kernel / kernel.sum()
    # The window is separable; two 1-D passes over sliding views agree with the 2-D filter to
    # ~1e-15 relative and run several times faster on CPU than (grouped) float64 conv2d.
    rows = images.unfold(-1, _SSIM_WINDOW, 1) @ kernel
    return rows.unfold(-2, _SSIM_WINDOW, 1) @ kernel


def _check_rgb(image: torch.Tensor) -> None:
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"expected RGB images (B,3,H,W); got shape {tuple(image.shape)}")


def _check_pair(sr: torch.Tensor, hr: torch.Tensor) -> None:
    _check_rgb(sr)
    if sr.shape != hr.shape:
        raise ValueError(f"SR and HR shapes differ: {tuple(sr.shape)} vs {tuple(hr.shape)}")


@dataclass(frozen=True)
class MetricInfo:
    """How a metric is called: 'fr' (sr, hr), 'nr' (sr) per image, or 'folder' (sr_dir, hr_dir)."""

    name: str
    kind: str
    higher_is_better: bool


METRICS: dict[str, MetricInfo] = {
    info.name: info
    for info in (
        MetricInfo("psnr", "fr", True),
        MetricInfo("ssim", "fr", True),
        MetricInfo("lpips", "fr", False),
        MetricInfo("dists", "fr", False),
        MetricInfo("fid", "folder", False),
        MetricInfo("niqe", "nr", False),
        MetricInfo("musiq", "nr", True),
        MetricInfo("maniqa", "nr", True),
        MetricInfo("clipiqa", "nr", True),
        MetricInfo("grid", "nr", False),
        MetricInfo("seam", "nr", False),
    )
}

BUILTIN_METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "psnr": psnr_y,
    "ssim": ssim_y,
}

GRID_PERIOD = 16
"""SD3's grid period in px: the VAE's 8 px latent grid x the transformer's 2 x 2 patches."""


def grid_db(sr: torch.Tensor, period: int = GRID_PERIOD) -> float | None:
    """:func:`~scoredistill.sr.artifacts.grid_score` (dB) of one image (1, 3, H, W) in [0, 1];
    None when a side holds fewer than MIN_PERIODS periods (too few to tell a grid)."""
    if min(sr.shape[-2:]) < MIN_PERIODS * period:
        return None
    return float(grid_score(sr, period)[0])


def seam_excess(sr: torch.Tensor) -> float | None:
    """:func:`~scoredistill.sr.artifacts.seam_gradient_excess` of one image (1, 3, H, W) in
    [0, 1] along the borders of ``scoredistill-sr``'s default tiles, for an image at the size
    the model worked at (padded to a multiple of 16 as the pipeline pads it); None when it fits
    one tile."""
    height, width = sr.shape[-2:]
    rows, cols = seam_lines(-(-height // 16) * 16, -(-width // 16) * 16)
    rows, cols = [r for r in rows if r < height], [c for c in cols if c < width]
    if not rows and not cols:
        return None
    return float(seam_gradient_excess(sr, rows, cols)[0])


ARTIFACT_METRICS = ("grid", "seam")
"""Computed here per image, without a reference; None where they do not apply."""

PYIQA_METRICS = tuple(name for name in METRICS
                      if name not in BUILTIN_METRICS and name not in ARTIFACT_METRICS)


def create_pyiqa_metric(
    name: str, device: str | torch.device = "cpu", pretrained_model_path: str | None = None
) -> Callable[..., torch.Tensor]:
    """pyiqa's LPIPS (AlexNet), DISTS, FID, NIQE, MUSIQ, MANIQA or CLIPIQA (TSD-SR Sec 4.1).

    `pretrained_model_path` replaces the metric's own weight file in $TORCH_HOME/hub/pyiqa (for
    CLIPIQA: the CLIP TorchScript file; FID has none); docs/guides/tsdsr-recipe.md lists them.
    """
    if name not in PYIQA_METRICS:
        raise ValueError(f"unknown pyiqa metric {name!r}; choose from {', '.join(PYIQA_METRICS)}")
    try:
        import pyiqa
    except ImportError as exc:
        raise ImportError(
            f"metric {name!r} is computed with pyiqa, which is not installed: "
            "pip install 'scoredistill[eval]'. pyiqa reads its weights from "
            "$TORCH_HOME/hub/pyiqa/<file> (downloading them when absent), or pass "
            "pretrained_model_path=<file>."
        ) from exc
    kwargs = {}
    if pretrained_model_path is not None:
        if name == "fid":
            raise ValueError(
                "pyiqa's FID takes no pretrained_model_path; it reads its Inception weights from "
                "$TORCH_HOME/hub/pyiqa/pt_inception-2015-12-05-6726825d.pth"
            )
        if not Path(pretrained_model_path).is_file():
            raise MissingWeights(f"{name}: no weights file {pretrained_model_path}")
        # pyiqa's CLIPIQA loads its CLIP model by name or, given a file, from that file.
        key = "backbone" if name == "clipiqa" else "pretrained_model_path"
        kwargs[key] = str(pretrained_model_path)
    with _safe_pyiqa_loading():
        try:
            return pyiqa.create_metric(name, device=torch.device(device), **kwargs)
        except MissingWeights:
            raise
        except OSError as exc:  # a Hugging Face or CLIP download that failed, a missing file
            raise MissingWeights(f"{name}: its weights are absent and could not be fetched "
                                    f"({type(exc).__name__}: {' '.join(str(exc).split())}); "
                                    f"put them in place ({WEIGHTS_HELP})") from None


WEIGHTS_HELP = "docs/guides/tsdsr-recipe.md, 'Using the weighted metrics', lists the files"


class MissingWeights(FileNotFoundError):
    """A metric's weights file is absent and could not be downloaded; the message names it."""


class UnsafeWeights(ValueError):
    """A metric's weights file holds objects a weights-only load refuses (it could run code)."""


@contextmanager
def _safe_pyiqa_loading() -> Iterator[None]:
    """While pyiqa builds a metric: every ``torch.load`` is ``weights_only`` (pyiqa passes
    ``weights_only=False``, so a crafted file in the weights folder could run code: it is refused
    instead), and a download that fails names the file to put in place."""
    import pyiqa.utils.download_util as pyiqa_download
    import torch.hub

    real_load, real_download = torch.load, torch.hub.download_url_to_file

    def safe_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        try:
            return real_load(f, *args, **kwargs)
        except pickle.UnpicklingError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines()]
            why = next((ln for ln in lines if "Unsupported" in ln), lines[-1] if lines else "")
            raise UnsafeWeights(f"refusing to load {getattr(f, 'name', f)}: it holds more than "
                                f"tensors and plain containers, so loading it could run code "
                                f"({brief(why)}); use the published weights file") from None

    def download(url: str, dst: str, *args: Any, **kwargs: Any) -> None:
        try:
            real_download(url, dst, *args, **kwargs)
        except Exception as exc:  # URLError, HTTPError, a blocked socket, ...
            raise MissingWeights(f"{dst} is absent and downloading it from {url} failed "
                                    f"({type(exc).__name__}: {brief(str(exc))}): put the file "
                                    f"there ({WEIGHTS_HELP})") from None

    patched = [(torch, "load", safe_load), (torch.hub, "download_url_to_file", download),
               (pyiqa_download, "download_url_to_file", download)]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patched]
    try:
        for obj, attr, value in patched:
            setattr(obj, attr, value)
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


def check_metric_names(names: list[str] | tuple[str, ...]) -> None:
    """Raise ValueError for names outside `METRICS`."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}")
