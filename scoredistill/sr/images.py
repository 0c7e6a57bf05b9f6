"""Images as diffusers users pass them (PIL, numpy, torch) to and from the SR pipeline's
(3, h, w) float32 tensors in [0, 1].

diffusers' ``VaeImageProcessor`` is not reused: it stacks a list into one batch (one size for
all), resizes to multiples of the VAE factor, reads a tensor with negative values as [-1, 1]
with only a FutureWarning, leaves uint8 tensors unscaled, and turns an unknown ``output_type``
into "np". The pipeline takes images of any sizes, and refuses what it cannot read
unambiguously, naming the image.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from scoredistill.sr.imageio import _pil_to_array

ImageInput = Union[Image.Image, np.ndarray, Tensor]  # noqa: UP007 (a runtime alias on 3.10)
"""One image: a PIL image, a numpy array (H, W, C) or a tensor (C, H, W); arrays and tensors
may also be batches (B, H, W, C) / (B, C, H, W)."""
OutputType = Literal["pil", "np", "pt"]
OUTPUT_TYPES = ("pil", "np", "pt")
_UINT_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
_HINT = ("scale it to [0, 1] first (x / 255 for 0..255 values, (x + 1) / 2 for [-1, 1] ones) "
         "or pass uint8")


def to_tensors(images: ImageInput | Sequence[ImageInput], min_side: int = 1) -> list[Tensor]:
    """Each image as (3, h, w) float32 in [0, 1], at least ``min_side`` px a side; tensors stay
    on their device.

    Accepted: PIL images of any colour or grey mode without alpha (16-bit grey too); numpy
    arrays (H, W, C), (B, H, W, C) or grey (H, W); tensors (C, H, W), (B, C, H, W) or grey
    (H, W); C is 3, or 1 (grey, repeated). uint8 is divided by 255 (numpy uint16 by 65535);
    floats must lie in [0, 1]. Anything else is a ValueError or TypeError naming the image
    ("image 2"; "image 1[3]" for item 3 of a batch given as list item 1).
    """
    out = []
    for label, item in _items(images):
        image = _convert(item, label)
        check_image(image, label, min_side)
        out.append(image)
    return out


def check_image(image: Tensor, label: str = "image", min_side: int = 1) -> None:
    """ValueError unless ``image`` is a (3, h, w) float image in [0, 1] of at least ``min_side``
    px a side."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"{label}: expected a (3, h, w) image, got shape {tuple(image.shape)}")
    if not image.dtype.is_floating_point:
        raise ValueError(f"{label} is a tensor of dtype {image.dtype}: expected floats in [0, 1] "
                         "(the pipeline's __call__ also takes uint8)")
    h, w = image.shape[-2:]
    if min(h, w) < min_side:
        raise ValueError(f"{label} is {w}x{h} px; at least {min_side} px per side is needed")
    check_range(image, label)


def check_range(image: Tensor, label: str = "image") -> None:
    """ValueError unless the float tensor ``image`` is finite and within [0, 1]."""
    lo, hi = (float(v) for v in torch.aminmax(image.float()))
    if lo >= 0.0 and hi <= 1.0:
        return
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{label} holds NaN or infinite values")
    raise ValueError(f"{label} has float values in [{lo:.4g}, {hi:.4g}], outside [0, 1]: "
                     f"{_HINT}")


def check_output_type(output_type: str) -> None:
    """ValueError unless ``output_type`` is "pil", "np" or "pt"."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}, "
                         f"got {output_type!r}")


def from_tensors(images: Sequence[Tensor], output_type: OutputType
                 ) -> list[Image.Image] | list[np.ndarray] | list[Tensor]:
    """(3, H, W) tensors in [0, 1] as ``output_type``: "pt" as they are, "np" (H, W, 3) float32
    arrays, "pil" RGB images (rounded to 8 bits, as diffusers' ``numpy_to_pil``)."""
    check_output_type(output_type)
    if output_type == "pt":
        return list(images)
    arrays = [image.detach().permute(1, 2, 0).float().cpu().numpy() for image in images]
    if output_type == "np":
        return arrays
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arrays]


def _items(images: ImageInput | Sequence[ImageInput]) -> Iterator[tuple[str, object]]:
    """(label, one image) for each image, batches split."""
    listed = isinstance(images, list | tuple)
    for j, item in enumerate(images if listed else [images]):  # type: ignore[arg-type]
        if isinstance(item, np.ndarray | Tensor) and item.ndim == 4:
            for k, one in enumerate(item):
                yield (f"image {j}[{k}]" if listed else f"image {k}"), one
        else:
            yield f"image {j}", item


def _convert(item: object, label: str) -> Tensor:
    if isinstance(item, Image.Image):
        array, _ = _pil_to_array(item)  # every mode, 16-bit grey included, as files are read
        if array.shape[2] in (2, 4):
            raise ValueError(f"{label} is a PIL image of mode {item.mode} (with alpha): pass "
                             "image.convert('RGB') (scoredistill-sr keeps the alpha plane)")
        return _rgb(torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), label)
    if isinstance(item, np.ndarray):
        if item.ndim == 3 and item.shape[-1] not in (1, 3, 4) and item.shape[0] in (1, 3):
            raise ValueError(f"{label} is a numpy array of shape {item.shape}: numpy images are "
                             "(H, W, C); pass np.transpose(a, (1, 2, 0))")
        if item.dtype.kind != "f" and item.dtype not in _UINT_SCALE:
            raise ValueError(f"{label} is a numpy array of dtype {item.dtype}: pass uint8, "
                             "uint16 or floats in [0, 1]")
        array = item[..., None] if item.ndim == 2 else item
        if array.ndim != 3:
            raise ValueError(f"{label} is a numpy array of shape {item.shape}: expected (H, W, C)"
                             " or (H, W)")
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).float()
        return _rgb(tensor / _UINT_SCALE.get(item.dtype, 1.0), label)
    if isinstance(item, Tensor):
        if item.ndim == 3 and item.shape[0] not in (1, 3, 4) and item.shape[-1] in (1, 3):
            raise ValueError(f"{label} is a tensor of shape {tuple(item.shape)}: tensors are "
                             "(C, H, W); pass x.permute(2, 0, 1)")
        if item.dtype != torch.uint8 and not item.dtype.is_floating_point:
            raise ValueError(f"{label} is a tensor of dtype {item.dtype}: pass uint8, or floats "
                             "in [0, 1]")
        tensor = item[None] if item.ndim == 2 else item
        return _rgb(tensor.float() / 255 if item.dtype == torch.uint8 else tensor.float(), label)
    raise TypeError(f"{label} is a {type(item).__name__}: pass a PIL image, a numpy array or a "
                    "torch tensor (a file: PIL.Image.open(path), or scoredistill-sr)")


def _rgb(image: Tensor, label: str) -> Tensor:
    """(C, H, W) float, integer types already rescaled -> (3, H, W) float32 (grey repeated)."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        alpha = " (drop the alpha channel)" if image.ndim == 3 and image.shape[0] == 4 else ""
        raise ValueError(f"{label} has shape {tuple(image.shape)} read as (C, H, W): expected "
                         f"3 (RGB) or 1 (grey) channels{alpha}")
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image
