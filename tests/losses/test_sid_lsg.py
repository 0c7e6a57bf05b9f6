"""SiD-LSG's three guidance scales (Zhou et al., ICLR 2025; mingyuanzhou/SiD-LSG) as CFG wrappers.

SiD-LSG guides each network's epsilon prediction (``sid_sd_denoise``: ``uncond + kappa (text -
uncond)``) with its own scale: the teacher in the generator loss (kappa4, ``cfg_eval_real``), the
fake score in the generator loss (kappa2 = kappa3, ``cfg_eval_fake``) and the fake score in its
own denoising loss (kappa1, ``cfg_train_fake``). In the library these are
``SiDLoss()(..., teacher=CFG(T, kappa4, null), fake=CFG(F, kappa2, null))`` and
``DiffusionLoss(space="epsilon")(..., model=CFG(F, kappa1, null))``. The reference below is
written from ``training/sid_training_loop.py`` and ``training/sid_sd_util.py``: two explicit
branch calls guided in epsilon space, x0 by diffusers' ``DDPMScheduler.step`` (their
``pred_original_sample``), their generator loss and their fake loss ``(eps_fake - noise)^2``.
"""

import pytest
import torch

from scoredistill import CFG, DiffusionLoss, GaussianMixture, SiDLoss, VariancePreserving
from tests.helpers import TinyNet
from tests.losses.test_reference import B, D, levels, make
from tests.losses.test_sid import INDEX

diffusers = pytest.importorskip("diffusers")
K4, K2, K1 = 4.5, 2.0, 3.0  # distinct, so a scale read from the wrong place fails


def eps_guided(net, x_t, t, c, null, kappa):
    """``sid_sd_denoise(..., predict_x0=False)``: both branches, guided in epsilon space."""
    tt = torch.tensor([t])
    uncond, text = net(x_t[None], tt, null)[0], net(x_t[None], tt, c[None])[0]
    return uncond + kappa * (text - uncond)


def pred_x0(eps, t, x_t):
    """``sid_sd_denoise(..., predict_x0=True)``: the scheduler's ``pred_original_sample``."""
    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012, clip_sample=False)
    return scheduler.step(eps[None], int(t), x_t[None]).pred_original_sample[0]


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_generator_loss_equals_sid_lsg_code(alpha):
    teacher, fake, z_hat, _, noise, cond, null = make("vp")
    z = z_hat.clone().requires_grad_(True)
    out = SiDLoss(alpha=alpha)(z, cond, teacher=CFG(teacher, K4, null), fake=CFG(fake, K2, null),
                               index=INDEX, noise=noise)
    out.loss.backward()
    images = z_hat.clone().requires_grad_(True)
    total = 0.0
    for b in range(B):
        t, a, s = levels("vp", int(INDEX[b]))
        x_t = a * images[b] + s * noise[b]
        y_fake = pred_x0(eps_guided(fake, x_t, t, cond[b], null, K2), t, x_t)
        y_real = pred_x0(eps_guided(teacher, x_t, t, cond[b], null, K4), t, x_t)
        with torch.no_grad():
            weight_factor = (images[b] - y_real).abs().mean()
        if alpha == 1:  # their alpha == 1 branch, algebraically the same as the other
            loss = (y_real - y_fake) * (y_fake - images[b]) / weight_factor
        else:
            loss = (y_real - y_fake) * ((y_real - images[b]) - alpha * (y_real - y_fake))
            loss = loss / weight_factor
        total = total + loss.sum() / B  # their loss.sum() / batch (loss_scaling_G = 1)
    total.backward()
    # Theirs sums over elements per sample; the library averages over them: a factor D.
    torch.testing.assert_close(out.loss.detach() * D, total.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.grad * D, images.grad, rtol=1e-4, atol=1e-6)


def test_fake_score_loss_equals_sid_lsg_code():
    _, _, x0, _, noise, cond, null = make("vp")
    fake = TinyNet("epsilon", VariancePreserving(), seed=1)
    fake.w2.requires_grad_(True)
    ours = DiffusionLoss(space="epsilon")(x0, cond, model=CFG(fake, K1, null), index=INDEX,
                                          noise=noise)
    (g_ours,) = torch.autograd.grad(ours.loss, fake.w2)
    theirs = []
    for b in range(B):
        t, a, s = levels("vp", int(INDEX[b]))
        x_t = a * x0[b] + s * noise[b]  # noise_scheduler.add_noise
        theirs.append((eps_guided(fake, x_t, t, cond[b], null, K1) - noise[b]).square().sum())
    theirs = torch.stack(theirs)
    (g_theirs,) = torch.autograd.grad(theirs.sum() / B, fake.w2)
    # Theirs: sum over elements; ours: 0.5 * mean over them.
    torch.testing.assert_close(ours.per_sample * 2 * D, theirs.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours * 2 * D, g_theirs, rtol=1e-5, atol=1e-6)


class Classes:
    """An exact class-conditional Gaussian mixture: ``cond`` (B, 1) holds a class k, whose data
    is component k alone; the null condition (-1) gives the whole mixture."""

    def __init__(self, gm):
        self.gm, self.prediction, self.schedule = gm, gm.prediction, gm.schedule
        self.parts = [GaussianMixture(gm.means[k:k + 1], gm.stds[k:k + 1], torch.ones(1),
                                      schedule=gm.schedule, prediction=gm.prediction)
                      for k in range(len(gm.weights))]

    def __call__(self, x_t, t, cond):
        out = self.gm(x_t, t)
        for k, part in enumerate(self.parts):
            mask = cond[:, 0] == k
            out = torch.where(mask[:, None], part(x_t, t), out)
        return out


def test_analytic_scales():
    # Exact teacher; fake = the same exact model. Equal teacher and fake scales: f_r = f_f as
    # functions of x_t, so SiD's gradient vanishes for every sample. Scales k4 != k2: f_r - f_f
    # = (k4 - k2)(T_c - T_u), whose closed form gives SiD's value.
    gm = GaussianMixture(torch.tensor([[-2.0, 0.5], [1.5, -1.0], [0.0, 2.0]]),
                         torch.tensor([0.4, 0.7, 0.5]), torch.tensor([0.3, 0.5, 0.2]),
                         prediction="epsilon", schedule=VariancePreserving())
    model, n = Classes(gm), 2000
    g = torch.Generator().manual_seed(0)
    k = torch.randint(0, 3, (n,), generator=g)
    x = gm.means[k] + gm.stds[k, None] * torch.randn(n, 2, generator=g)
    cond, null = k[:, None].float(), torch.full((1, 1), -1.0)
    index, noise = torch.randint(20, 980, (n,), generator=g), torch.randn(n, 2, generator=g)
    same = SiDLoss(alpha=1.0)(x, cond, teacher=CFG(model, K4, null), fake=CFG(model, K4, null),
                              index=index, noise=noise)
    assert same.grad.abs().max() < 1e-4
    out = SiDLoss(alpha=1.0)(x, cond, teacher=CFG(model, K4, null), fake=CFG(model, K2, null),
                             index=index, noise=noise)
    alpha, sigma = gm.schedule.alpha_sigma(gm.schedule.timesteps(index))
    x_t = alpha[:, None] * x + sigma[:, None] * noise
    # Class k's exact x0 is component k's Wiener estimate; the null's is the mixture's.
    per_class = torch.stack([part.denoise(x_t, alpha, sigma) for part in model.parts])
    t_c, t_u = per_class[k, torch.arange(n)], gm.denoise(x_t, alpha, sigma)
    f_r = t_u + K4 * (t_c - t_u)
    diff = (K4 - K2) * (t_c - t_u)
    want = (diff * (f_r - diff - x)).sum(1) / (x - f_r).abs().mean(1)
    torch.testing.assert_close(out.loss, want.sum() / x.numel(), rtol=1e-4, atol=1e-6)
    assert out.grad.abs().mean() > 1e-2


def test_a_non_finite_null_cond_of_a_guided_fake_is_named():
    _, fake, x0, _, noise, cond, null = make("vp")
    bad = CFG(fake, K1, torch.full_like(null, float("nan")))
    with pytest.raises(ValueError, match="non-finite values in the model's null_cond"):
        DiffusionLoss(space="epsilon")(x0, cond, model=bad, index=INDEX, noise=noise)


def test_guided_teacher_and_fake_on_one_model_are_one_call():
    # Both guided roles on one backbone object: cond and null branches of both, one 4B call.
    teacher, _, z_hat, _, noise, cond, null = make("vp")
    SiDLoss()(z_hat, cond, teacher=CFG(teacher, K4, null), fake=CFG(teacher, K2, null),
              index=INDEX, noise=noise)
    assert teacher.calls == 1 and teacher.batch_sizes == [4 * B]
