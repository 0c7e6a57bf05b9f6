import torch
from hypothesis import given
from hypothesis import strategies as st

from scoredistill.parametrization import convert, ddim_step, expand_like, from_x0_eps, to_x0_eps
from scoredistill.protocols import PREDICTIONS
from scoredistill.schedules import RectifiedFlow, VariancePreserving, index_alpha_sigma

SCHEDULES = {"flow": RectifiedFlow(shift=3.0), "vp": VariancePreserving()}
kinds = st.sampled_from(PREDICTIONS)


def _setup(schedule_name: str, index: int, seed: int):
    sched = SCHEDULES[schedule_name]
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64).unbind(0)
    idx = torch.tensor([index, 999 - index])
    _, a, s = index_alpha_sigma(sched, idx)
    a, s = expand_like(a.double()[:1].repeat(3), x0), expand_like(s.double()[:1].repeat(3), x0)
    return x0, eps, a, s


# Indices 1..998: epsilon -> x0 divides by alpha, which is exactly 0 at rectified flow's index 0.
@given(st.sampled_from(list(SCHEDULES)), st.integers(1, 998), kinds, kinds, st.integers(0, 99))
def test_convert_round_trips(schedule_name, index, src, dst, seed):
    x0, eps, a, s = _setup(schedule_name, index, seed)
    x_t = a * x0 + s * eps
    pred = from_x0_eps(x0, eps, src, a, s)
    back = convert(convert(pred, src, dst, x_t, a, s), dst, src, x_t, a, s)
    torch.testing.assert_close(back, pred, rtol=1e-6, atol=1e-6)
    # Every kind recovers the exact (x0, eps) that generated x_t.
    x0_hat, eps_hat = to_x0_eps(pred, src, x_t, a, s)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-6, atol=1e-6)


def test_definitions():
    x0, eps, a, s = _setup("vp", 300, 0)
    torch.testing.assert_close(from_x0_eps(x0, eps, "v", a, s), a * eps - s * x0)
    torch.testing.assert_close(from_x0_eps(x0, eps, "flow", a, s), eps - x0)


@given(st.integers(0, 990), st.integers(1, 9), kinds, st.integers(0, 99))
def test_ddim_step_is_euler_for_rectified_flow(index, gap, kind, seed):
    """TSD-SR Eq. (6): x_next = x_t + (sigma_next - sigma) u, whatever the network predicts."""
    sched = SCHEDULES["flow"]
    g = torch.Generator().manual_seed(seed)
    x_t, u = torch.randn(2, 2, 8, generator=g, dtype=torch.float64).unbind(0)
    _, a, s = index_alpha_sigma(sched, torch.tensor([index, index + gap]))
    a, s = a.double(), s.double()
    ca, cs = expand_like(a[:1].repeat(2), x_t), expand_like(s[:1].repeat(2), x_t)
    na, ns = expand_like(a[1:].repeat(2), x_t), expand_like(s[1:].repeat(2), x_t)
    pred = convert(u, "flow", kind, x_t, ca, cs) if index > 0 or kind != "epsilon" else u
    if index == 0 and kind == "epsilon":
        kind = "flow"
    step = ddim_step(x_t, pred, kind, ca, cs, na, ns)
    torch.testing.assert_close(step, x_t + (ns - cs) * u, rtol=1e-6, atol=1e-6)


def test_expand_like_rejects_wrong_batch():
    import pytest

    with pytest.raises(ValueError, match="per-sample"):
        expand_like(torch.ones(3), torch.ones(2, 4))
