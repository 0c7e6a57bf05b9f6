"""EM for full-covariance mixtures recovers a known mixture."""

import pytest
import torch

from scoredistill.em import fit_full_mixture
from tests.test_analytic_full import mixture


def test_em_recovers_a_known_mixture():
    truth = mixture(seed=7)
    x = truth.sample(30_000, torch.Generator().manual_seed(0))
    fit = fit_full_mixture(x, 3, iters=60, reg=1e-6, chunk=4096, progress=False)
    # Match components by their means (the order is arbitrary).
    order = torch.cdist(truth.means, fit.means).argmin(1)
    assert sorted(order.tolist()) == [0, 1, 2]
    torch.testing.assert_close(fit.weights[order], truth.weights, atol=0.02, rtol=0)
    torch.testing.assert_close(fit.means[order], truth.means, atol=0.05, rtol=0)
    torch.testing.assert_close(fit.covs[order], truth.covs, atol=0.05, rtol=0)
    # And its likelihood on held-out data is the truth's, to sampling error.
    held = truth.sample(20_000, torch.Generator().manual_seed(1))
    assert abs(float(fit.log_prob(held).mean() - truth.log_prob(held).mean())) < 0.02


def test_em_rejects_too_few_points():
    with pytest.raises(ValueError, match="N >= components=4"):
        fit_full_mixture(torch.zeros(3, 2), 4)
