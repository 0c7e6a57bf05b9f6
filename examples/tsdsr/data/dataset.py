"""Paired HQ/LQ crops for TSD-SR; LQ stored or made by Real-ESRGAN (Wang et al., ICCVW 2021)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from scoredistill.sr.imageio import IMAGE_EXTENSIONS, load_image

from .degradation import DegradationConfig, degrade, upsample_lq

DEFAULT_PROMPT = (
    "Cinematic, High Contrast, highly detailed, taken using a Canon EOS R camera, hyper detailed "
    "photo - realistic maximum detail, 32k, Color Grading, ultra HD, extrememeticulous detailing, "
    "skin pore detailing, hyper sharpness, perfect without deformations."
)


class PairedSRDataset(Dataset):
    """Random crops of HQ images (3,crop,crop) in [0,1], with captions and optional stored LQ."""

    def __init__(
        self,
        hq_dir: str | os.PathLike,
        lq_dir: str | os.PathLike | None = None,
        crop_size: int = 512,
        scale: int = 4,
        hflip: bool = True,
        vflip: bool = False,
        require_captions: bool = False,
        default_caption: str = DEFAULT_PROMPT,
    ) -> None:
        if crop_size <= 0 or crop_size % scale:
            raise ValueError(f"crop_size {crop_size} must be a positive multiple of scale {scale}")
        self.hq_dir = Path(hq_dir)
        self.paths = _images_under(self.hq_dir)
        if not self.paths:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {self.hq_dir}")
        self.lq_paths = None if lq_dir is None else _match_lq(self.paths, self.hq_dir, Path(lq_dir))
        self.crop_size = crop_size
        self.scale = scale
        self.hflip = hflip
        self.vflip = vflip
        self.require_captions = require_captions
        self.default_caption = default_caption

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        """{'hq': (3,crop,crop), 'path', 'caption'}, plus 'lq' (3,crop,crop) if LQ is stored."""
        path = self.paths[index]
        hq = load_image(path).rgb
        height, width = hq.shape[-2:]
        if min(height, width) < self.crop_size:
            raise ValueError(f"{path} is {width}x{height}, smaller than the {self.crop_size} crop")
        # Crop origins on the scale grid keep an x`scale` smaller LQ file aligned with the HQ crop.
        top = self.scale * _randint((height - self.crop_size) // self.scale + 1)
        left = self.scale * _randint((width - self.crop_size) // self.scale + 1)
        # Clone so a DataLoader worker ships the crop, not the whole image's storage.
        images = {"hq": hq[:, top : top + self.crop_size, left : left + self.crop_size].clone()}
        if self.lq_paths is not None:
            images["lq"] = self._lq_crop(self.lq_paths[index], path, (height, width), top, left)
        if self.hflip and _randint(2):
            images = {k: v.flip(-1) for k, v in images.items()}
        if self.vflip and _randint(2):
            images = {k: v.flip(-2) for k, v in images.items()}
        return {**images, "path": str(path), "caption": self._caption(path)}

    def _lq_crop(
        self, lq_path: Path, hq_path: Path, hq_size: tuple[int, int], top: int, left: int
    ) -> torch.Tensor:
        lq = load_image(lq_path).rgb
        crop = self.crop_size
        if tuple(lq.shape[-2:]) == hq_size:
            return lq[:, top : top + crop, left : left + crop].clone()
        if tuple(lq.shape[-2:]) == tuple(s // self.scale for s in hq_size):
            s = self.scale
            small = lq[:, top // s : (top + crop) // s, left // s : (left + crop) // s]
            return upsample_lq(small[None], size=(crop, crop))[0]
        raise ValueError(
            f"LQ {lq_path} is {tuple(lq.shape[-2:])}; expected the HQ size {hq_size} of {hq_path} "
            f"or 1/{self.scale} of it"
        )

    def _caption(self, path: Path) -> str:
        caption_path = path.with_suffix(".txt")
        if caption_path.is_file():
            return caption_path.read_text(encoding="utf-8").strip()
        if self.require_captions:
            raise FileNotFoundError(f"no caption {caption_path} for {path}")
        return self.default_caption


def degrade_batch(
    batch: dict,
    generator: torch.Generator | None = None,
    config: DegradationConfig | None = None,
) -> dict:
    """Add 'lq' (B,3,H,W): Real-ESRGAN LQ of batch['hq'] upsampled back (Wang et al. 2021)."""
    hq = batch["hq"]
    pair = degrade(hq, config, generator)
    # With USM on, the sharpened image is the training target, as in Real-ESRGAN.
    return {**batch, "hq": pair.hq, "lq": upsample_lq(pair.lq, size=tuple(hq.shape[-2:]))}


def _randint(high: int) -> int:
    # The global torch RNG is what DataLoader reseeds per worker, so crops stay reproducible.
    return int(torch.randint(high, ()))


def _images_under(root: Path) -> list[Path]:
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    return sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _match_lq(hq_paths: list[Path], hq_dir: Path, lq_dir: Path) -> list[Path]:
    """The LQ file with the same relative path and stem as each HQ image (any extension)."""
    by_stem: dict[Path, Path] = {}
    for lq in _images_under(lq_dir):
        stem = lq.relative_to(lq_dir).with_suffix("")
        if stem in by_stem:
            raise ValueError(f"two LQ files share the stem {stem}: {by_stem[stem]} and {lq}")
        by_stem[stem] = lq
    matched = []
    for hq in hq_paths:
        stem = hq.relative_to(hq_dir).with_suffix("")
        if stem not in by_stem:
            raise FileNotFoundError(f"no LQ image {lq_dir / stem}.* for {hq}")
        matched.append(by_stem[stem])
    return matched
