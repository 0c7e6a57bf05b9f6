"""LinearGaussianPosterior: Bayes' rule, the exact denoiser, Monte-Carlo; PosteriorTeacher."""

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from scoredistill import FullGaussianMixture, RectifiedFlow, VariancePreserving
from scoredistill.parametrization import to_x0_eps
from scoredistill.posterior import LinearGaussianPosterior, PosteriorTeacher, lq_condition
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


def joint_reference(gm, post, x_t, y, alpha, sigma):
    """E[x0 | x_t, y] by conditioning on both observations at once: whitened, they are one
    linear observation ``[x_t / sigma; y / s] = [alpha / sigma I; A / s] x0 + N(0, I)``."""
    op = torch.cat([alpha / sigma * torch.eye(gm.dim, dtype=F64), post.operator / post.noise_std])
    joint = LinearGaussianPosterior(gm, op, 1.0)
    return joint.mean(torch.cat([x_t / sigma, y / post.noise_std])[None])[0]


@pytest.mark.parametrize("schedule", [RectifiedFlow(), VariancePreserving()],
                         ids=["flow", "vp"])
def test_posterior_teacher_conditions_on_x_t_and_y_jointly(schedule):
    gm, post = problem()
    teacher = PosteriorTeacher(post, schedule=schedule, prediction="x0")
    g = torch.Generator().manual_seed(4)
    x0 = gm.sample(4, g)
    y = x0 @ post.operator.T + 0.2 * torch.randn(4, 2, generator=g, dtype=F64)
    t = schedule.timesteps(torch.tensor([50, 300, 600, 950]))
    alpha, sigma = schedule.alpha_sigma(t)
    x_t = alpha[:, None] * x0 + sigma[:, None] * torch.randn(4, 3, generator=g, dtype=F64)
    got = teacher(x_t, t, lq_condition(y))
    for b in range(4):
        want = joint_reference(gm, post, x_t[b], y[b], float(alpha[b]), float(sigma[b]))
        torch.testing.assert_close(got[b], want)
    # In pure noise x_t says nothing: the denoiser is the posterior mean E[x0 | y].
    zero, one = torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64)
    torch.testing.assert_close(teacher.denoise(x_t, zero, one, y), post.mean(y))
    # The null condition, in any rows, and cond=None are the prior's exact teacher.
    uncond = gm.denoise(x_t, alpha, sigma)
    torch.testing.assert_close(teacher(x_t, t, None), uncond)
    mixed = lq_condition(y) * torch.tensor([[1.0], [0.0], [1.0], [0.0]], dtype=F64)
    out = teacher(x_t, t, mixed)
    torch.testing.assert_close(out[1::2], uncond[1::2])
    torch.testing.assert_close(out[0::2], got[0::2])
    assert (got - uncond).abs().max() > 0.05  # the condition matters


def test_posterior_teacher_flow_prediction_and_bad_cond():
    post = problem()[1]
    teacher = PosteriorTeacher(post)  # flow prediction, rectified flow
    g = torch.Generator().manual_seed(5)
    x_t, y = torch.randn(3, 3, generator=g, dtype=F64), torch.randn(3, 2, generator=g, dtype=F64)
    t = RectifiedFlow().timesteps(torch.tensor([200, 500, 800]))
    x0, _ = to_x0_eps(teacher(x_t, t, lq_condition(y)), "flow", x_t,
                      *(v[:, None] for v in RectifiedFlow().alpha_sigma(t)))
    alpha, sigma = RectifiedFlow().alpha_sigma(t)
    torch.testing.assert_close(x0, teacher.denoise(x_t, alpha, sigma, y))
    with pytest.raises(ValueError, match=r"lq_condition\(lq\), shape \(3, 3\); got \(3, 2\)"):
        teacher(x_t, t, y)


def test_spread_at_two_comparable_components_is_the_total_covariance():
    """At an observation two components explain about equally well, the posterior's spread
    E||x - E[x|y]||^2 is the trace of the law of total covariance, sum_k w_k P_k (within) plus
    sum_k w_k (m_k - m)(m_k - m)^T (between), and the between term is most of it. Checked
    against Bayes' rule per component written out, and against Monte-Carlo from the prior."""
    from tests.test_analytic_full import random_covs

    g = torch.Generator().manual_seed(6)
    # The components differ in the dimension the operator does not see, so y cannot tell them
    # apart: comparable weights, means far apart.
    means = torch.tensor([[0.3, -0.2, 2.0], [-0.1, 0.2, -2.0]], dtype=F64)
    gm = FullGaussianMixture(means, random_covs(2, 3, g), torch.tensor([0.5, 0.5], dtype=F64))
    operator = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=F64)
    post = LinearGaussianPosterior(gm, operator, 0.2)
    y = torch.tensor([0.1, 0.0], dtype=F64)

    log_w, m_k, p_k = [], [], []
    for mu, cov, pi in zip(gm.means, gm.covs, gm.weights, strict=True):
        s = operator @ cov @ operator.T + 0.04 * torch.eye(2, dtype=F64)
        gain = cov @ operator.T @ torch.linalg.inv(s)
        log_w.append(pi.log() + MultivariateNormal(operator @ mu, s).log_prob(y))
        m_k.append(mu + gain @ (y - operator @ mu))
        p_k.append(cov - gain @ operator @ cov)
    w = torch.stack(log_w).softmax(0)
    m_k, p_k = torch.stack(m_k), torch.stack(p_k)
    mean = w @ m_k
    within = (w[:, None, None] * p_k).sum(0)
    between = (w[:, None, None] * torch.einsum("ki,kj->kij", m_k - mean, m_k - mean)).sum(0)
    assert 0.3 < float(w[0]) < 0.7, w  # comparably weighted
    assert float(between.trace()) > 0.5 * float((within + between).trace())  # it matters

    torch.testing.assert_close(post.log_weights(y[None])[0].exp(), w)
    torch.testing.assert_close(post.mean(y[None])[0], mean)
    torch.testing.assert_close(post.expected_sq_dev(y[None])[0], (within + between).trace())
    # Monte-Carlo: self-normalised importance sampling from the prior, the whole covariance.
    prior = gm.sample(400_000, g)
    logp = -0.5 * (y - prior @ operator.T).square().sum(1) / 0.04
    iw = (logp - logp.max()).exp()
    iw = iw / iw.sum()
    mc_mean = iw @ prior
    mc_cov = (iw[:, None] * (prior - mc_mean)).T @ (prior - mc_mean)
    torch.testing.assert_close(mc_cov, within + between, atol=0.05, rtol=0.03)
    # Exact posterior samples have the same covariance.
    samples = post.sample(y.expand(200_000, 2), g)
    torch.testing.assert_close(samples.T.cov(), within + between, atol=0.05, rtol=0.03)
