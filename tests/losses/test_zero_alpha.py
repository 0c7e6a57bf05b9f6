"""Where an epsilon prediction would be divided by alpha = 0, the losses refuse clearly."""

import pytest
import torch

from scoredistill import DASMSampler, DiffusionLoss, RectifiedFlow, TSDLoss, VariancePreserving
from tests.helpers import TinyNet

# Zero terminal SNR: abar = 0 at the noisiest step, i.e. at schedule index 0.
ZERO_SNR = VariancePreserving(alphas_cumprod=torch.cat([
    VariancePreserving().alphas_cumprod[:-1], torch.zeros(1)]))


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g), torch.randn(
        2, 3, generator=g)


@pytest.mark.parametrize("schedule", [ZERO_SNR, RectifiedFlow()], ids=["zero-snr-vp", "flow"])
def test_diffusion_loss_refuses_epsilon_at_alpha_zero(schedule):
    x0, noise, cond = _inputs()
    net = TinyNet("epsilon", schedule)
    with pytest.raises(ValueError, match="alpha = 0"):
        DiffusionLoss()(x0, cond, model=net, index=torch.tensor([0, 5]), noise=noise)
    out = DiffusionLoss()(x0, cond, model=net, index=torch.tensor([1, 5]), noise=noise)
    assert bool(torch.isfinite(out.per_sample).all())
    # In epsilon space nothing is divided by alpha: index 0 is a valid (if uninformative) target.
    eps_space = DiffusionLoss(space="epsilon")(x0, cond, model=net, index=torch.tensor([0, 5]),
                                               noise=noise)
    assert bool(torch.isfinite(eps_space.per_sample).all())


def test_v_prediction_at_alpha_zero_is_fine():
    x0, noise, cond = _inputs()
    out = DiffusionLoss()(x0, cond, model=TinyNet("v", ZERO_SNR), index=torch.tensor([0, 0]),
                          noise=noise)
    assert bool(torch.isfinite(out.per_sample).all())


def test_tsd_refuses_epsilon_models_at_alpha_zero():
    z_hat, z, cond = _inputs()
    teacher, fake = TinyNet("epsilon", ZERO_SNR), TinyNet("epsilon", ZERO_SNR, seed=1)
    loss = TSDLoss(dasm=DASMSampler(num_points=2, step=10, weights=(1.0, 0.5), bias=(0, 1)))
    with pytest.raises(ValueError, match="alpha = 0"):
        loss(z_hat, cond, teacher=teacher, fake=fake, z=z, index=torch.tensor([0, 20]))
    out = loss(z_hat, cond, teacher=teacher, fake=fake, z=z, index=torch.tensor([1, 20]))
    assert bool(torch.isfinite(out.grad).all())
