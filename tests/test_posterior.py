"""LinearGaussianPosterior: Bayes' rule, the exact denoiser, Monte-Carlo."""

import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from scoredistill.posterior import LinearGaussianPosterior
from tests.test_analytic_full import mixture

F64 = torch.float64


def problem(seed=0):
    gm = mixture(seed=seed)
    operator = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.3, 1.0]], dtype=F64)
    return gm, LinearGaussianPosterior(gm, operator, 0.2)


def test_log_prob_is_bayes_rule():
    """log p(x | y) = log p(x) + log N(y; A x, s^2 I) - log p(y), with p(y) written out."""
    gm, post = problem()
    g = torch.Generator().manual_seed(1)
    x = gm.sample(64, g)
    y = x @ post.operator.T + 0.2 * torch.randn(64, 2, generator=g, dtype=F64)
    s_lq = post.operator @ gm.covs @ post.operator.T + 0.04 * torch.eye(2, dtype=F64)
    p_y = MixtureSameFamily(Categorical(gm.weights),
                            MultivariateNormal(gm.means @ post.operator.T, s_lq))
    torch.testing.assert_close(post.log_marginal(y), p_y.log_prob(y))
    lik = MultivariateNormal(x @ post.operator.T, 0.04 * torch.eye(2, dtype=F64)).log_prob(y)
    torch.testing.assert_close(post.log_prob(x, y), gm.log_prob(x) + lik - p_y.log_prob(y))


def test_scaled_identity_operator_gives_the_exact_denoiser():
    gm = mixture()
    g = torch.Generator().manual_seed(2)
    for alpha, sigma in ((0.9, 0.1), (0.5, 0.5), (0.1, 0.9)):
        post = LinearGaussianPosterior(gm, alpha * torch.eye(3, dtype=F64), sigma)
        x_t = alpha * gm.sample(32, g) + sigma * torch.randn(32, 3, generator=g, dtype=F64)
        a, s = torch.full((32,), alpha, dtype=F64), torch.full((32,), sigma, dtype=F64)
        torch.testing.assert_close(post.mean(x_t), gm.denoise(x_t, a, s))


def test_mean_samples_and_spread_match_monte_carlo():
    gm, post = problem()
    g = torch.Generator().manual_seed(3)
    y = post.operator @ gm.sample(1, g)[0] + 0.2 * torch.randn(2, generator=g, dtype=F64)
    # Self-normalised importance sampling from the prior.
    prior = gm.sample(400_000, g)
    logw = -0.5 * (y - prior @ post.operator.T).square().sum(1) / 0.04
    w = (logw - logw.max()).exp()
    mc = (w[:, None] * prior).sum(0) / w.sum()
    ess = float(w.sum() ** 2 / w.square().sum())
    exact = post.mean(y[None])[0]
    assert (mc - exact).abs().max() < 6 * prior.std(0).max() / ess**0.5, (mc, exact, ess)
    # Exact posterior samples: their mean and total variance.
    samples = post.sample(y.expand(200_000, 2), g)
    torch.testing.assert_close(samples.mean(0), exact, atol=0.01, rtol=0)
    spread = (samples - exact).square().sum(1).mean()
    torch.testing.assert_close(spread, post.expected_sq_dev(y[None])[0], atol=0.01, rtol=0.01)
