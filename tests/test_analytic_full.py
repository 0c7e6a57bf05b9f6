"""FullGaussianMixture: against torch.distributions, Monte-Carlo and the isotropic class."""

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from scoredistill import (
    FullGaussianMixture,
    GaussianMixture,
    RectifiedFlow,
    ScoreModel,
    TSDLoss,
    VariancePreserving,
)
from tests.helpers import check_denoiser_against_monte_carlo

D = 3


def random_covs(k: int, d: int, g: torch.Generator) -> torch.Tensor:
    """Anisotropic SPD covariances with eigenvalues spread over two decades."""
    q = torch.linalg.qr(torch.randn(k, d, d, generator=g, dtype=torch.float64))[0]
    lam = 10 ** (-2 * torch.rand(k, d, generator=g, dtype=torch.float64))
    return q @ torch.diag_embed(lam) @ q.transpose(1, 2)


def mixture(schedule=None, prediction="flow", seed=0) -> FullGaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = 1.5 * torch.randn(3, D, generator=g, dtype=torch.float64)
    return FullGaussianMixture(means, random_covs(3, D, g),
                               torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
                               schedule=schedule or RectifiedFlow(), prediction=prediction)


def reference(gm: FullGaussianMixture, alpha: float, sigma: float) -> MixtureSameFamily:
    """The noisy marginal written out: N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I) per component."""
    cov = alpha**2 * gm.covs + sigma**2 * torch.eye(gm.dim, dtype=gm.covs.dtype)
    return MixtureSameFamily(Categorical(gm.weights), MultivariateNormal(alpha * gm.means, cov))


@pytest.mark.parametrize(("alpha", "sigma"), [(1.0, 0.0), (0.8, 0.2), (0.3, 0.9)])
def test_log_prob_and_score_match_torch_distributions(alpha, sigma):
    gm = mixture()
    g = torch.Generator().manual_seed(1)
    x = 2 * torch.randn(64, D, generator=g, dtype=torch.float64).requires_grad_()
    ref = reference(gm, alpha, sigma).log_prob(x)
    a, s = torch.full((64,), alpha, dtype=torch.float64), torch.full((64,), sigma,
                                                                      dtype=torch.float64)
    torch.testing.assert_close(gm.log_prob(x.detach(), a, s), ref.detach())
    if sigma > 0:
        grad = torch.autograd.grad(ref.sum(), x)[0]
        torch.testing.assert_close(gm.score(x.detach(), a, s), grad)


@pytest.mark.parametrize(("schedule", "prediction"), [
    (RectifiedFlow(), "flow"), (VariancePreserving(), "epsilon"), (VariancePreserving(), "v")])
@pytest.mark.parametrize("index", [100, 500, 900])
def test_denoiser_matches_monte_carlo_posterior_mean(schedule, prediction, index):
    """E[x0 | x_t] by self-normalised importance sampling from the prior."""
    check_denoiser_against_monte_carlo(mixture(schedule, prediction), schedule, prediction,
                                       index, D)


def test_isotropic_covariances_equal_the_isotropic_class():
    g = torch.Generator().manual_seed(3)
    means = torch.randn(4, 5, generator=g, dtype=torch.float64)
    stds = torch.tensor([0.2, 0.5, 1.0, 0.7], dtype=torch.float64)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    iso = GaussianMixture(means, stds, weights, prediction="epsilon")
    covs = stds[:, None, None] ** 2 * torch.eye(5, dtype=torch.float64)
    full = FullGaussianMixture(means, covs, weights, prediction="epsilon")
    x = torch.randn(32, 5, generator=g, dtype=torch.float64)
    t = torch.linspace(10, 990, 32)
    torch.testing.assert_close(full(x, t), iso(x, t))
    torch.testing.assert_close(full.log_prob(x), iso.log_prob(x))


def test_samples_have_the_mixture_moments():
    gm = mixture()
    x = gm.sample(400_000, torch.Generator().manual_seed(4))
    mean = gm.weights @ gm.means
    second = (gm.weights[:, None, None] * (gm.covs + gm.means[:, :, None] * gm.means[:, None])
              ).sum(0)
    torch.testing.assert_close(x.mean(0), mean, atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), second - torch.outer(mean, mean), atol=0.02,
                               rtol=0)


def test_is_a_score_model_every_loss_accepts():
    gm = mixture()
    assert isinstance(gm, ScoreModel)
    g = torch.Generator().manual_seed(5)
    z, z_hat = gm.sample(8, g).float(), gm.sample(8, g).float().requires_grad_()
    teacher = FullGaussianMixture(gm.means.float(), gm.covs.float(), gm.weights.float())
    out = TSDLoss()(z_hat, teacher=teacher, fake=teacher, z=z, generator=g)
    out.loss.backward()
    assert torch.isfinite(z_hat.grad).all() and z_hat.grad.abs().sum() > 0


def test_bad_parameters_are_rejected():
    eye = torch.eye(2).expand(2, 2, 2)
    w = torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match="expected means"):
        FullGaussianMixture(torch.zeros(2, 2), torch.eye(3).expand(2, 3, 3), w)
    with pytest.raises(ValueError, match="sum to 1"):
        FullGaussianMixture(torch.zeros(2, 2), eye, torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="mixture weights must be finite and >= 0"):
        FullGaussianMixture(torch.zeros(2, 2), eye, torch.tensor([1.5, -0.5]))
    with pytest.raises(ValueError, match="symmetric"):
        FullGaussianMixture(torch.zeros(2, 2), eye + torch.tensor([[0.0, 0.5], [0.0, 0.0]]), w)
    with pytest.raises(ValueError, match="covariance 1 is not positive definite"):
        FullGaussianMixture(torch.zeros(2, 2), torch.stack([eye[0], -eye[0]]), w)
    with pytest.raises(ValueError, match="3 features"):
        FullGaussianMixture(torch.zeros(2, 2), eye, w).denoise(
            torch.zeros(1, 3), torch.ones(1), torch.ones(1))
