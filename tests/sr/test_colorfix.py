"""Wavelet and AdaIN colour alignment (StableSR) of the TSD-SR example."""

import math

import pytest
import torch

from scoredistill.sr.colorfix import (
    COLOR_FIXES,
    adain_color_fix,
    color_fix,
    wavelet_color_fix,
    wavelet_decompose,
)

SIZE = 128


def _smooth_image(seed: int) -> torch.Tensor:
    """Low-frequency content only: a bilinearly upsampled 4x4 random image (1,3,SIZE,SIZE)."""
    coarse = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(SIZE, SIZE), mode="bicubic")


def _checkerboard(amplitude: float) -> torch.Tensor:
    """Pixel-level detail, the highest frequency an image can hold (1,1,SIZE,SIZE)."""
    idx = torch.arange(SIZE)
    return amplitude * ((idx[:, None] + idx[None, :]) % 2 * 2 - 1).float()[None, None]


def test_wavelet_removes_colour_shift_and_keeps_detail():
    lq = _smooth_image(0)
    detail = _checkerboard(0.05)
    shift = torch.tensor([0.1, -0.05, 0.08]).view(1, 3, 1, 1)
    sr = lq + detail + shift
    fixed = wavelet_color_fix(sr, lq)
    # Replicated edges break the checkerboard's alternation, leaking some of it into the low
    # band at the border; judge the interior.
    inner = (..., slice(32, -32), slice(32, -32))
    torch.testing.assert_close(fixed[inner], (lq + detail)[inner], atol=1e-5, rtol=0)


def test_wavelet_decomposition_is_exact_and_low_part_is_smooth():
    image = torch.rand(2, 3, 40, 50, generator=torch.Generator().manual_seed(1))
    high, low = wavelet_decompose(image)
    torch.testing.assert_close(high + low, image)
    # Five a trous levels blur far more than the input's pixel noise.
    assert low.diff(dim=-1).abs().mean() < 0.1 * image.diff(dim=-1).abs().mean()


def test_wavelet_of_constant_image_is_all_low_frequency():
    image = torch.full((1, 3, 20, 20), 0.3)
    high, low = wavelet_decompose(image)
    torch.testing.assert_close(low, image)
    assert high.abs().max() < 1e-6


def test_adain_gives_output_the_inputs_channel_statistics():
    generator = torch.Generator().manual_seed(2)
    sr = torch.rand(2, 3, 32, 32, generator=generator) * 0.5 + 0.4
    lq = torch.rand(2, 3, 32, 32, generator=generator) * 0.3
    fixed = adain_color_fix(sr, lq)
    torch.testing.assert_close(fixed.mean(dim=(2, 3)), lq.mean(dim=(2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(fixed.std(dim=(2, 3)), lq.std(dim=(2, 3)), atol=1e-3, rtol=0)


def test_adain_keeps_the_outputs_normalised_structure():
    generator = torch.Generator().manual_seed(3)
    sr = torch.rand(1, 3, 16, 16, generator=generator)
    lq = sr * 0.5 + 0.2  # same structure, different contrast and brightness
    torch.testing.assert_close(adain_color_fix(sr, lq), lq, atol=1e-3, rtol=0)


def test_none_is_identity():
    sr, lq = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    assert color_fix(sr, lq, "none") is sr


@pytest.mark.parametrize("method", sorted(COLOR_FIXES))
def test_methods_preserve_shape_and_need_matching_sizes(method):
    sr, lq = torch.rand(2, 3, 24, 20), torch.rand(2, 3, 24, 20)
    out = color_fix(sr, lq, method)
    assert out.shape == sr.shape and not out.isnan().any()
    with pytest.raises(ValueError, match="upsample the input"):
        color_fix(sr, lq[..., :12, :10], method)


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="wavelet"):
        color_fix(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), "histogram")


def test_wavelet_handles_images_smaller_than_the_widest_dilation():
    sr, lq = torch.rand(1, 3, 5, 7), torch.rand(1, 3, 5, 7)
    out = wavelet_color_fix(sr, lq)
    assert out.shape == sr.shape and math.isfinite(out.sum().item())
