"""Blur kernels of the Real-ESRGAN degradation (Wang et al., ICCVW 2021)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from examples.tsdsr.data import (
    KernelConfig,
    filter2d,
    gaussian_kernel,
    generalized_gaussian_kernel,
    pad_kernel,
    plateau_kernel,
    random_beta,
    random_kernel,
    random_sinc_kernel,
    sinc_kernel,
    trim_kernel,
)
from examples.tsdsr.data.kernels import choice

sizes = st.sampled_from([7, 9, 11, 13, 15, 17, 19, 21])
sigmas = st.floats(0.2, 3.0)
thetas = st.floats(-math.pi, math.pi)


def _explicit(size, value):
    """Kernel from value(x, y) on the centred grid, normalised, by plain Python loops."""
    half = size // 2
    rows = [[value(x, y) for x in range(-half, half + 1)] for y in range(-half, half + 1)]
    total = sum(map(sum, rows))
    return torch.tensor(rows, dtype=torch.float64) / total


def _q(x, y, sx, sy, theta):
    u = math.cos(theta) * x + math.sin(theta) * y
    v = -math.sin(theta) * x + math.cos(theta) * y
    return (u / sx) ** 2 + (v / sy) ** 2


@settings(max_examples=40, deadline=None)
@given(size=sizes, sx=sigmas, sy=sigmas, theta=thetas, beta=st.floats(0.5, 4.0))
def test_kernels_sum_to_one_and_are_point_symmetric(size, sx, sy, theta, beta):
    for kernel in (
        gaussian_kernel(size, sx, sy, theta),
        generalized_gaussian_kernel(size, sx, sy, theta, beta),
        plateau_kernel(size, sx, sy, theta, beta),
        sinc_kernel(size, sx),  # sigma range doubles as a cutoff range inside (0, pi]
    ):
        assert kernel.shape == (size, size)
        assert kernel.sum().item() == pytest.approx(1.0, abs=1e-12)
        torch.testing.assert_close(kernel, kernel.flip(0, 1), rtol=0, atol=1e-15)


@settings(max_examples=20, deadline=None)
@given(size=sizes, sigma=sigmas, beta=st.floats(0.5, 4.0), cutoff=st.floats(0.3, math.pi))
def test_isotropic_kernels_have_the_square_symmetries(size, sigma, beta, cutoff):
    for kernel in (
        gaussian_kernel(size, sigma),
        generalized_gaussian_kernel(size, sigma, sigma, 0.0, beta),
        plateau_kernel(size, sigma, sigma, 0.0, beta),
        sinc_kernel(size, cutoff),
    ):
        torch.testing.assert_close(kernel, kernel.T, rtol=0, atol=1e-15)
        torch.testing.assert_close(kernel, kernel.flip(0), rtol=0, atol=1e-15)


def test_gaussian_matches_formula():
    sx, sy, theta = 1.3, 0.6, 0.4
    expected = _explicit(7, lambda x, y: math.exp(-0.5 * _q(x, y, sx, sy, theta)))
    torch.testing.assert_close(gaussian_kernel(7, sx, sy, theta), expected)
    iso = _explicit(5, lambda x, y: math.exp(-(x * x + y * y) / (2 * 0.8**2)))
    torch.testing.assert_close(gaussian_kernel(5, 0.8), iso)


def test_anisotropic_axes_follow_theta():
    wide = gaussian_kernel(9, 2.5, 0.5, 0.0)
    assert wide[4, 0] > wide[0, 4]  # elongated along x (columns) at theta = 0
    torch.testing.assert_close(gaussian_kernel(9, 2.5, 0.5, math.pi / 2), wide.T)


def test_generalized_gaussian_matches_formula():
    sx, sy, theta, beta = 1.1, 2.0, -0.7, 2.5
    expected = _explicit(7, lambda x, y: math.exp(-0.5 * _q(x, y, sx, sy, theta) ** beta))
    torch.testing.assert_close(generalized_gaussian_kernel(7, sx, sy, theta, beta), expected)
    torch.testing.assert_close(
        generalized_gaussian_kernel(7, sx, sy, theta, 1.0), gaussian_kernel(7, sx, sy, theta)
    )


def test_plateau_matches_formula():
    sx, sy, theta, beta = 1.5, 0.9, 1.0, 1.5
    expected = _explicit(9, lambda x, y: 1 / (1 + _q(x, y, sx, sy, theta) ** beta))
    torch.testing.assert_close(plateau_kernel(9, sx, sy, theta, beta), expected)


def test_sinc_matches_bessel_formula():
    special = pytest.importorskip("scipy.special")
    cutoff = 1.7

    def value(x, y):
        r = math.hypot(x, y)
        if r == 0:
            return cutoff**2 / (4 * math.pi)
        return cutoff * float(special.j1(cutoff * r)) / (2 * math.pi * r)

    torch.testing.assert_close(sinc_kernel(11, cutoff), _explicit(11, value))


@pytest.mark.parametrize("cutoff", [math.pi / 5, math.pi / 3, math.pi / 2, 2.0])
def test_sinc_passes_below_and_stops_above_its_cutoff(cutoff):
    n = 256
    response = torch.fft.fft2(sinc_kernel(21, cutoff), s=(n, n)).abs()
    freq = torch.fft.fftfreq(n, dtype=torch.float64) * 2 * math.pi  # rad / pixel
    radius = torch.sqrt(freq[:, None] ** 2 + freq[None, :] ** 2)
    assert response[(radius > 1.5 * cutoff) & (radius < math.pi)].max() < 0.12
    if cutoff > 1.0:  # a 21-tap window truncates lower cutoffs' main lobe: ripple, on purpose
        assert (response[radius < 0.6 * cutoff] - 1).abs().max() < 0.2


def test_pad_kernel_keeps_centre_and_sum():
    kernel = gaussian_kernel(7, 1.0)
    padded = pad_kernel(kernel, 21)
    assert padded.shape == (21, 21)
    torch.testing.assert_close(padded[7:14, 7:14], kernel)
    assert padded.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="cannot pad"):
        pad_kernel(kernel, 8)
    with pytest.raises(ValueError, match="odd"):
        gaussian_kernel(8, 1.0)


def _forced(kind_index, **overrides):
    probs = [0.0] * 6
    probs[kind_index] = 1.0
    fields = dict(type_probs=tuple(probs), sinc_prob=0.0, sizes=(9,), sigma_range=(1.2, 1.2))
    return KernelConfig(**{**fields, **overrides})


def test_random_kernel_forced_types_match_the_closed_forms():
    g = torch.Generator().manual_seed(0)
    iso = random_kernel(g, _forced(0))
    torch.testing.assert_close(iso, pad_kernel(gaussian_kernel(9, 1.2), 21))
    # Equal sigmas make the rotation irrelevant, so the anisotropic draw is known too.
    torch.testing.assert_close(random_kernel(g, _forced(1)), iso)
    # A range [1, 1] pins beta: basicsr draws U(low, 1) or U(1, high), both 1 here.
    generalized = random_kernel(g, _forced(2, generalized_beta_range=(1.0, 1.0)))
    expected = generalized_gaussian_kernel(9, 1.2, 1.2, 0.0, 1.0)
    torch.testing.assert_close(generalized, pad_kernel(expected, 21))
    plateau = random_kernel(g, _forced(4, plateau_beta_range=(1.0, 1.0)))
    torch.testing.assert_close(plateau, pad_kernel(plateau_kernel(9, 1.2, 1.2, 0.0, 1.0), 21))
    sinc = random_kernel(g, _forced(0, sinc_prob=1.0, sinc_cutoff_small=(1.0, 1.0)))
    torch.testing.assert_close(sinc, pad_kernel(sinc_kernel(9, 1.0), 21))


def test_random_kernel_anisotropic_draws_are_not_isotropic():
    g = torch.Generator().manual_seed(1)
    config = _forced(1, sigma_range=(0.5, 3.0), sizes=(21,))
    kernels = [random_kernel(g, config) for _ in range(10)]
    assert any(not torch.allclose(k, k.T, atol=1e-6) for k in kernels)


def test_sinc_cutoff_range_depends_on_kernel_size():
    # Small kernels must not get the low cutoffs (pi/5) only large ones can represent.
    config = KernelConfig(sizes=(7,), sinc_cutoff_small=(2.0, 2.0), sinc_cutoff_large=(0.7, 0.7))
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(
        random_sinc_kernel(g, config, cutoff=None), pad_kernel(sinc_kernel(7, 2.0), 21)
    )
    large = KernelConfig(**{**config.__dict__, "sizes": (13,)})
    torch.testing.assert_close(
        random_sinc_kernel(g, large, cutoff=None), pad_kernel(sinc_kernel(13, 0.7), 21)
    )


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_random_kernel_is_a_padded_normalised_seeded_draw(seed):
    config = KernelConfig()
    kernel = random_kernel(torch.Generator().manual_seed(seed), config)
    again = random_kernel(torch.Generator().manual_seed(seed), config)
    assert kernel.shape == (21, 21)
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(kernel, kernel.flip(0, 1), rtol=0, atol=1e-15)
    assert torch.equal(kernel, again)


def test_choice_follows_the_probabilities():
    g = torch.Generator().manual_seed(0)
    probs = KernelConfig().type_probs
    counts = torch.bincount(torch.tensor([choice(g, probs) for _ in range(4000)]), minlength=6)
    torch.testing.assert_close(counts / 4000, torch.tensor(probs), rtol=0, atol=0.03)


def test_different_seeds_draw_different_kernels():
    config = KernelConfig()
    kernels = [random_kernel(torch.Generator().manual_seed(s), config) for s in range(5)]
    assert len({k.numpy().tobytes() for k in kernels}) == 5


def test_filter2d_batches_per_sample_kernels():
    x = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    kernels = torch.stack([gaussian_kernel(7, 1.0), gaussian_kernel(7, 2.0, 0.5, 0.3)])
    out = filter2d(x, kernels)
    for i in range(2):
        padded = F.pad(x[i : i + 1], (3, 3, 3, 3), mode="reflect")
        weight = kernels[i].float().expand(3, 1, 7, 7)
        torch.testing.assert_close(out[i : i + 1], F.conv2d(padded, weight, groups=3))
    tiny = filter2d(torch.rand(1, 3, 5, 5), gaussian_kernel(21, 1.0)[None])
    assert tiny.shape == (1, 3, 5, 5)


def test_trimming_zero_rings_keeps_the_filter():
    kernel = gaussian_kernel(7, 1.5, 0.7, 0.5)
    padded = pad_kernel(kernel, 21)
    assert torch.equal(trim_kernel(padded), kernel)
    x = torch.rand(2, 3, 30, 30, generator=torch.Generator().manual_seed(0))
    full = filter2d(x, padded.expand(2, 21, 21))
    torch.testing.assert_close(filter2d(x, trim_kernel(padded).expand(2, 7, 7)), full)


@pytest.mark.parametrize("beta_range", [(1.0, 2.0), (0.5, 4.0)])
def test_beta_follows_basicsrs_fifty_fifty_rule(beta_range):
    # basicsr's random_bivariate_{generalized_Gaussian,plateau}: with probability 1/2
    # U(low, 1), else U(1, high), whatever the range: for the plateau range [1, 2] half the
    # draws are beta = 1 exactly, the other half uniform on [1, 2].
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    low, high = beta_range
    betas = torch.tensor([random_beta(g, beta_range) for _ in range(4000)], dtype=torch.float64)
    below = betas[betas < 1] if low < 1 else betas[betas == 1]
    above = betas[betas > 1]
    assert len(below) + len(above) == len(betas)
    assert abs(len(below) / len(betas) - 0.5) < 0.03  # binomial sd 0.008
    assert stats.kstest(above.numpy(), "uniform", args=(1.0, high - 1.0)).pvalue > 1e-3
    if low < 1:
        assert stats.kstest(below.numpy(), "uniform", args=(low, 1.0 - low)).pvalue > 1e-3
