"""DMD (and OSEDiff's form) and CSD (Yu et al.; PiSA-SR's form) against per-sample references.

The references follow the papers' and the authors' code sample by sample: noise added with
diffusers' schedulers, x0 from the prediction, CFG written out as two calls, the authors'
``F.mse_loss(latents, (latents - grad).detach())`` differentiated by autograd.
"""

import pytest
import torch
import torch.nn.functional as F

from scoredistill import (
    CFG,
    CSDLoss,
    DASMSampler,
    DMDLoss,
    ScoreDistillationLoss,
    TSDLoss,
    VSDLoss,
)
from tests.losses.test_reference import SCALE, B, guided, levels, make

INDEX = torch.tensor([25, 512, 970])


def x0_of(kind, pred, x_t, alpha, sigma):
    """x0 from an epsilon (OSEDiff's ``eps_to_mu``) or a flow-velocity prediction."""
    return x_t - sigma * pred if kind == "flow" else (x_t - sigma * pred) / alpha


def authors_loss(z_hat, per_sample_grad, index):
    """The value of ``F.mse_loss(z_hat, (z_hat - grad).detach())`` with the per-sample grads,
    and its gradient w.r.t. z_hat by autograd (OSEDiff / PiSA-SR)."""
    latents = z_hat.detach().clone().requires_grad_(True)
    grads = torch.stack([per_sample_grad(b, latents[b].detach()) for b in range(len(index))])
    value = F.mse_loss(latents, (latents - grads).detach())
    value.backward()
    return value.detach(), latents.grad


def assert_authors_value_and_grad(out, z, want):
    value, grad = want
    torch.testing.assert_close(out.loss.detach(), value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(z.grad, grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_osediff_form_equals_their_loss(kind):
    teacher, fake, z_hat, _, noise, cond, null = make(kind)

    def per_sample(b, latent):
        t, a, s = levels(kind, int(INDEX[b]))
        x_t = a * latent + s * noise[b]  # add_noise at their timestep
        x0_fake = x0_of(kind, fake(x_t[None], torch.tensor([t]), cond[b][None])[0], x_t, a, s)
        x0_fix = x0_of(kind, guided(teacher, x_t, t, cond[b], null), x_t, a, s)
        return (x0_fake - x0_fix) / (latent - x0_fix).abs().mean()

    z = z_hat.clone().requires_grad_(True)
    out = DMDLoss.osediff()(z, cond, teacher=CFG(teacher, SCALE, null), fake=fake, index=INDEX,
                            noise=noise)
    out.loss.backward()
    assert_authors_value_and_grad(out, z, authors_loss(z_hat, per_sample, INDEX))


def test_osediff_noise_levels_are_diffusers_add_noise():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                    beta_end=0.012)
    teacher, *_ = make("vp")
    x, eps = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0)).unbind(0)
    t = teacher.schedule.timesteps(INDEX)
    alpha, sigma = teacher.schedule.alpha_sigma(t)
    want = sched.add_noise(x, eps, t.long())
    torch.testing.assert_close(alpha[:, None] * x + sigma[:, None] * eps, want)
    # OSEDiff draws timesteps U{20..979}: the loss's indices cover exactly those steps.
    assert DMDLoss.osediff().index_sampler.low == 20 and DMDLoss.osediff().index_sampler.high == 980
    # PiSA-SR's cal_csd draws U{20..499}: indices 500..979 (DDPM step t = 999 - index).
    pisasr = CSDLoss.pisasr().index_sampler
    assert (pisasr.low, pisasr.high) == (500, 980)
    steps = teacher.schedule.timesteps(torch.tensor([pisasr.low, pisasr.high - 1]))
    assert steps.tolist() == [499.0, 20.0]


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_pisasr_form_equals_their_loss(kind):
    teacher, _, z_hat, _, noise, cond, null = make(kind)
    index = torch.tensor([500, 733, 979])

    def per_sample(b, latent):
        t, a, s = levels(kind, int(index[b]))
        x_t = a * latent + s * noise[b]
        x0_real = x0_of(kind, guided(teacher, x_t, t, cond[b], null), x_t, a, s)
        x0_null = x0_of(kind, teacher(x_t[None], torch.tensor([t]), null)[0], x_t, a, s)
        return (x0_null - x0_real) / (latent - x0_real).abs().mean()

    z = z_hat.clone().requires_grad_(True)
    out = CSDLoss.pisasr()(z, cond, teacher=CFG(teacher, SCALE, null), index=index, noise=noise)
    out.loss.backward()
    assert_authors_value_and_grad(out, z, authors_loss(z_hat, per_sample, index))


def test_dmd2_value_is_half_the_mse_and_the_forms_share_directions():
    # DMD2's 0.5 * mse and OSEDiff's mse: the same direction g, values 0.5 and 1 times mean(g^2).
    teacher, fake, z_hat, _, noise, cond, null = make("flow")
    kw = dict(teacher=CFG(teacher, SCALE, null), fake=fake, index=INDEX, noise=noise)
    half, full = DMDLoss()(z_hat, cond, **kw), DMDLoss.osediff()(z_hat, cond, **kw)
    torch.testing.assert_close(half.grad, full.grad)
    torch.testing.assert_close(half.loss, 0.5 * full.grad.square().mean())
    torch.testing.assert_close(full.loss, full.grad.square().mean())


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_csd_is_yu_et_al_classifier_score(kind):
    teacher, _, z_hat, _, noise, cond, null = make(kind)
    out = CSDLoss()(z_hat, cond, teacher=CFG(teacher, 1.0, null), index=INDEX, noise=noise)
    for b in range(B):
        t, a, s = levels(kind, int(INDEX[b]))
        x_t = a * z_hat[b] + s * noise[b]
        tt = torch.tensor([t])
        # w(t) (eps(x_t; y) - eps(x_t; null)), w = sigma^2, in the teacher's parametrisation.
        want = s**2 * (teacher(x_t[None], tt, cond[b][None]) - teacher(x_t[None], tt, null))[0]
        torch.testing.assert_close(out.grad[b], want, rtol=1e-5, atol=1e-7)
    # With a CFG scale w the direction is w times the classifier score.
    scaled = CSDLoss()(z_hat, cond, teacher=CFG(teacher, SCALE, null), index=INDEX, noise=noise)
    torch.testing.assert_close(scaled.grad, SCALE * out.grad, rtol=1e-5, atol=1e-6)


def test_dmd2_form_equals_per_sample_formula():
    # DMD2's form (scale 1, 0.5 * mse): grad = (fake_x0 - teacher_x0) / mean|z_hat - teacher_x0|.
    teacher, fake, z_hat, _, noise, cond, null = make("flow")
    out = DMDLoss()(z_hat, cond, teacher=CFG(teacher, SCALE, null), fake=CFG(fake, SCALE, null),
                    index=INDEX, noise=noise)
    for b in range(B):
        t, a, s = levels("flow", int(INDEX[b]))
        x_t = a * z_hat[b] + s * noise[b]
        real = x0_of("flow", guided(teacher, x_t, t, cond[b], null), x_t, a, s)
        fake_x0 = x0_of("flow", guided(fake, x_t, t, cond[b], null), x_t, a, s)
        want = (fake_x0 - real) / (z_hat[b] - real).abs().mean()
        torch.testing.assert_close(out.grad[b], want, rtol=1e-5, atol=1e-7)


class Mixed(ScoreDistillationLoss):
    """TSD plus a CSD term and DMD's normalisation, one mix of the direction terms."""

    def mix(self):
        return {"vsd": 0.5, "tsm": 0.3, "csd": 0.2}


@pytest.mark.parametrize("sample_weighting", [None, "dmd"])
def test_csd_and_dmd_weighting_compose_linearly_along_dasm(sample_weighting):
    teacher, fake, z_hat, z, noise, cond, null = make("flow")
    dasm = DASMSampler()
    kw = dict(teacher=CFG(teacher, SCALE, null), fake=CFG(fake, SCALE, null), z=z, index=INDEX,
              noise=noise, dasm_bias=torch.tensor([-25, 3, 24]))
    common = dict(dasm=dasm, sample_weighting=sample_weighting)
    out = Mixed(**common)(z_hat, cond, **kw)
    vsd, tsm, csd = VSDLoss(**common), TSDLoss(lam=0.0, **common), CSDLoss(**common)
    parts = (0.5 * vsd(z_hat, cond, **vsd.select_inputs(**kw)).grad
             + 0.3 * tsm(z_hat, cond, **tsm.select_inputs(**kw)).grad
             + 0.2 * csd(z_hat, cond, **csd.select_inputs(**kw)).grad)
    torch.testing.assert_close(out.grad, parts, rtol=1e-5, atol=1e-6)
    assert out.norms["csd"].shape == (B, dasm.num_points)


def test_csd_needs_a_cfg_teacher_and_a_fake_score_along_dasm():
    teacher, _, z_hat, _, _, cond, null = make("flow")
    with pytest.raises(ValueError, match="CFG"):
        CSDLoss()(z_hat, cond, teacher=teacher)
    with pytest.raises(ValueError, match="fake-score"):
        CSDLoss(dasm=DASMSampler())(z_hat, cond, teacher=CFG(teacher, 1.0, null))
