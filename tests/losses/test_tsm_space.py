"""TSM's direction in flow and epsilon space, against its closed form with an exact teacher.

With shared noise, ``z_hat_t - z_t = (1 - sigma)(z_hat - z)``; with ``Delta x0`` the difference of
the teacher's clean-data estimates at the two inputs and the default ``sigma^2`` weighting,
flow space gives ``sigma [(1 - sigma)(z_hat - z) - Delta x0]`` and epsilon space
``sigma (1 - sigma) [(z_hat - z) - Delta x0]`` (docs/guides/losses-in-your-loop.md).
"""

import torch

from scoredistill import GaussianMixture, TSMLoss

B, D = 8, 4


def setup(index: int, spread: float):
    g = torch.Generator().manual_seed(0)
    teacher = GaussianMixture(torch.tensor([[1.5] * D, [-1.5] * D]), torch.tensor([0.3, 0.3]),
                              torch.tensor([0.5, 0.5]))
    z = teacher.sample(B, g)
    z_hat = z + spread * torch.randn(B, D, generator=g)
    noise = torch.randn(B, D, generator=g)
    return teacher, z_hat, z, noise, torch.full((B,), index)


def directions(teacher, z_hat, z, noise, index):
    kw = dict(teacher=teacher, z=z, index=index, noise=noise)
    return {space: TSMLoss(space=space)(z_hat, None, **kw).grad for space in ("flow", "epsilon")}


def test_flow_and_epsilon_tsm_equal_their_closed_forms():
    for index in (100, 500, 900):
        teacher, z_hat, z, noise, idx = setup(index, 1.0)
        sigma = teacher.schedule.sigmas(idx)
        s = sigma[:, None]
        x0 = [teacher.denoise((1 - s) * x + s * noise, 1 - sigma, sigma) for x in (z_hat, z)]
        delta_x0 = x0[0] - x0[1]
        got = directions(teacher, z_hat, z, noise, idx)
        torch.testing.assert_close(got["flow"], s * ((1 - s) * (z_hat - z) - delta_x0),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["epsilon"], s * (1 - s) * ((z_hat - z) - delta_x0),
                                   rtol=1e-4, atol=1e-5)


def test_at_low_noise_flow_tsm_pushes_away_from_the_target_and_epsilon_does_not():
    # Index 990: sigma = 0.029. Near z (component std s = 0.3) the teacher's x0 is about
    # (1 - sigma^2 / s^2)(z_hat - z) away, so flow space keeps (-sigma + sigma^2 / s^2)(z_hat - z)
    # < 0 (descent moves away from z) while epsilon space keeps only +sigma^2 / s^2 (toward z).
    teacher, z_hat, z, noise, idx = setup(990, 0.05)
    got = directions(teacher, z_hat, z, noise, idx)
    toward = z - z_hat
    assert (torch.cosine_similarity(-got["flow"], toward) < -0.9).all()
    assert (torch.cosine_similarity(-got["epsilon"], toward) > 0.9).all()
