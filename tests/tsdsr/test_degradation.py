"""Real-ESRGAN second-order degradation pipeline (Wang et al., ICCVW 2021)."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage import data as skdata

from examples.tsdsr.data import (
    DegradationConfig,
    NoiseParams,
    add_noise,
    degrade,
    filter2d,
    jpeg,
    quantise,
    sample_params,
    upsample_lq,
    usm_sharpen,
)

ALL_OFF = DegradationConfig(blur=False, resize=False, noise=False, jpeg=False, stage2=False)
SWITCHES = ("blur", "resize", "noise", "jpeg")


@pytest.fixture(scope="module")
def hq() -> torch.Tensor:
    """(3,3,128,128): three different crops of natural images, downsampled from 512."""
    crops = [skdata.astronaut()[:512, :512], skdata.coffee()[:, :512], skdata.chelsea()[:, :]]
    tensors = [torch.from_numpy(c[:256, :256].copy()).permute(2, 0, 1) for c in crops]
    batch = torch.stack(tensors).float() / 255
    return F.interpolate(batch, size=(128, 128), mode="area")


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _on_8bit_levels(x: torch.Tensor) -> bool:
    # Exact on CPU; CUDA divides by 255 through a reciprocal, which can be off by one ulp.
    return bool(((x * 255) - (x * 255).round()).abs().max() < 1e-3)


def test_same_seed_same_output_different_seed_different(hq):
    first = degrade(hq, generator=_seeded(7)).lq
    assert torch.equal(first, degrade(hq, generator=_seeded(7)).lq)
    assert not torch.equal(first, degrade(hq, generator=_seeded(8)).lq)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31), size=st.sampled_from([(96, 128), (128, 96), (128, 128)]))
def test_output_is_quarter_size_in_range_on_8bit_levels(hq, seed, size):
    lq = degrade(hq[..., : size[0], : size[1]], generator=_seeded(seed)).lq
    assert lq.shape == (3, 3, size[0] // 4, size[1] // 4)
    assert lq.dtype == hq.dtype
    assert lq.min() >= 0 and lq.max() <= 1
    assert _on_8bit_levels(lq)


@pytest.mark.parametrize("mode", ["bicubic", "area", "bilinear"])
def test_all_stages_off_is_a_plain_downsample(hq, mode):
    config = replace(ALL_OFF, resize_modes=(mode,))
    lq = degrade(hq, config, _seeded(0)).lq
    expected = quantise(F.interpolate(hq, size=(32, 32), mode=mode))
    assert torch.equal(lq, expected)


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_switch_alone_changes_the_output_and_only_its_parameters(hq, switch):
    config = replace(ALL_OFF, resize_modes=("area",), stage2=True, **{switch: True})
    params = sample_params(3, config, _seeded(3))
    for p in params:
        stage_fields = {
            "blur": p.first.kernel,
            "resize": p.first.resize,
            "noise": p.first.noise,
            "jpeg": p.first.jpeg_quality,
        }
        assert {k for k, v in stage_fields.items() if v is not None} == {switch}
        assert p.second is not None
    plain = degrade(hq, replace(ALL_OFF, resize_modes=("area",)), _seeded(3)).lq
    lq = degrade(hq, config, _seeded(3), params=params).lq
    assert not torch.equal(lq, plain)


def test_stage2_switch_removes_the_second_order(hq):
    params = sample_params(4, replace(DegradationConfig(), stage2=False), _seeded(0))
    assert all(p.second is None for p in params)
    assert all(p.second is not None for p in sample_params(4, DegradationConfig(), _seeded(0)))


def test_blur_only_equals_explicit_filtering(hq):
    # A first-order blur probability below 1 mixes blurred and unblurred samples in one batch.
    config = replace(ALL_OFF, blur=True, resize_modes=("bicubic",))
    config = replace(config, first=replace(config.first, blur_prob=0.5))
    batch = hq.repeat(2, 1, 1, 1)
    params = sample_params(6, config, _seeded(5))
    assert {p.first.kernel is None for p in params} == {True, False}
    lq = degrade(batch, config, params=params).lq
    expected = []
    for i, p in enumerate(params):
        x = batch[i : i + 1]
        if p.first.kernel is not None:
            x = filter2d(x, p.first.kernel[None])
        x = F.interpolate(x, size=(32, 32), mode="bicubic")
        if p.sinc is not None:
            x = filter2d(x, p.sinc[None])
        expected.append(quantise(x))
    torch.testing.assert_close(lq, torch.cat(expected), rtol=0, atol=1e-6)


def test_jpeg_stage_changes_the_image_within_its_quality_range(hq):
    config = replace(ALL_OFF, jpeg=True, resize_modes=("area",))
    params = sample_params(200, config, _seeded(0))
    qualities = torch.tensor([p.first.jpeg_quality for p in params])
    # Real-ESRGAN draws a float quality, uniform on [30, 95].
    assert 30 <= qualities.min() < 31 and 94 < qualities.max() <= 95
    assert len(set(qualities.tolist())) == 200
    for codec in ("diffjpeg", "libjpeg"):
        coded = replace(config, jpeg_codec=codec)
        lq = degrade(hq, coded, _seeded(0)).lq
        assert not torch.equal(lq, degrade(hq, replace(coded, jpeg=False), _seeded(0)).lq)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision's codec, 0.29 on
@pytest.mark.parametrize("quality", [30, 57, 95])
def test_jpeg_matches_torchvisions_libjpeg(hq, quality):
    from torchvision.io import decode_jpeg, encode_jpeg

    compressed = jpeg(hq, quality)
    assert compressed.shape == hq.shape and _on_8bit_levels(compressed)
    for i in range(hq.shape[0]):
        as_uint8 = (hq[i] * 255).round().to(torch.uint8)
        expected = decode_jpeg(encode_jpeg(as_uint8, quality=quality)).float() / 255
        assert torch.equal(compressed[i], expected)


def test_lower_jpeg_quality_loses_more(hq):
    image = hq[:1]
    low = (jpeg(image, 30) - image).abs().mean()
    high = (jpeg(image, 95) - image).abs().mean()
    assert low > high > 0
    assert jpeg(image, None) is image


def test_batch_samples_get_their_own_parameters(hq):
    same = hq[:1].expand(3, -1, -1, -1)
    params = sample_params(3, DegradationConfig(), _seeded(11))
    kernels = {p.first.kernel.numpy().tobytes() for p in params}
    assert len(kernels) == 3
    assert len({p.first.resize for p in params}) == 3
    lq = degrade(same, generator=_seeded(11)).lq
    assert not torch.equal(lq[0], lq[1]) and not torch.equal(lq[1], lq[2])


def test_params_length_must_match_the_batch(hq):
    with pytest.raises(ValueError, match="parameter sets"):
        degrade(hq, params=sample_params(2, DegradationConfig(), _seeded(0)))


@pytest.mark.parametrize(
    "bad", [torch.zeros(3, 64, 64), torch.zeros(1, 1, 64, 64), torch.zeros(1, 3, 66, 64)]
)
def test_bad_inputs_are_rejected(bad):
    with pytest.raises(ValueError):
        degrade(bad)


def test_gaussian_noise_level_and_grey_noise():
    flat = torch.full((1, 3, 128, 128), 0.5)
    colour = add_noise(flat, NoiseParams(gaussian=True, level=10.0, grey=False), _seeded(0))
    assert (colour - flat).std().item() == pytest.approx(10 / 255, rel=0.05)
    assert not torch.equal(colour[:, 0], colour[:, 1])
    grey = add_noise(flat, NoiseParams(gaussian=True, level=10.0, grey=True), _seeded(0))
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])


def test_poisson_noise_is_unbiased_and_scales():
    ramp = torch.linspace(0.2, 0.8, 256).repeat(3, 256, 1)[None]
    small = add_noise(ramp, NoiseParams(gaussian=False, level=0.5, grey=False), _seeded(0))
    large = add_noise(ramp, NoiseParams(gaussian=False, level=3.0, grey=True), _seeded(0))
    assert (small - ramp).mean().abs() < 2e-3
    assert (large - ramp).std() > 4 * (small - ramp).std()
    assert torch.equal(large[:, 0], large[:, 2])
    assert add_noise(ramp, None, _seeded(0)) is ramp


def test_usm_sharpen_is_flat_on_flat_images_and_steepens_edges():
    flat = torch.full((1, 3, 64, 64), 0.4)
    torch.testing.assert_close(usm_sharpen(flat), flat)
    edge = torch.zeros(1, 3, 64, 64)
    edge[..., 32:] = 0.8
    edge = F.avg_pool2d(F.pad(edge, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    sharp = usm_sharpen(edge)
    assert (sharp[..., 33] - sharp[..., 30]).mean() > (edge[..., 33] - edge[..., 30]).mean()
    assert sharp.min() >= 0 and sharp.max() <= 1


def _basicsr_usm(x: torch.Tensor, weight: float = 0.5, threshold: float = 10) -> torch.Tensor:
    # basicsr's USMSharp(radius=50): radius 50 is even, so the kernel is 51 px, built by
    # cv2.getGaussianKernel(51, 0), whose sigma for ksize > 7 is 0.3 ((k - 1) / 2 - 1) + 0.8 = 8;
    # filter2D pads by reflection; the mask is blurred by the same kernel.
    size, sigma = 51, 8.0
    axis = torch.arange(size, dtype=torch.float64) - size // 2
    line = torch.exp(-(axis**2) / (2 * sigma**2))
    line = line / line.sum()
    kernel = torch.outer(line, line).to(x)[None, None].repeat(3, 1, 1, 1)

    def blur(t):
        return F.conv2d(F.pad(t, (25,) * 4, mode="reflect"), kernel, groups=3)

    residual = x - blur(x)
    soft_mask = blur((residual.abs() * 255 > threshold).to(x))
    sharp = (x + weight * residual).clamp(0, 1)
    return soft_mask * sharp + (1 - soft_mask) * x


def test_usm_sharpen_equals_basicsrs_usmsharp(hq):
    x = hq.double()
    torch.testing.assert_close(usm_sharpen(x), _basicsr_usm(x), rtol=0, atol=1e-12)


def test_usm_option_returns_the_sharpened_target(hq):
    config = replace(ALL_OFF, usm_sharpen_hq=True)
    pair = degrade(hq, config, _seeded(0))
    torch.testing.assert_close(pair.hq, usm_sharpen(hq))
    assert degrade(hq, generator=_seeded(0)).hq is hq


def test_upsample_lq_restores_the_hq_size(hq):
    lq = degrade(hq, generator=_seeded(0)).lq
    up = upsample_lq(lq)
    assert up.shape == hq.shape
    assert up.min() >= 0 and up.max() <= 1
    torch.testing.assert_close(up, F.interpolate(lq, scale_factor=4, mode="bicubic").clamp(0, 1))
    assert upsample_lq(lq, size=(100, 120)).shape[-2:] == (100, 120)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_with_a_cuda_generator(hq):
    g = torch.Generator(device="cuda").manual_seed(0)
    lq = degrade(hq.cuda(), generator=g).lq
    assert lq.is_cuda and lq.shape == (3, 3, 32, 32) and _on_8bit_levels(lq)
