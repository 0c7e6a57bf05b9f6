"""Decoupled DMD against a per-sample reference written from its two terms, and against DMD."""

import pytest
import torch
import torch.nn.functional as F

from scoredistill import CFG, DecoupledDMDLoss, DMDLoss, UniformIndex
from tests.losses.test_matching import x0_of
from tests.losses.test_reference import SCALE, B, levels, make
from tests.losses.test_sid import INDEX, mixture

CA_INDEX = torch.tensor([700, 300, 940])


def reference(kind, teacher, fake, z_hat, cond, null, noise, ca_noise, w_dm, w_ca):
    """0.5 * mse(z_hat, z_hat - grad) with grad per sample: w_dm N_dm (F - T_cond) at the DM level
    minus w_ca (SCALE - 1) N_ca (T_cond - T_null) at the CA level, and its autograd gradient."""
    grads = []
    for b in range(B):
        t1, a1, s1 = levels(kind, int(INDEX[b]))
        t2, a2, s2 = levels(kind, int(CA_INDEX[b]))
        x_dm, x_ca = a1 * z_hat[b] + s1 * noise[b], a2 * z_hat[b] + s2 * ca_noise[b]

        def x0(net, x_t, t, c, a, s):
            return x0_of(kind, net(x_t[None], torch.tensor([t]), c[None])[0], x_t, a, s)
        c_dm = x0(teacher, x_dm, t1, cond[b], a1, s1)
        f_dm = x0(fake, x_dm, t1, cond[b], a1, s1)
        c_ca = x0(teacher, x_ca, t2, cond[b], a2, s2)
        u_ca = x0(teacher, x_ca, t2, null[0], a2, s2)
        dm = (f_dm - c_dm) / (z_hat[b] - c_dm).abs().mean()
        ca = (SCALE - 1) * (c_ca - u_ca) / (z_hat[b] - c_ca).abs().mean()
        grads.append(w_dm * dm - w_ca * ca)
    latents = z_hat.clone().requires_grad_(True)
    value = 0.5 * F.mse_loss(latents, (latents - torch.stack(grads)).detach())
    value.backward()
    return value.detach(), latents.grad, torch.stack(grads)


@pytest.mark.parametrize("kind", ["flow", "vp"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.7, 2.0)])
def test_value_and_gradient_equal_reference(kind, weights):
    teacher, fake, z_hat, ca_noise, noise, cond, null = make(kind)
    z = z_hat.clone().requires_grad_(True)
    loss = DecoupledDMDLoss(dm_weight=weights[0], ca_weight=weights[1])
    out = loss(z, cond, teacher=CFG(teacher, SCALE, null), fake=fake, dm_index=INDEX,
               ca_index=CA_INDEX, noise=noise, ca_noise=ca_noise)
    out.loss.backward()
    value, grad, direction = reference(kind, teacher, fake, z_hat, cond, null, noise, ca_noise,
                                       *weights)
    torch.testing.assert_close(out.loss.detach(), value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(z.grad, grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.grad, direction, rtol=1e-5, atol=1e-6)
    assert out.index.tolist() == torch.stack([INDEX, CA_INDEX], 1).tolist()


@pytest.mark.parametrize("kind", ["flow", "vp"])
def test_equal_levels_without_normaliser_is_dmd_with_the_cfg_teacher(kind):
    teacher, fake, z_hat, _, noise, cond, null = make(kind)
    cfg = CFG(teacher, SCALE, null)
    out = DecoupledDMDLoss(normalise=False)(z_hat, cond, teacher=cfg, fake=fake, dm_index=INDEX,
                                           ca_index=INDEX, noise=noise, ca_noise=noise)
    dmd = DMDLoss(sample_weighting=None)(z_hat, cond, teacher=cfg, fake=fake, index=INDEX,
                                         noise=noise)
    torch.testing.assert_close(out.grad, dmd.grad, rtol=1e-5, atol=1e-6)


def test_one_batched_call():
    teacher, fake, z_hat, _, _, cond, null = make("flow")
    DecoupledDMDLoss()(z_hat, cond, teacher=CFG(teacher, SCALE, null), fake=fake,
                       generator=torch.Generator().manual_seed(0))
    assert teacher.batch_sizes == [3 * B] and fake.batch_sizes == [B]


def test_exact_teacher_and_fake_with_scale_one_give_no_gradient():
    # The DM term vanishes when the fake is exact for the student, who samples the teacher's
    # data; the CA term is (alpha - 1)(cond - null): zero at alpha = 1 (and for the
    # unconditional mixture at any alpha). It is not meant to vanish otherwise: it moves the
    # student toward the guided distribution.
    teacher = mixture()
    x = teacher.sample(2000, torch.Generator().manual_seed(1))
    cfg = CFG(teacher, 1.0, None)
    out = DecoupledDMDLoss()(x, None, teacher=cfg, fake=mixture(),
                             generator=torch.Generator().manual_seed(2))
    assert out.grad.abs().max() < 1e-5


def test_options_and_teacher_are_checked():
    with pytest.raises(ValueError, match=r"DecoupledDMDLoss\(ca_weight=...\)"):
        DecoupledDMDLoss(ca_weight=float("nan"))
    with pytest.raises(ValueError, match=r"DecoupledDMDLoss\(surrogate=...\)"):
        DecoupledDMDLoss(surrogate="l2")
    teacher, fake, z_hat, _, _, cond, _ = make("flow")
    with pytest.raises(ValueError, match="needs teacher=CFG"):
        DecoupledDMDLoss()(z_hat, cond, teacher=teacher, fake=fake)


def test_ca_level_must_be_cleaner_than_the_students_input():
    teacher, fake, z_hat, ca_noise, noise, cond, null = make("flow")
    inputs = {"teacher": CFG(teacher, SCALE, null), "fake": fake, "dm_index": INDEX,
              "noise": noise, "ca_noise": ca_noise}
    below = CA_INDEX - 1  # CA_INDEX = (700, 300, 940): each strictly cleaner
    out = DecoupledDMDLoss()(z_hat, cond, ca_index=CA_INDEX, input_index=below, **inputs)
    assert out.index[:, 1].tolist() == CA_INDEX.tolist()
    with pytest.raises(ValueError, match=r"sample 1 has ca_index 300 <= input_index 300"):
        DecoupledDMDLoss()(z_hat, cond, ca_index=CA_INDEX,
                           input_index=torch.tensor([0, 300, 0]), **inputs)
    with pytest.raises(ValueError, match=r"input_index must be an integer tensor of shape"):
        DecoupledDMDLoss()(z_hat, cond, input_index=torch.zeros(3), **inputs)
    # Drawn CA levels are checked too: a sampler above every input level passes.
    DecoupledDMDLoss(ca_index_sampler=UniformIndex(501, 980))(
        z_hat, cond, input_index=torch.full((3,), 500), generator=torch.Generator(), **inputs)
