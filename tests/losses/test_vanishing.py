"""The analytic check of issue 25: a student that already samples the data gets no gradient.

The teacher is an exact Gaussian mixture and the fake score is exact for the student's
distribution (a second mixture object). When the student samples the data the two are the same
function, so every method's generator gradient vanishes in expectation (here per sample, which
is stronger). Each method is checked by Monte Carlo over N draws: the mean gradient is within 5
standard errors of 0, with a floor of 1e-6 for float32 rounding (the per-sample gradients
themselves are at rounding level, so the standard error is too), and each sample's is below
1e-4. The control moves the student
off the data (shifted by 0.5, its fake exact for it): there the mean gradient is more than 5
standard errors away from 0 in some coordinate, so the check can fail.
"""

import pytest
import torch

from scoredistill import (
    CFG,
    DecoupledDMDLoss,
    DMDLoss,
    FDistillLoss,
    SiDLoss,
    SIMLoss,
    gan_generator_loss,
)
from scoredistill.analytic import mixture_log_prob
from scoredistill.schedules import index_alpha_sigma
from tests.losses.test_sid import mixture
from tests.losses.test_sid_lsg import Classes

N, SHIFT, LEVEL = 4000, 0.5, 500


def assert_vanishes(grad):
    mean, se = grad.mean(0), grad.std(0) / N**0.5
    assert (mean.abs() <= 5 * se + 1e-6).all(), (mean, se)
    # And per sample: a wrong level or input for one model can leave the mean near 0 by chance
    # (the fake at another sample's timestep did) while each sample's gradient is far from it.
    assert grad.abs().max() < 1e-4, grad.abs().max()


def assert_moves(grad):
    mean, se = grad.mean(0), grad.std(0) / N**0.5
    assert (mean.abs() > 5 * se).any(), (mean, se)


def student(shift, seed=0):
    """N samples of the student (the data shifted by ``shift``), its exact fake, a generator."""
    g = torch.Generator().manual_seed(seed)
    return mixture().sample(N, g) + shift, mixture(shift), g


def log_density(gm, x_t, alpha, sigma):
    """Exact log p_t(x_t) (N,) of the mixture's marginal at one level (alpha, sigma)."""
    k, d = gm.means.shape
    evals = (alpha**2 * gm.stds**2 + sigma**2)[:, None].expand(k, d)
    return mixture_log_prob(x_t, alpha * gm.means, gm.weights.log(), evals,
                            torch.eye(d).expand(k, d, d))


def noisy(x, g):
    """x_t at LEVEL for every sample: (index (N,), noise, alpha, sigma)."""
    index = torch.full((N,), LEVEL)
    _, alpha, sigma = index_alpha_sigma(mixture().schedule, index[:1])
    return index, torch.randn(x.shape, generator=g), alpha[0], sigma[0]


def implicit(loss):
    def grad(x, fake, g):
        return loss(x, teacher=mixture(), fake=fake, generator=g).grad
    return grad


def f_distill(divergence):
    def grad(x, fake, g):
        # The discriminator's ideal logit: the exact log density ratio p_data / p_student at
        # the same noisy sample (r = 1 on the data).
        index, noise, alpha, sigma = noisy(x, g)
        x_t = alpha * x + sigma * noise
        logit = log_density(mixture(), x_t, alpha, sigma) - log_density(fake, x_t, alpha, sigma)
        return FDistillLoss(divergence=divergence)(x, teacher=mixture(), fake=fake, logit=logit,
                                                   index=index, noise=noise).grad
    return grad


def gan(x, fake, g):
    # DMD2's generator term with the ideal discriminator, differentiated through its input.
    _, noise, alpha, sigma = noisy(x, g)
    x = x.clone().requires_grad_(True)
    x_t = alpha * x + sigma * noise
    logit = log_density(mixture(), x_t, alpha, sigma) - log_density(fake, x_t, alpha, sigma)
    (grad,) = torch.autograd.grad(gan_generator_loss(logit[:, None]) * N, x)
    return grad


METHODS = {
    "sid-1.2": implicit(SiDLoss(alpha=1.2)), "sid-1": implicit(SiDLoss(alpha=1.0)),
    "sim-0.1": implicit(SIMLoss(c=0.1)), "sim-1": implicit(SIMLoss(c=1.0)),
    "sim-l2": implicit(SIMLoss(c=None)), "dmd": implicit(DMDLoss()),
    **{f"f-{d}": f_distill(d) for d in ("kl", "js", "reverse_kl", "squared_hellinger")},
    "dmd2-gan": gan,
}


@pytest.mark.parametrize("method", list(METHODS))
def test_generator_gradient_vanishes_on_the_data(method):
    x, fake, g = student(0.0)
    assert_vanishes(METHODS[method](x, fake, g))
    x, fake, g = student(SHIFT)
    assert_moves(METHODS[method](x, fake, g))


def classes_student(shift):
    """Class-conditional data (class k is component k), its exact fake and the CFG teacher."""
    g = torch.Generator().manual_seed(1)
    data = mixture()
    k = torch.multinomial(data.weights, N, replacement=True, generator=g)
    x = data.means[k] + shift + data.stds[k, None] * torch.randn(N, 2, generator=g)
    teacher = CFG(Classes(data), 3.0, torch.full((1, 1), -1.0))
    return x, k[:, None].float(), teacher, Classes(mixture(shift)), g


def test_decoupled_dmd_dm_term_vanishes_and_ca_term_does_not():
    # The DM term (teacher_cond - fake_cond) vanishes on the class-conditional data. The CA
    # term (alpha - 1)(teacher_cond - teacher_uncond) does not: it moves the student toward the
    # guided distribution, which is not the data for alpha != 1, and is meant to.
    x, cond, teacher, fake, g = classes_student(0.0)
    dm_only = DecoupledDMDLoss(ca_weight=0.0)
    assert_vanishes(dm_only(x, cond, teacher=teacher, fake=fake, generator=g).grad)
    ca_only = DecoupledDMDLoss(dm_weight=0.0)
    assert_moves(ca_only(x, cond, teacher=teacher, fake=fake, generator=g).grad)
    x, cond, teacher, fake, g = classes_student(SHIFT)
    assert_moves(dm_only(x, cond, teacher=teacher, fake=fake, generator=g).grad)
