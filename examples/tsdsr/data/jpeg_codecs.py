"""JPEG for the degradation: Real-ESRGAN's simulated codec (basicsr's DiffJPEG) or libjpeg.

Real-ESRGAN (Wang et al., ICCVW 2021) compresses its training LQ with this codec, not libjpeg:
JFIF YCbCr on the 0-255 scale, 4:2:0 chroma by 2x2 means (nearest upsampling back), the 8x8
orthonormal DCT, the JPEG Annex K tables times an unrounded quality factor (libjpeg rounds and
clips the scaled table), plain rounding, and the inverse. The image is zero-padded at the bottom
and right to multiples of 16 and cropped back; the output is clamped to [0, 1] but not rounded to
8-bit levels (Real-ESRGAN rounds once, at the end of the pipeline).

kornia's ``jpeg_codec_differentiable`` is a different codec (pseudo-rounding, libjpeg-rounded
tables, bilinear chroma, replicate padding), so it is not used for this.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

# JPEG Annex K.1/K.2 tables, rows = vertical frequency (libjpeg's natural order).
LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61), (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56), (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77), (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101), (72, 92, 95, 98, 112, 100, 103, 99),
)
CHROMA_TABLE = (
    (17, 18, 24, 47, 99, 99, 99, 99), (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99), (47, 66, 99, 99, 99, 99, 99, 99),
    *((99,) * 8,) * 4,
)
# JFIF (ITU-R BT.601 full range) colour transforms, rows = output channel.
RGB_TO_YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
YCBCR_TO_RGB = ((1.0, 0.0, 1.402), (1.0, -0.344136, -0.714136), (1.0, 1.772, 0.0))
JPEG_CODECS = ("diffjpeg", "libjpeg")
PAD_MULTIPLE = 16  # one 4:2:0 macroblock: 8x8 chroma blocks cover 16x16 pixels


def quality_factor(quality: Tensor) -> Tensor:
    """libjpeg's quality -> table scale, unrounded as DiffJPEG has it: 50/q below 50, 2 - q/50."""
    return torch.where(quality < 50, 50.0 / quality, 2.0 - quality / 50.0)


def dct_matrix(dtype: torch.dtype, device: torch.device) -> Tensor:
    """(8,8) orthonormal DCT-II, D[u, x] = c(u) cos((2x+1)uπ/16): a block's DCT is D B Dᵀ."""
    k = torch.arange(8, dtype=torch.float64)
    d = torch.cos((2 * k[None] + 1) * k[:, None] * math.pi / 16) / 2
    d[0] /= math.sqrt(2)
    return d.to(dtype=dtype, device=device)


def _tables(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    # DiffJPEG applies the tables transposed (horizontal frequencies get the vertical steps);
    # Real-ESRGAN's models were trained on that, so it is kept.
    luma, chroma = (torch.tensor(t, dtype=dtype, device=device).T for t in
                    (LUMA_TABLE, CHROMA_TABLE))
    return luma, chroma


def _code_plane(plane: Tensor, table: Tensor, factor: Tensor) -> Tensor:
    """(B,h,w) on the 0-255 scale, h and w multiples of 8 -> quantised and reconstructed."""
    b, h, w = plane.shape
    d = dct_matrix(plane.dtype, plane.device)
    blocks = (plane - 128).view(b, h // 8, 8, w // 8, 8).transpose(2, 3)  # (B, h/8, w/8, 8, 8)
    step = table * factor.view(b, 1, 1, 1, 1)
    coeffs = torch.round(d @ blocks @ d.T / step) * step
    return (d.T @ coeffs @ d + 128).transpose(2, 3).reshape(b, h, w)


def diff_jpeg(x: Tensor, quality: Tensor | float) -> Tensor:
    """(B,3,H,W) in [0,1] through DiffJPEG at ``quality`` (float or (B,)), clamped to [0,1]."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a (B,3,H,W) image, got {tuple(x.shape)}")
    b, _, h, w = x.shape
    quality = torch.as_tensor(quality, dtype=x.dtype, device=x.device).expand(b)
    if not bool(((quality > 0) & (quality <= 100)).all()):
        raise ValueError(f"JPEG quality must lie in (0, 100], got {quality.tolist()}")
    factor = quality_factor(quality)
    pad_h, pad_w = (-h) % PAD_MULTIPLE, (-w) % PAD_MULTIPLE
    image = F.pad(x, (0, pad_w, 0, pad_h)) * 255  # zeros at the bottom and right, as DiffJPEG
    shift = torch.tensor([0.0, 128.0, 128.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    to_ycbcr, to_rgb = (torch.tensor(m, dtype=x.dtype, device=x.device) for m in
                        (RGB_TO_YCBCR, YCBCR_TO_RGB))
    ycbcr = torch.einsum("oc,bchw->bohw", to_ycbcr, image) + shift
    luma_table, chroma_table = _tables(x.dtype, x.device)
    y = _code_plane(ycbcr[:, 0], luma_table, factor)
    # 4:2:0: chroma coded at half resolution (2x2 means), shown again by pixel repetition.
    chroma = F.avg_pool2d(ycbcr[:, 1:], 2)
    cb, cr = (_code_plane(chroma[:, i], chroma_table, factor) for i in (0, 1))
    chroma = torch.stack([cb, cr], 1).repeat_interleave(2, -2).repeat_interleave(2, -1)
    decoded = torch.cat([y[:, None], chroma], 1) - shift
    rgb = torch.einsum("oc,bchw->bohw", to_rgb, decoded)
    return (rgb[..., :h, :w] / 255).clamp(0.0, 1.0)


def compress(x: torch.Tensor, quality: float | None, codec: str = "diffjpeg") -> torch.Tensor:
    """(B,3,H,W) clamped to [0,1], then JPEG-coded by `codec` (one of JPEG_CODECS) at `quality`."""
    if quality is None:
        return x
    if codec == "diffjpeg":
        return diff_jpeg(x.clamp(0.0, 1.0), quality)
    if codec == "libjpeg":
        return jpeg(x, round(quality))
    raise ValueError(f"unknown JPEG codec {codec!r}; expected one of {JPEG_CODECS}")


def jpeg(x: torch.Tensor, quality: int | None) -> torch.Tensor:
    """(B,3,H,W) through libjpeg at `quality`, back on 8-bit levels (Wang et al. 2021, Sec. 3.2)."""
    if quality is None:
        return x
    # Pillow's libjpeg is the real codec; torchvision's encoder would do too but is deprecated
    # from 0.29 on.
    images = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    decoded = []
    for image in images.numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        with Image.open(buffer) as compressed:
            decoded.append(torch.from_numpy(np.array(compressed.convert("RGB"))))
    return torch.stack(decoded).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype) / 255.0
