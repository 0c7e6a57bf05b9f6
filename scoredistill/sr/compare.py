"""Before/after pictures: the input's bicubic upsampling beside the SR output, with a zoom."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from scoredistill.sr.pipeline import resize

BOX = (1.0, 0.0, 0.0)
"""The colour of the frame that marks the zoomed region (red)."""


def crop_box(height: int, width: int, zoom: int) -> tuple[int, int, int, int]:
    """``(top, left, h, w)``: the centred region that ``zoom`` x fills the whole frame."""
    h, w = max(1, height // zoom), max(1, width // zoom)
    return (height - h) // 2, (width - w) // 2, h, w


def side_by_side(lq: Tensor, sr: Tensor, *, zoom: int = 2) -> Tensor:
    """``(3, 2H, 2W)``: bicubic | SR on top, the centre of each ``zoom`` x below (nearest
    neighbour, so pixels show), its region framed in red on top.

    ``lq`` (3, h, w) the input and ``sr`` (3, H, W) the output, in [0, 1]; the bicubic is the
    antialiased upsampling the pipeline starts from.
    """
    if lq.ndim != 3 or sr.ndim != 3 or lq.shape[0] != 3 or sr.shape[0] != 3:
        raise ValueError(f"expected (3, h, w) images, got {tuple(lq.shape)} and "
                         f"{tuple(sr.shape)}")
    if zoom < 1:
        raise ValueError(f"zoom must be >= 1, got {zoom}")
    size = tuple(sr.shape[-2:])
    top_row = [resize(lq[None].to(sr.device, torch.float32), size)[0].clamp(0, 1), sr.float()]
    y, x, h, w = crop_box(*size, zoom)
    zoomed = [F.interpolate(im[None, :, y:y + h, x:x + w], size=size, mode="nearest")[0]
              for im in top_row]
    framed = []
    for im in top_row:
        im = im.clone()
        colour = im.new_tensor(BOX)[:, None]
        im[:, y, x:x + w] = im[:, y + h - 1, x:x + w] = colour
        im[:, y:y + h, x] = im[:, y:y + h, x + w - 1] = colour
        framed.append(im)
    return torch.cat([torch.cat(framed, dim=-1), torch.cat(zoomed, dim=-1)], dim=-2)
