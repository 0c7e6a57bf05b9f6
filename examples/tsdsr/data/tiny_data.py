"""The tiny default's data: scikit-image's bundled photos (no download) as HQ folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from scoredistill.sr.imageio import save_png

# Every photo scikit-image bundles (no download), grey ones as RGB. skimage's `cat` is `chelsea`
# and the two motorcycle photos are a stereo pair: the held-out ones appear in no other form.
TRAIN = ("astronaut", "coffee", "chelsea", "immunohistochemistry", "colorwheel",
         "hubble_deep_field", "retina", "camera", "brick", "grass", "gravel", "coins", "moon")
HELD_OUT = ("rocket", "motorcycle")
_LOADERS = {"motorcycle": lambda data: data.stereo_motorcycle()[0]}  # the left view
CAPTIONS = {"astronaut": "an astronaut in a white space suit with a flag",
            "coffee": "a cup of coffee on a saucer"}  # the others use the default prompt


def photo(name: str, side: int) -> torch.Tensor:
    import skimage.data
    from skimage.color import gray2rgb

    array = _LOADERS[name](skimage.data) if name in _LOADERS else getattr(skimage.data, name)()
    array = gray2rgb(array) if array.ndim == 2 else array[..., :3]
    image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255
    # Short side to `side` (antialiased), then a centre crop to a multiple of 16.
    scale = side / min(image.shape[-2:])
    size = [int(s * scale) // 16 * 16 for s in image.shape[-2:]]
    return torch.nn.functional.interpolate(image[None], size=size, mode="bicubic",
                                           antialias=True)[0].clamp(0, 1)


def write_tiny_data(root: str | Path, side: int = 128) -> tuple[Path, Path]:
    """Write train (with two captions) and held-out HQ folders under ``root``; return both."""
    train, val = Path(root) / "hq", Path(root) / "val_hq"
    for folder, names in ((train, TRAIN), (val, HELD_OUT)):
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            if not (folder / f"{name}.png").is_file():
                save_png(photo(name, side), folder / f"{name}.png")
    for name, caption in CAPTIONS.items():
        (train / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
    return train, val
