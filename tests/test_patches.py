"""The natural-patch SR problem: photos, patches, pooling operator, cache, exact posterior."""

from pathlib import Path

import pytest
import torch

pytest.importorskip("skimage", reason="the natural-patch problem reads scikit-image's photos")
pytest.importorskip("safetensors", reason="fitted mixtures are cached as safetensors")

from scoredistill import patches
from scoredistill.patches import PatchSR, average_pool_operator, random_patches


def test_average_pool_operator_equals_avg_pool2d():
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    a = average_pool_operator(8, 2, 3)
    pooled = torch.nn.functional.avg_pool2d(x, 2).flatten(1)
    torch.testing.assert_close(x.flatten(1) @ a.T, pooled)
    with pytest.raises(ValueError, match="not a multiple"):
        average_pool_operator(8, 3, 1)


def test_random_patches_are_crops_of_the_photos():
    img = torch.arange(2 * 20 * 30, dtype=torch.float64).reshape(2, 20, 30)
    p = random_patches([img], 50, 8, seed=0).reshape(50, 2, 8, 8)
    for patch in p[:5]:
        y, x = divmod(int(patch[0, 0, 0]), 30)
        torch.testing.assert_close(patch, img[:, y:y + 8, x:x + 8])


def test_bundled_photos_are_read_from_disk():
    grey, colour = patches.bundled_photos(False), patches.bundled_photos(True)
    assert all(p.shape[0] == 1 for p in grey) and all(p.shape[0] == 3 for p in colour)
    assert all(float(p.min()) >= 0 and float(p.max()) <= 1 for p in grey + colour)


@pytest.mark.parametrize("colour", [False, True])
def test_problem_is_fitted_once_then_loaded_from_the_cache(tmp_path: Path, monkeypatch, colour):
    kw = dict(colour=colour, components=2, fit_patches=400, em_iters=2, cache_dir=tmp_path)
    problem = PatchSR(**kw)
    assert problem.dim == (192 if colour else 64) and problem.operator.shape[0] == problem.dim // 4
    assert len(list(tmp_path.glob("gmm-*.safetensors"))) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("fitted again instead of loading the cache")

    monkeypatch.setattr(patches, "fit_full_mixture", refuse)
    again = PatchSR(**kw)
    torch.testing.assert_close(again.prior.covs, problem.prior.covs)
    g = torch.Generator().manual_seed(0)
    hq, lq = problem.sample(16, g)
    assert hq.dtype == torch.float32 and hq.shape == (16, problem.dim)
    # LQ is the pooled HQ plus noise of the stated size.
    resid = lq - hq @ problem.operator.T
    assert 0.5 * problem.noise_std < float(resid.std()) < 1.5 * problem.noise_std
    img = problem.to_images(hq)
    assert img.shape == (16, problem.channels, 8, 8) and float(img.min()) >= 0
    # The posterior it carries is the one of its own prior and degradation.
    assert problem.posterior.prior is problem.prior
    assert torch.isfinite(problem.posterior.log_prob(hq.double(), lq.double())).all()
