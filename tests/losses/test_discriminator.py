"""DMD2's GAN term, its head's loss and f-distill's r from a head, against slow explicit
per-sample references on the toy MLPs (features: the last hidden layer, written out here)."""

import math

import pytest
import torch
import torch.nn.functional as F

from scoredistill import (
    DiscriminatorHead,
    DMDLoss,
    FDistillLoss,
    GANHeadLoss,
    GANTerm,
    RectifiedFlow,
    UniformIndex,
    VariancePreserving,
    index_alpha_sigma,
)
from scoredistill.toy import MLPScore, _time_features
from tests.losses.test_fdistill import H, binned_ratio

B, D = 4, 6
INDEX = torch.tensor([30, 400, 610, 950])


def make(kind):
    sched, pred = (RectifiedFlow(), "flow") if kind == "flow" else (VariancePreserving(), "epsilon")
    torch.manual_seed(0)
    teacher, fake = MLPScore(D, 16, pred, sched), MLPScore(D, 16, pred, sched)
    head = DiscriminatorHead.for_model(fake, hidden=8)
    g = torch.Generator().manual_seed(3)
    z_hat, real, noise = torch.randn(3, B, D, generator=g).unbind(0)
    return teacher, fake, head, z_hat, real, noise


def hidden(model, x, index):
    """The MLP's last hidden activations at ``alpha x + sigma noise`` for one sample, by hand."""
    t = model.schedule.timesteps(index)
    net = model.net
    inp = torch.cat([x, _time_features(t, model.schedule.num_steps)], dim=1)
    return net[3](net[2](net[1](net[0](inp))))


def noisy(model, x, noise, index):
    _, a, s = index_alpha_sigma(model.schedule, index)
    return a[:, None] * x + s[:, None] * noise


def gan_draws(seed):
    """The GAN sample's level and noise, drawn as the loss draws them after DMD's (given)."""
    g = torch.Generator().manual_seed(seed)
    return UniformIndex(0, 1000)(B, 1000, generator=g), torch.randn(B, D, generator=g)


@pytest.mark.parametrize("kind", ["flow", "vp"])
@pytest.mark.parametrize(("role", "fused"), [("fake", True), ("teacher", True), ("fake", False)])
def test_dmd2_gan_term_equals_reference(kind, role, fused):
    teacher, fake, head, z_hat, _, noise = make(kind)
    inputs = {"teacher": teacher, "fake": fake, "index": INDEX, "noise": noise}
    dmd = DMDLoss()(z_hat, **inputs)
    weight = 5e-3
    z = z_hat.clone().requires_grad_(True)
    out = DMDLoss(gan=GANTerm(weight=weight, role=role, fused=fused))(
        z, head=head, generator=torch.Generator().manual_seed(9), **inputs)
    out.loss.backward()

    gidx, gnoise = gan_draws(9)
    model = fake if role == "fake" else teacher
    z_ref = z_hat.clone().requires_grad_(True)
    logits = torch.cat([head(hidden(model, noisy(model, z_ref[b:b + 1], gnoise[b:b + 1],
                                                  gidx[b:b + 1]), gidx[b:b + 1]))
                        for b in range(B)])
    value = sum(-math.log(torch.sigmoid(v).item()) for v in logits) / B  # -log D, by hand
    gan = sum(F.softplus(-v) for v in logits) / B
    (dz,) = torch.autograd.grad(gan, z_ref)
    torch.testing.assert_close(out.gan_loss, torch.tensor(value), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.gan_logit, logits.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss, dmd.loss + weight * value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(z.grad, dmd.grad / dmd.grad.numel() + weight * dz,
                               rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(out.grad, dmd.grad)  # the distillation direction, unchanged
    # The generator's term trains the student only: not the head, not the models.
    assert all(p.grad is None for m in (head, teacher, fake) for p in m.parameters())


@pytest.mark.parametrize("divergence", ["kl", "js", "squared_hellinger"])
@pytest.mark.parametrize("bins", [None, 2])
def test_fdistill_ratio_from_the_teachers_features(divergence, bins):
    teacher, fake, head, z_hat, _, noise = make("flow")
    inputs = {"teacher": teacher, "fake": fake, "index": INDEX, "noise": noise}
    dmd = DMDLoss()(z_hat, **inputs)
    z = z_hat.clone().requires_grad_(True)
    out = FDistillLoss(divergence=divergence, time_bins=bins)(z, head=head, **inputs)
    with torch.no_grad():
        logits = torch.cat([head(hidden(teacher, noisy(teacher, z_hat[b:b + 1], noise[b:b + 1],
                                                        INDEX[b:b + 1]), INDEX[b:b + 1]))
                            for b in range(B)])
    torch.testing.assert_close(out.ratio_logit, logits, rtol=1e-5, atol=1e-6)
    ratio = [min(max(r, 0.1), 20.0) for r in binned_ratio(logits.clamp(-10, 10), INDEX, None)]
    if bins is not None:  # clip first, then normalise per bin (FastGen's order)
        ratio = binned_ratio(torch.tensor(ratio).log(), INDEX, bins)
    h = torch.tensor([H[divergence](r) for r in ratio])
    torch.testing.assert_close(out.grad, (h / h.mean())[:, None] * dmd.grad, rtol=1e-5,
                               atol=1e-7)
    out.loss.backward()
    assert all(p.grad is None for p in head.parameters())  # r is detached


def test_fastgen_layout_shares_the_sample_and_the_features():
    """FastGen's f-distill: r and the GAN term from the teacher's features at DMD's sample."""
    teacher, fake, head, z_hat, _, noise = make("flow")
    loss = FDistillLoss(gan=GANTerm(role="teacher", index_sampler=None))
    out = loss(z_hat.requires_grad_(True), teacher=teacher, fake=fake, head=head, index=INDEX,
               noise=noise)
    torch.testing.assert_close(out.gan_logit, out.ratio_logit)


@pytest.mark.parametrize("kind", ["flow", "vp"])
def test_head_loss_equals_reference(kind):
    _, fake, head, z_hat, real, _ = make(kind)
    z = z_hat.clone().requires_grad_(True)
    out = GANHeadLoss()(real, z, model=fake, head=head, generator=torch.Generator().manual_seed(4))
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in head.named_parameters()}
    assert z.grad is None  # the samples are detached: the head's loss never trains the student
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fake.parameters())

    g = torch.Generator().manual_seed(4)
    draws = [(UniformIndex(0, 1000)(B, 1000, generator=g), torch.randn(B, D, generator=g))
             for _ in range(2)]
    head.zero_grad()
    logit = {}
    for name, x, (index, noise) in (("real", real, draws[0]), ("fake", z_hat, draws[1])):
        logit[name] = torch.cat([head(hidden(fake, noisy(fake, x[b:b + 1], noise[b:b + 1],
                                                           index[b:b + 1]), index[b:b + 1]))
                                 for b in range(B)])
    # Logistic loss, real = 1: -log(1 - D(fake)) - log D(real), D = sigmoid.
    want = (-(1 - torch.sigmoid(logit["fake"])).log().mean()
            - torch.sigmoid(logit["real"]).log().mean())
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    want.backward()
    for n, p in head.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7)


def test_bad_heads_and_options_are_refused():
    teacher, fake, head, z_hat, _, _ = make("flow")
    with pytest.raises(ValueError, match=r"DMDLoss does not use head=: it has no GAN term"):
        DMDLoss()(z_hat, teacher=teacher, fake=fake, head=head)
    with pytest.raises(ValueError, match=r"DMDLoss needs head=, the discriminator head"):
        DMDLoss(gan=GANTerm())(z_hat, teacher=teacher, fake=fake)
    with pytest.raises(ValueError, match=r"FDistillLoss \(or logit=, the head's logits\) needs"):
        FDistillLoss()(z_hat, teacher=teacher, fake=fake)
    with pytest.raises(ValueError, match=r"head= \(r read from DMD's call\) or logit="):
        FDistillLoss()(z_hat, teacher=teacher, fake=fake, head=head, logit=torch.zeros(B))
    with pytest.raises(ValueError, match=r"GANTerm\(role=...\): expected 'fake' or 'teacher'"):
        GANTerm(role="student")
    with pytest.raises(ValueError, match=r"GANTerm\(weight=...\): expected >= 0"):
        GANTerm(weight=-1e-3)
    with pytest.raises(ValueError, match=r"DMDLoss\(gan=...\): expected a GANTerm"):
        DMDLoss(gan=1e-3)
    with pytest.raises(ValueError, match=r"FDistillLoss\(time_bins=...\)"):
        FDistillLoss(time_bins=0)
    with pytest.raises(ValueError, match=r"takes features \(N, C\) with C = 16, got \(4, 6\)"):
        head(z_hat)
    with pytest.raises(ValueError, match=r"MLPScore has no layer 'net.9'"):
        FDistillLoss(ratio_layer="net.9")(z_hat, teacher=teacher, fake=fake, head=head)
