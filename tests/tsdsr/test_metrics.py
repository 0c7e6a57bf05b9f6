"""PSNR/SSIM on Y as pyiqa computes them, checked against OSEDiff's RealSR log and scikit-image."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from examples.tsdsr.evaluation import metrics
from scoredistill.sr.imageio import load_image

REALSR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "realsr"
LOGGED_AVERAGE_PSNR = 25.1511
LOGGED_AVERAGE_SSIM = 0.7341


def _logged_scores(log_text: str) -> dict[str, tuple[float, float]]:
    pattern = r"results_osediff/(\S+) \| PSNR: ([\d.]+); SSIM: ([\d.]+)"
    return {name: (float(p), float(s)) for name, p, s in re.findall(pattern, log_text)}


def _logged_averages(log_text: str) -> tuple[float, float]:
    match = re.search(r"Average Metrics.*?\nPSNR: ([\d.]+); SSIM: ([\d.]+)", log_text, re.S)
    assert match, "no average line in the log"
    return float(match[1]), float(match[2])


def test_reproduces_osediff_realsr_log():
    """Every logged per-image PSNR/SSIM (pyiqa 0.1.13) and both logged averages."""
    if not REALSR.is_dir():
        pytest.skip(f"RealSR reference data not found at {REALSR.resolve()} (../shared/data)")
    logs = sorted((REALSR / "results_osediff" / "metrics").glob("test_METRICS_*.log"))
    assert logs, "OSEDiff metrics log missing"
    log_text = logs[0].read_text()
    logged = _logged_scores(log_text)
    assert len(logged) == 100
    assert _logged_averages(log_text) == (LOGGED_AVERAGE_PSNR, LOGGED_AVERAGE_SSIM)

    names = sorted(logged)
    psnr, ssim = [], []
    for name in names:  # one at a time: large batches are slower on a small CPU
        sr = load_image(REALSR / "results_osediff" / name).rgb[None]
        hr = load_image(REALSR / "test_HR" / name).rgb[None]
        psnr.append(metrics.psnr_y(sr, hr).item())
        ssim.append(metrics.ssim_y(sr, hr).item())

    psnr_error = np.abs(np.array(psnr) - [logged[n][0] for n in names])
    ssim_error = np.abs(np.array(ssim) - [logged[n][1] for n in names])
    worst_psnr, worst_ssim = names[psnr_error.argmax()], names[ssim_error.argmax()]
    assert psnr_error.max() <= 5e-4, f"PSNR off by {psnr_error.max():.2e} dB on {worst_psnr}"
    assert ssim_error.max() <= 5e-6, f"SSIM off by {ssim_error.max():.2e} on {worst_ssim}"
    assert round(float(np.mean(psnr)), 4) == LOGGED_AVERAGE_PSNR
    assert round(float(np.mean(ssim)), 4) == LOGGED_AVERAGE_SSIM


def _noisy_pair(seed: int, size: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hr = torch.rand(2, 3, size, size, generator=generator)
    sr = (hr + 0.1 * torch.randn(hr.shape, generator=generator)).clamp(0, 1)
    return sr, hr


def test_y_channel_spans_bt601_studio_range():
    black_white = torch.stack([torch.zeros(3, 2, 2), torch.ones(3, 2, 2)])
    y = metrics.rgb_to_y(black_white)
    assert y.shape == (2, 1, 2, 2)
    torch.testing.assert_close(y[:, 0, 0, 0], torch.tensor([16.0, 235.0]))


def test_psnr_matches_mse_definition_on_y():
    sr, hr = _noisy_pair(0)
    y_sr = metrics.rgb_to_y(sr.double()) / 255
    y_hr = metrics.rgb_to_y(hr.double()) / 255
    expected = 10 * torch.log10(1 / (y_sr - y_hr).pow(2).mean(dim=(1, 2, 3)))
    torch.testing.assert_close(metrics.psnr_y(sr, hr).double(), expected, atol=1e-3, rtol=0)


def test_psnr_of_identical_images_is_finite_80db():
    _, hr = _noisy_pair(1)
    torch.testing.assert_close(metrics.psnr_y(hr, hr), torch.full((2,), 80.0))


def test_ssim_matches_scikit_image_gaussian_ssim_on_rounded_y():
    sr, hr = _noisy_pair(2)
    ours = metrics.ssim_y(sr, hr)
    for i in range(2):
        y_sr = metrics.rgb_to_y(sr[i : i + 1]).round()[0, 0].double().numpy()
        y_hr = metrics.rgb_to_y(hr[i : i + 1]).round()[0, 0].double().numpy()
        reference = structural_similarity(
            y_sr,
            y_hr,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=255,
        )
        assert ours[i].item() == pytest.approx(reference, abs=1e-9)


def test_ssim_is_one_for_identical_and_clips_negative_structure():
    _, hr = _noisy_pair(3)
    torch.testing.assert_close(metrics.ssim_y(hr, hr), torch.ones(2, dtype=torch.float64))
    inverted = metrics.ssim_y(1 - hr, hr)
    assert (inverted >= 0).all() and (inverted < 0.05).all()


def test_batched_scores_equal_single_image_scores():
    sr, hr = _noisy_pair(4)
    for fn in (metrics.psnr_y, metrics.ssim_y):
        batched = fn(sr, hr)
        assert batched.shape == (2,)
        singles = torch.cat([fn(sr[i : i + 1], hr[i : i + 1]) for i in range(2)])
        torch.testing.assert_close(batched, singles)


def test_rejects_mismatched_or_non_rgb_inputs():
    sr, hr = _noisy_pair(5)
    with pytest.raises(ValueError, match="differ"):
        metrics.psnr_y(sr, hr[..., :-1])
    with pytest.raises(ValueError, match="B,3,H,W"):
        metrics.ssim_y(sr[:, :1], hr[:, :1])
    with pytest.raises(ValueError, match="at least 11"):
        metrics.ssim_y(sr[..., :8, :8], hr[..., :8, :8])


@pytest.mark.parametrize("name", metrics.PYIQA_METRICS)
def test_pyiqa_metrics_without_pyiqa_say_how_to_install(monkeypatch, name):
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # makes `import pyiqa` raise ImportError
    with pytest.raises(ImportError, match=r"scoredistill\[eval\]") as info:
        metrics.create_pyiqa_metric(name)
    assert "TORCH_HOME" in str(info.value) and "pretrained_model_path" in str(info.value)


def test_registry_covers_the_paper_metrics_and_rejects_others():
    assert set(metrics.METRICS) == {
        "psnr",
        "ssim",
        "lpips",
        "dists",
        "fid",
        "niqe",
        "musiq",
        "maniqa",
        "clipiqa",
        "grid",
        "seam",
    }
    with pytest.raises(ValueError, match="unknown"):
        metrics.check_metric_names(["psnr", "brisque"])
    with pytest.raises(ValueError, match="unknown pyiqa metric"):
        metrics.create_pyiqa_metric("psnr")
