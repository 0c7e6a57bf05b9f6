from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from scoredistill import RectifiedFlow, VariancePreserving, one_step
from scoredistill.parametrization import expand_like, from_x0_eps
from scoredistill.protocols import PREDICTIONS, NoiseSchedule, Prediction

# Zero terminal SNR (Lin et al. 2024): abar ends at 0, so alpha = 0 at index 0.
ZERO_SNR = VariancePreserving(alphas_cumprod=torch.cat([
    VariancePreserving().alphas_cumprod[:-1], torch.zeros(1)]))
SCHEDULES = {"flow": RectifiedFlow(shift=3.0), "vp": VariancePreserving(), "zero-snr": ZERO_SNR}


@dataclass(eq=False)
class Oracle:
    """Predicts, in its own parametrisation, exactly the pair (target, eps implied by x_t)."""

    prediction: Prediction
    schedule: NoiseSchedule
    target: torch.Tensor
    times: list = field(default_factory=list)

    def __call__(self, x_t, t, cond):
        self.times.append(t)
        a, s = (expand_like(v.double(), x_t) for v in self.schedule.alpha_sigma(t))
        eps = (x_t.double() - a * self.target) / s
        return from_x0_eps(self.target, eps, self.prediction, a, s).float()


@given(st.sampled_from(list(SCHEDULES)), st.sampled_from(PREDICTIONS), st.integers(0, 999),
       st.integers(0, 99))
def test_one_step_returns_the_x0_the_prediction_implies(name, kind, index, seed):
    schedule = SCHEDULES[name]
    alpha, _ = schedule.alpha_sigma(schedule.timesteps(torch.tensor([index])))
    g = torch.Generator().manual_seed(seed)
    x, target = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64).unbind(0)
    model = Oracle(kind, schedule, target)
    if kind == "epsilon" and float(alpha) == 0:
        with pytest.raises(ValueError, match="alpha = 0"):
            one_step(model, x.float(), index=index)
        return
    out = one_step(model, x.float(), index=index)
    # epsilon divides by alpha: its float32 error grows as sigma / alpha (14.6x at SD's index 0).
    tol = 2e-5 if kind != "epsilon" else 2e-5 / float(alpha)
    torch.testing.assert_close(out.double(), target, rtol=0, atol=tol)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(model.times[0], schedule.timesteps(torch.tensor([index] * 3)))


def test_one_step_is_tsdsr_generator_on_sd3():
    """SD3 (flow, t = 1000, sigma = 1): z_hat = z_L - v(z_L, 1000, c), TSD-SR Sec. 3.2."""
    pytest.importorskip("diffusers")
    from scoredistill.adapters import SD3ScoreModel
    from tests.adapters.tiny_models import LATENT, tiny_sd3_transformer

    model = SD3ScoreModel(tiny_sd3_transformer())
    g = torch.Generator().manual_seed(0)
    z_lq = torch.randn(2, *LATENT, generator=g)
    cond = (torch.randn(2, 5, 32, generator=g), torch.randn(2, 64, generator=g))
    with torch.no_grad():
        expected = z_lq - model(z_lq, torch.full((2,), 1000.0), cond)
        torch.testing.assert_close(one_step(model, z_lq, cond), expected, rtol=0, atol=1e-6)


def test_one_step_rejects_bad_index_and_prediction():
    model = Oracle("flow", RectifiedFlow(), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="out of range"):
        one_step(model, torch.zeros(1, 2), index=1000)
    model.prediction = "score"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="unknown prediction"):
        one_step(model, torch.zeros(1, 2))
