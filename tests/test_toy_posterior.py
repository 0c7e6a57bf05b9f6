"""ToySR's exact conditional teacher against joint-Gaussian conditioning with full matrices."""

import torch
from torch.distributions import MultivariateNormal

from scoredistill import RectifiedFlow
from scoredistill.toy import ToySR


def reference_x0(problem: ToySR, x_t, lq, alpha, sigma):
    """E[x0 | x_t, lq]: per component, condition the joint Gaussian of (x0, x_t, lq)."""
    gmm, a_op = problem.teacher, problem.operator.double()
    dim, d = problem.dim, problem.lq_dim
    # Observations o = H x0 + noise with H = [alpha I; A], noise cov diag(sigma^2 I, n^2 I).
    h = torch.cat([alpha * torch.eye(dim, dtype=torch.float64), a_op])
    noise = torch.diag(torch.cat([torch.full((dim,), sigma**2),
                                  torch.full((d,), problem.noise_std**2)])).double()
    obs = torch.cat([x_t, lq]).double()
    logs, means = [], []
    for mu, s, pi in zip(gmm.means.double(), gmm.stds.double(), gmm.weights.double(), strict=True):
        prior = s**2 * torch.eye(dim, dtype=torch.float64)
        cov = h @ prior @ h.T + noise
        logs.append(pi.log() + MultivariateNormal(h @ mu, cov).log_prob(obs))
        means.append(mu + prior @ h.T @ torch.linalg.solve(cov, obs - h @ mu))
    return (torch.stack(logs).softmax(0)[:, None] * torch.stack(means)).sum(0)


def test_posterior_denoiser_equals_joint_gaussian_conditioning_and_null_is_the_prior():
    problem = ToySR()
    teacher = problem.conditional_teacher(prediction="x0")
    g = torch.Generator().manual_seed(0)
    _, lq = problem.sample(3, g)
    t = RectifiedFlow().timesteps(torch.tensor([100, 500, 900]))
    alpha, sigma = RectifiedFlow().alpha_sigma(t)
    x_t = torch.randn(3, problem.dim, generator=g)
    got = teacher(x_t, t, problem.cond(lq))
    for b in range(3):
        want = reference_x0(problem, x_t[b], lq[b], float(alpha[b]), float(sigma[b]))
        torch.testing.assert_close(got[b].double(), want, rtol=1e-4, atol=1e-5)
    # The null condition (and cond=None) is the unconditional exact teacher.
    null = torch.zeros(3, problem.lq_dim + 1)
    uncond = problem.teacher.denoise(x_t, alpha, sigma)
    torch.testing.assert_close(teacher(x_t, t, null), uncond, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(teacher(x_t, t, None), uncond, rtol=1e-5, atol=1e-6)
    assert (got - uncond).abs().max() > 0.1  # the condition matters
