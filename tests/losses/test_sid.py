"""SiD (Zhou et al., ICML 2024) against a per-sample reference written from its equation.

The reference adds the noise with diffusers' scheduler tables, guides the teacher by two explicit
calls, converts each prediction to x0 by hand, writes the authors' generator loss
``(f_r - f_f) * ((f_r - x) - alpha (f_r - f_f)) / mean|x - f_r|.detach()`` for one sample and
differentiates it by autograd through both models' calls.
"""

import pytest
import torch

from scoredistill import (
    CFG,
    DASMSampler,
    DMDLoss,
    GaussianMixture,
    RectifiedFlow,
    SiDLoss,
    SIMLoss,
)
from tests.losses.test_matching import x0_of
from tests.losses.test_reference import SCALE, B, guided, levels, make

INDEX = torch.tensor([25, 512, 970])


def reference(kind, per_sample, teacher, fake, z_hat, cond, null, noise, index, detach=False):
    """Sum over samples of ``per_sample(x, f_r, f_f) / numel`` and its gradient, sample by
    sample; ``detach`` holds the predictions constant (DMD's assumption)."""
    value, grads = 0.0, []
    for b in range(z_hat.shape[0]):
        t, a, s = levels(kind, int(index[b]))
        x = z_hat[b].clone().requires_grad_(True)
        x_t = a * x + s * noise[b]
        f_r = x0_of(kind, guided(teacher, x_t, t, cond[b], null), x_t, a, s)
        f_f = x0_of(kind, fake(x_t[None], torch.tensor([t]), cond[b][None])[0], x_t, a, s)
        if detach:
            f_r, f_f = f_r.detach(), f_f.detach()
        v = per_sample(x, f_r, f_f) / z_hat.numel()
        (g,) = torch.autograd.grad(v, x)
        value, grads = value + v.detach(), [*grads, g]
    return value, torch.stack(grads)


def sid(alpha):
    def per_sample(x, f_r, f_f):
        diff = f_r - f_f
        return (diff * ((f_r - x) - alpha * diff)).sum() / (x - f_r).abs().mean().detach()
    return per_sample


def run(loss, kind, z_hat, teacher, fake, cond, null, noise, index=INDEX):
    z = z_hat.clone().requires_grad_(True)
    out = loss(z, cond, teacher=CFG(teacher, SCALE, null), fake=fake, index=index, noise=noise)
    out.loss.backward()
    return out, z.grad


@pytest.mark.parametrize("kind", ["flow", "vp"])
@pytest.mark.parametrize("alpha", [1.2, 1.0, 0.5])
def test_value_and_gradient_equal_reference(kind, alpha):
    teacher, fake, z_hat, _, noise, cond, null = make(kind)
    out, grad = run(SiDLoss(alpha=alpha), kind, z_hat, teacher, fake, cond, null, noise)
    value, want = reference(kind, sid(alpha), teacher, fake, z_hat, cond, null, noise, INDEX)
    torch.testing.assert_close(out.loss.detach(), value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.grad, want * z_hat.numel(), rtol=1e-4, atol=1e-6)
    assert out.index.shape == out.sigmas.shape == out.timesteps.shape == (B, 1)


@pytest.mark.parametrize("kind", ["flow", "vp"])
def test_detached_predictions_give_dmd(kind):
    # With f_r, f_f constant: d/dx of (f_r - f_f)^T[(f_r - x) - alpha (f_r - f_f)] / N is
    # (f_f - f_r) / N, DMD's direction with DMD's normaliser N = mean|x - f_r|, for any alpha;
    # both losses average over numel, so the gradients are equal, not only parallel.
    teacher, fake, z_hat, _, noise, cond, null = make(kind)
    _, dmd = run(DMDLoss(), kind, z_hat, teacher, fake, cond, null, noise)
    for alpha in (1.2, 0.3):
        _, detached = reference(kind, sid(alpha), teacher, fake, z_hat, cond, null, noise, INDEX,
                                detach=True)
        torch.testing.assert_close(detached, dmd, rtol=1e-5, atol=1e-8)
    # SiD's own gradient is not DMD's: the Jacobians of both predictions contribute.
    _, full = run(SiDLoss(), kind, z_hat, teacher, fake, cond, null, noise)
    assert (full - dmd).norm() > 0.1 * dmd.norm()


class Module(torch.nn.Module):
    """A ScoreModel with parameters: a two-layer MLP with its prediction in flow space."""

    prediction = "flow"
    schedule = RectifiedFlow()

    def __init__(self, seed, dim=6):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, 32), torch.nn.Tanh(),
                                       torch.nn.Linear(32, dim))

    def forward(self, x_t, t, cond=None):
        return self.net(torch.cat([x_t, t[:, None] / 1000], dim=1))


@pytest.mark.parametrize("loss", [SiDLoss(), SIMLoss(c=0.5)], ids=["sid", "sim"])
def test_gradient_reaches_the_student_not_the_models(loss):
    teacher, fake, student = Module(0), Module(1), torch.nn.Linear(6, 6)
    out = loss(student(torch.randn(4, 6)), teacher=teacher, fake=fake,
               generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert all(p.grad is None for m in (teacher, fake) for p in m.parameters())
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0


def test_one_batched_call_per_step():
    teacher, _, z_hat, _, noise, cond, _ = make("flow")
    SiDLoss()(z_hat, cond, teacher=teacher, fake=teacher, index=INDEX, noise=noise)
    assert teacher.calls == 1 and teacher.batch_sizes == [2 * B]


def test_a_model_without_input_gradient_is_refused():
    teacher, fake, z_hat, _, noise, cond, _ = make("flow")

    def frozen(x_t, t, c):
        with torch.no_grad():
            return fake(x_t, t, c)
    frozen.prediction, frozen.schedule = fake.prediction, fake.schedule
    with pytest.raises(ValueError, match="fake's prediction carries no gradient"):
        SiDLoss()(z_hat, cond, teacher=teacher, fake=frozen, index=INDEX, noise=noise)


def test_options_and_inputs_are_checked():
    for bad in (float("nan"), "1.2", True):
        with pytest.raises(ValueError, match=r"SiDLoss\(alpha=...\)"):
            SiDLoss(alpha=bad)
    assert SiDLoss(alpha=-0.5).alpha == -0.5  # the authors' --alpha takes negative values
    with pytest.raises(ValueError, match=r"SiDLoss\(time_weighting=...\)"):
        SiDLoss(time_weighting="sigma^2")
    for make_loss in (lambda: SiDLoss(dasm=DASMSampler()),
                      lambda: SIMLoss(c=1.0, dasm=DASMSampler(num_points=1, weights=(1.0,)))):
        with pytest.raises(ValueError, match=r"\(dasm=...\): .* no DASM trajectory"):
            make_loss()
    loss = SiDLoss()
    assert loss.uses == frozenset({"fake"})
    assert set(loss.select_inputs(teacher=1, fake=2, z=3, dasm_bias=4)) == {"teacher", "fake"}
    _, fake, z_hat, _, noise, cond, _ = make("flow")
    with pytest.raises(FloatingPointError, match="SiD's normaliser"):
        # A teacher whose x0 is z_hat itself: the normaliser divides by zero.
        loss(z_hat, cond, teacher=_Const(z_hat), fake=fake, index=INDEX, noise=noise)


class _Const:
    """An x0-predicting model that returns ``x0`` whatever its input, plus 0 * x_t."""

    prediction = "x0"
    schedule = RectifiedFlow()

    def __init__(self, x0):
        self.x0 = x0

    def __call__(self, x_t, t, cond=None):
        return self.x0 + 0 * x_t


def mixture(shift=0.0):
    return GaussianMixture(torch.tensor([[-2.0, 0.5], [1.5, -1.0], [0.0, 2.0]]) + shift,
                           torch.tensor([0.4, 0.7, 0.5]), torch.tensor([0.3, 0.5, 0.2]),
                           schedule=RectifiedFlow(), prediction="flow")


@pytest.mark.parametrize("loss", [SiDLoss(), SiDLoss(alpha=1.0), SIMLoss(c=0.5),
                                  SIMLoss(c=None)], ids=["sid", "sid-a1", "sim", "sim-l2"])
def test_gradient_vanishes_when_the_student_samples_the_data(loss):
    # Teacher and fake both the exact mixture (two objects): f_r = f_f as functions of x_t, so
    # the gradient vanishes for every sample, not only in expectation; checked on 4000 draws.
    teacher, fake = mixture(), mixture()
    g = torch.Generator().manual_seed(3)
    x = teacher.sample(4000, g)
    out = loss(x, teacher=teacher, fake=fake, generator=g)
    assert out.grad.abs().max() < 1e-5
    # A student off the data (shifted by 0.5, its fake score exact for it) gets one.
    off = loss(x + 0.5, teacher=teacher, fake=mixture(0.5), generator=g)
    assert off.grad.abs().mean() > 1e-2
