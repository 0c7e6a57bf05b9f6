"""Real-ESRGAN's simulated JPEG (basicsr DiffJPEG) against its definitions; the codec choice."""

import itertools
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

from examples.tsdsr.data import (
    DegradationConfig,
    compress,
    degrade,
    diff_jpeg,
    jpeg,
    sample_params,
)
from examples.tsdsr.data.jpeg_codecs import CHROMA_TABLE, LUMA_TABLE, quality_factor


def _dct_4d() -> torch.Tensor:
    # basicsr's DCT8x8: T[x, y, u, v] = cos((2x+1)uπ/16) cos((2y+1)vπ/16), scaled by
    # α(u)α(v)/4 with α(0) = 1/√2; its iDCT8x8 uses the transposed tensor.
    t = torch.zeros(8, 8, 8, 8, dtype=torch.float64)
    for x, y, u, v in itertools.product(range(8), repeat=4):
        t[x, y, u, v] = (math.cos((2 * x + 1) * u * math.pi / 16)
                         * math.cos((2 * y + 1) * v * math.pi / 16))
    alpha = torch.tensor([1 / math.sqrt(2)] + [1.0] * 7, dtype=torch.float64)
    return t, torch.outer(alpha, alpha)


def _reference(x: torch.Tensor, quality: float) -> torch.Tensor:
    """One (3,H,W) image as basicsr's DiffJPEG(differentiable=False) defines it, block by block."""
    factor = 50 / quality if quality < 50 else 2 - quality / 50  # quality_to_factor
    _, h, w = x.shape
    ph, pw = (16 - h % 16) % 16, (16 - w % 16) % 16
    img = F.pad(x, (0, pw, 0, ph), value=0.0) * 255
    r, g, b = img
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    cb, cr = (F.avg_pool2d(c[None, None], 2)[0, 0] for c in (cb, cr))
    t, alpha = _dct_4d()
    # basicsr stores the Annex K tables transposed (y_table = array(...).T).
    luma = torch.tensor(LUMA_TABLE, dtype=torch.float64).T * factor
    chroma = torch.tensor(CHROMA_TABLE, dtype=torch.float64).T * factor

    def code(plane, table):
        out = torch.empty_like(plane)
        for i in range(0, plane.shape[0], 8):
            for j in range(0, plane.shape[1], 8):
                block = plane[i:i + 8, j:j + 8] - 128
                coeffs = 0.25 * alpha * torch.tensordot(block, t, dims=2)
                coeffs = torch.round(coeffs / table) * table
                back = 0.25 * torch.einsum("uv,xyuv->xy", alpha * coeffs, t) + 128
                out[i:i + 8, j:j + 8] = back
        return out

    y, cb, cr = code(y, luma), code(cb, chroma), code(cr, chroma)
    cb, cr = (c.repeat_interleave(2, 0).repeat_interleave(2, 1) - 128 for c in (cb, cr))
    rgb = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb])
    return (rgb.clamp(0, 255) / 255)[:, :h, :w]


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    """(2,3,40,56) float64: natural crops, sizes not multiples of 16."""
    crops = [skdata.astronaut()[100:140, 200:256], skdata.coffee()[200:240, 300:356]]
    return torch.stack([torch.from_numpy(c.copy()).permute(2, 0, 1) for c in crops]).double() / 255


@pytest.mark.parametrize("quality", [30.0, 47.5, 71.3, 95.0])
def test_diff_jpeg_equals_basicsrs_definition(photo, quality):
    out = diff_jpeg(photo, quality)
    expected = torch.stack([_reference(img, quality) for img in photo])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
    assert not torch.allclose(out, photo, atol=1e-3)


def test_per_sample_qualities(photo):
    out = diff_jpeg(photo, torch.tensor([30.0, 90.0]))
    torch.testing.assert_close(out[:1], diff_jpeg(photo[:1], 30.0), rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1:], diff_jpeg(photo[1:], 90.0), rtol=0, atol=1e-12)


def test_diff_jpeg_pads_with_zeros_to_multiples_of_16(photo):
    x = photo[..., :20, :28]
    zero = F.pad(x, (0, 4, 0, 12))
    replicate = F.pad(x, (0, 4, 0, 12), mode="replicate")
    out = diff_jpeg(x, 40.0)
    torch.testing.assert_close(out, diff_jpeg(zero, 40.0)[..., :20, :28], rtol=0, atol=1e-12)
    # The padding shows in the blocks it shares with the image: replicate padding differs.
    assert (out - diff_jpeg(replicate, 40.0)[..., :20, :28]).abs().max() > 1e-2


def test_quality_factor_is_libjpegs_scale_unrounded():
    q = torch.tensor([10.0, 30.0, 50.0, 75.0, 95.0])
    expected = torch.tensor([5.0, 5 / 3, 1.0, 0.5, 0.1])
    torch.testing.assert_close(quality_factor(q), expected)


def test_bad_quality_is_rejected(photo):
    with pytest.raises(ValueError, match="quality"):
        diff_jpeg(photo, 0.0)
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        diff_jpeg(photo[:, :1], 50.0)


def test_compress_dispatches_and_clamps(photo):
    over = photo * 1.3 - 0.1  # out of range, as after a bicubic resize
    torch.testing.assert_close(compress(over, 60.4), diff_jpeg(over.clamp(0, 1), 60.4))
    assert torch.equal(compress(photo, 60.4, "libjpeg"), jpeg(photo, 60))
    assert compress(photo, None) is photo
    with pytest.raises(ValueError, match="codec"):
        compress(photo, 50.0, "mozjpeg")


def test_default_codec_is_diffjpeg_and_libjpeg_is_an_option():
    assert DegradationConfig().jpeg_codec == "diffjpeg"
    with pytest.raises(ValueError, match="jpeg_codec"):
        DegradationConfig(jpeg_codec="pillow")
    hq = F.interpolate(torch.from_numpy(skdata.astronaut()[:256, :256].copy())
                       .permute(2, 0, 1)[None].float() / 255, size=(64, 64), mode="area")
    only_jpeg = DegradationConfig(blur=False, resize=False, noise=False, stage2=False,
                                  resize_modes=("area",))
    params = sample_params(1, only_jpeg, torch.Generator().manual_seed(0))
    quality = params[0].first.jpeg_quality
    for codec, code in (("diffjpeg", diff_jpeg), ("libjpeg", lambda x, q: jpeg(x, round(q)))):
        lq = degrade(hq, replace(only_jpeg, jpeg_codec=codec), params=params).lq
        expected = F.interpolate(code(hq, quality), size=(16, 16), mode="area")
        torch.testing.assert_close(lq, (expected.clamp(0, 1) * 255).round() / 255)
