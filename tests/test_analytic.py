import math

import pytest
import torch

from scoredistill import GaussianMixture, RectifiedFlow, VariancePreserving
from tests.helpers import check_denoiser_against_monte_carlo


def mixture(schedule, prediction, dtype=torch.float64):
    return GaussianMixture(
        means=torch.tensor([[2.0, 0.0, 1.0], [-1.5, 1.0, 0.0], [0.0, -2.0, -1.0]], dtype=dtype),
        stds=torch.tensor([0.3, 0.6, 0.45], dtype=dtype),
        weights=torch.tensor([0.5, 0.3, 0.2], dtype=dtype),
        schedule=schedule, prediction=prediction)


@pytest.mark.parametrize(("schedule", "prediction"), [
    (RectifiedFlow(), "flow"), (VariancePreserving(), "epsilon"), (VariancePreserving(), "v")])
@pytest.mark.parametrize("index", [100, 500, 900])
def test_denoiser_matches_monte_carlo_posterior_mean(schedule, prediction, index):
    """E[x0 | x_t] by self-normalised importance sampling from the prior."""
    check_denoiser_against_monte_carlo(mixture(schedule, prediction), schedule, prediction,
                                       index, 3)


def test_flow_velocity_is_monte_carlo_mean_of_eps_minus_x0():
    gm = mixture(RectifiedFlow(), "flow")
    g = torch.Generator().manual_seed(1)
    n = 200_000
    x0 = gm.sample(n, g)
    eps = torch.randn(n, 3, generator=g, dtype=torch.float64)
    s = 0.5
    x_t = (1 - s) * x0 + s * eps
    u = gm(x_t, torch.full((n,), 500.0))
    # Orthogonality of the regression residual to functions of x_t: E[(eps - x0 - u) f(x_t)] = 0.
    resid = eps - x0 - u
    for f in (torch.ones_like(x_t[:, :1]), x_t, torch.tanh(x_t)):
        assert (resid * f).mean(0).abs().max() < 5 * (resid * f).std(0).max() / math.sqrt(n)
    # And the residual is smaller than with a wrong (Gaussian) denoiser.
    assert resid.square().mean() < (eps - x0 - x_t).square().mean()


def test_log_prob_is_normalised_and_sample_stats():
    gm = mixture(RectifiedFlow(), "flow")
    g = torch.Generator().manual_seed(2)
    # Importance sampling from a wide Gaussian q: E_q[p / q] = 1 when p integrates to 1.
    q = torch.distributions.Normal(torch.zeros(3, dtype=torch.float64), 3.0)
    x = 3.0 * torch.randn(400_000, 3, generator=g, dtype=torch.float64)
    ratio = (gm.log_prob(x) - q.log_prob(x).sum(1)).exp()
    assert abs(float(ratio.mean()) - 1) < 5 * float(ratio.std()) / 400_000**0.5
    x = gm.sample(200_000, g)
    torch.testing.assert_close(x.mean(0), (gm.weights[:, None] * gm.means).sum(0), atol=0.02,
                               rtol=0)


def test_bad_mixture_parameters_are_rejected():
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture(torch.zeros(2, 2), torch.ones(2), torch.tensor([0.5, 0.6]))
    # Negative or NaN weights gave a NaN denoiser at every call.
    for bad in ([1.5, -0.5], [math.nan, 1.0]):
        with pytest.raises(ValueError, match=r"mixture weights must be finite and >= 0, got \["):
            GaussianMixture(torch.zeros(2, 2), torch.ones(2), torch.tensor(bad))
    with pytest.raises(ValueError, match="expected means"):
        GaussianMixture(torch.zeros(2, 2), torch.ones(3), torch.tensor([0.5, 0.5]))
    gm = GaussianMixture(torch.zeros(2, 2), torch.ones(2), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="3 features"):
        gm(torch.zeros(1, 3), torch.tensor([10.0]))
