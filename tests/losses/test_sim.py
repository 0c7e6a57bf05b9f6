"""SIM (Luo et al., NeurIPS 2024) against a per-sample reference and its relation to SiD.

The reference writes the paper's ``d'(y_t)^T (s_f(x_t) - grad log q(x_t | x))`` in score units
for one sample, with the scores ``s = (alpha f - x_t) / sigma^2`` of the x0 predictions and the
paper's constant ``c_score = c alpha / sigma^2``, and rescales it by ``sigma^2 / alpha`` to the
x0 units SIMLoss documents; autograd differentiates it through both models' calls.
"""

import pytest
import torch

from scoredistill import CFG, SiDLoss, SIMLoss
from scoredistill.parametrization import ddim_step, to_x0_eps
from scoredistill.schedules import index_alpha_sigma
from tests.losses.test_matching import x0_of
from tests.losses.test_reference import SCALE, guided, levels, make
from tests.losses.test_sid import INDEX, mixture, reference, run


def sim_in_score_units(kind, c):
    def per_sample(x, f_r, f_f, a, s, eps):
        x_t = a * x + s * eps
        s_r, s_f = (a * f_r - x_t) / s**2, (a * f_f - x_t) / s**2
        y = s_r - s_f
        grad_log_q = -(x_t - a * x) / s**2
        if c is None:
            slope = 2 * y * s**2 / a  # d(y) = |y|^2 in x0 units: d'(y_x0) = 2 y_x0
        else:
            slope = y / (y.square().sum() + (c * a / s**2) ** 2).sqrt()
        return (slope * (s_f - grad_log_q)).sum() * s**2 / a
    return per_sample


def sim_reference(kind, c, teacher, fake, z_hat, cond, null, noise):
    value, grads = 0.0, []
    for b in range(z_hat.shape[0]):
        t, a, s = levels(kind, int(INDEX[b]))
        x = z_hat[b].clone().requires_grad_(True)
        x_t = a * x + s * noise[b]
        f_r = x0_of(kind, guided(teacher, x_t, t, cond[b], null), x_t, a, s)
        f_f = x0_of(kind, fake(x_t[None], torch.tensor([t]), cond[b][None])[0], x_t, a, s)
        v = sim_in_score_units(kind, c)(x, f_r, f_f, a, s, noise[b]) / z_hat.numel()
        (g,) = torch.autograd.grad(v, x)
        value, grads = value + v.detach(), [*grads, g]
    return value, torch.stack(grads)


@pytest.mark.parametrize("kind", ["flow", "vp"])
@pytest.mark.parametrize("c", [0.5, 3.0, None])
def test_value_and_gradient_equal_reference(kind, c):
    teacher, fake, z_hat, _, noise, cond, null = make(kind)
    out, grad = run(SIMLoss(c=c), kind, z_hat, teacher, fake, cond, null, noise)
    value, want = sim_reference(kind, c, teacher, fake, z_hat, cond, null, noise)
    torch.testing.assert_close(out.loss.detach(), value, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["flow", "vp"])
def test_squared_l2_case_is_twice_sids_numerator_at_alpha_1(kind):
    # 2 (f_r - f_f)^T (f_f - x) = 2 (f_r - f_f)^T [(f_r - x) - (f_r - f_f)]: SiD's numerator at
    # alpha = 1. SiD divides it by N = mean|x - f_r| (detached), so per sample
    # grad SIM = 2 N grad SiD, and the values likewise.
    teacher, fake, z_hat, _, noise, cond, null = make(kind)
    _, sim = run(SIMLoss(c=None), kind, z_hat, teacher, fake, cond, null, noise)
    _, sid = run(SiDLoss(alpha=1.0), kind, z_hat, teacher, fake, cond, null, noise)
    n = []
    for b in range(z_hat.shape[0]):
        t, a, s = levels(kind, int(INDEX[b]))
        x_t = a * z_hat[b] + s * noise[b]
        f_r = x0_of(kind, guided(teacher, x_t, t, cond[b], null), x_t, a, s)
        n.append((z_hat[b] - f_r).abs().mean())
    torch.testing.assert_close(sim, 2 * torch.stack(n)[:, None] * sid, rtol=1e-4, atol=1e-7)
    value, _ = reference(kind, lambda x, f_r, f_f: 2 * ((f_r - f_f) * (f_f - x)).sum(),
                         teacher, fake, z_hat, cond, null, noise, INDEX)
    out = SIMLoss(c=None)(z_hat, cond, teacher=CFG(teacher, SCALE, null), fake=fake,
                          index=INDEX, noise=noise)
    torch.testing.assert_close(out.loss, value, rtol=1e-5, atol=1e-7)


def test_large_c_approaches_the_squared_l2_direction():
    # c d'(y) -> y as c -> infinity: SIM(c) * 2c tends to SIM(None).
    teacher, fake, z_hat, _, noise, cond, null = make("flow")
    _, l2 = run(SIMLoss(c=None), "flow", z_hat, teacher, fake, cond, null, noise)
    _, huber = run(SIMLoss(c=1e4), "flow", z_hat, teacher, fake, cond, null, noise)
    torch.testing.assert_close(2e4 * huber, l2, rtol=1e-3, atol=1e-6)


def test_tweedie_identity_in_expectation():
    # The identity SiD and SIM rest on: with the fake score exact for the student's
    # distribution, E[(f_r - f_f)^T (f_f - x) | x_t] = 0 since f_f = E[x | x_t] (Tweedie), for
    # any teacher. Monte-Carlo over 10 batches of 4000 draws, |mean| < 5 standard errors; a fake
    # exact for another distribution breaks it by far more.
    teacher, student = mixture(), mixture(0.5)
    loss = SIMLoss(c=None)

    def batches(fake):
        g = torch.Generator().manual_seed(11)
        return torch.stack([loss(student.sample(4000, g), teacher=teacher, fake=fake,
                                 generator=g).loss.detach() for _ in range(10)])

    good = batches(mixture(0.5))
    assert good.mean().abs() < 5 * good.std() / 10**0.5, good
    bad = batches(mixture(0.25))
    assert bad.mean().abs() > 5 * bad.std() / 10**0.5 + good.mean().abs(), bad


def test_zero_c_refuses_equal_predictions():
    gm = mixture()
    with pytest.raises(FloatingPointError, match=r"SIMLoss\(c=0\)"):
        SIMLoss(c=0.0)(gm.sample(4), teacher=gm, fake=mixture(), generator=torch.Generator())


def test_options_are_checked():
    for bad in (-1.0, float("inf"), "1", True):
        with pytest.raises(ValueError, match=r"SIMLoss\(c=...\)"):
            SIMLoss(c=bad)
    with pytest.raises(TypeError):
        SIMLoss()  # c has no default: the paper's constant is the user's choice


def test_a_dasm_point_breaks_the_identity():
    # Why SiDLoss and SIMLoss refuse dasm=: the identity above needs x_t ~ q(x_t | x). DASM's
    # second point is the exact fake's DDIM step from such a draw, whose law given x is not
    # q(x_t | x): there the mean is far from 0 (index 300 -> 800 of RectifiedFlow), while a
    # fresh draw at the same level keeps it at 0 within 5 standard errors.
    teacher, student = mixture(), mixture(0.5)
    fake, schedule = mixture(0.5), teacher.schedule
    n, g = 4000, torch.Generator().manual_seed(5)
    (t0, t1), (a0, a1), (s0, s1) = index_alpha_sigma(schedule, torch.tensor([300, 800]))

    def x0(model, x_t, t, a, s):
        return to_x0_eps(model(x_t, t.expand(n), None), model.prediction, x_t, a, s)[0]

    def batches(stepped):
        out = []
        for _ in range(10):
            x = student.sample(n, g)
            if stepped:
                x_0 = a0 * x + s0 * torch.randn(x.shape, generator=g)
                x_t = ddim_step(x_0, fake(x_0, t0.expand(n), None), fake.prediction, a0, s0,
                                a1, s1)
            else:
                x_t = a1 * x + s1 * torch.randn(x.shape, generator=g)
            f_r, f_f = x0(teacher, x_t, t1, a1, s1), x0(fake, x_t, t1, a1, s1)
            out.append(((f_r - f_f) * (f_f - x)).sum(1).mean())
        return torch.stack(out)

    fresh, stepped = batches(False), batches(True)
    assert fresh.mean().abs() < 5 * fresh.std() / 10**0.5, fresh
    assert stepped.mean().abs() > 20 * stepped.std() / 10**0.5, stepped  # 62 measured
