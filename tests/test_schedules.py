import inspect
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from scoredistill.schedules import (
    RectifiedFlow,
    VariancePreserving,
    empirical_shift,
    index_alpha_sigma,
    resolution_shift,
)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_rectified_flow_table_matches_diffusers(shift):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift, num_train_timesteps=1000)
    idx = torch.arange(1000)
    rf = RectifiedFlow(shift=shift)
    torch.testing.assert_close(rf.timesteps(idx), ref.timesteps.float(), rtol=0, atol=2e-4)
    torch.testing.assert_close(rf.sigmas(idx), ref.sigmas[:1000].float(), rtol=0, atol=2e-7)
    # The paper's DASM range: index 50 is near pure noise, 949 near clean data.
    assert rf.timesteps(torch.tensor([0]))[0] == 1000


def test_vp_matches_diffusers_ddpm():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                  beta_end=0.012)
    vp = VariancePreserving.from_diffusers(ref.config)
    assert torch.equal(vp.alphas_cumprod, ref.alphas_cumprod)  # diffusers' own float32 table
    assert vp == VariancePreserving()
    t, a, _s = index_alpha_sigma(vp, torch.tensor([0, 999]))
    assert t.tolist() == [999.0, 0.0]
    torch.testing.assert_close(a**2, ref.alphas_cumprod[[999, 0]].float())


VP_SCHEDULERS = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                 "DPMSolverMultistepScheduler"]
VP_CONFIGS = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
         rescale_betas_zero_snr=True),
    dict(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True, num_train_timesteps=500),
]


@pytest.mark.parametrize("name", VP_SCHEDULERS)
@pytest.mark.parametrize("kwargs", VP_CONFIGS, ids=lambda k: "-".join(map(str, k.values())))
def test_vp_from_any_diffusers_scheduler(name, kwargs):
    diffusers = pytest.importorskip("diffusers")
    cls = getattr(diffusers, name)
    if "rescale_betas_zero_snr" in kwargs and (
            "rescale_betas_zero_snr" not in inspect.signature(cls.__init__).parameters):
        pytest.skip(f"{name} has no rescale_betas_zero_snr")
    ref = cls(**kwargs)
    from_object = VariancePreserving.from_diffusers(ref)
    from_config = VariancePreserving.from_diffusers({**ref.config, "_class_name": name})
    assert torch.equal(from_object.alphas_cumprod, ref.alphas_cumprod.float())
    assert from_config == from_object
    assert from_object.num_steps == kwargs.get("num_train_timesteps", 1000)
    _t, a, s = index_alpha_sigma(from_object, torch.arange(from_object.num_steps))
    assert bool((s.diff() <= 0).all())  # index 0 is still the noisiest level
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(a))


def test_vp_zero_terminal_snr_is_exact():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True)
    vp = VariancePreserving.from_diffusers(ref)
    # The issue: the old reader ignored the flag and ended at 0.00635 instead of 0.
    assert float(vp.alphas_cumprod[-1]) == 0.0
    _t, a, s = index_alpha_sigma(vp, torch.tensor([0]))
    assert (float(a), float(s)) == (0.0, 1.0)


def test_vp_refuses_flow_matching():
    diffusers = pytest.importorskip("diffusers")
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    for source in (flow, flow.config, {**flow.config, "_class_name": type(flow).__name__}):
        with pytest.raises(ValueError, match="RectifiedFlow"):
            VariancePreserving.from_diffusers(source)
    with pytest.raises(ValueError, match="no scheduler class 'NotAScheduler'"):
        VariancePreserving.from_diffusers({"_class_name": "NotAScheduler"})


@given(st.sampled_from([RectifiedFlow(), VariancePreserving()]),
       st.lists(st.integers(0, 999), min_size=1, max_size=8))
def test_index_order_and_identities(sched, indices):
    idx = torch.tensor(sorted(indices))
    _t, a, s = index_alpha_sigma(sched, idx)
    # Index grows toward clean data: sigma never increases.
    assert bool((s.diff() <= 0).all())
    if isinstance(sched, RectifiedFlow):
        torch.testing.assert_close(a + s, torch.ones_like(a))
    else:
        torch.testing.assert_close(a**2 + s**2, torch.ones_like(a))


@pytest.mark.parametrize("sched", [RectifiedFlow(), VariancePreserving()])
def test_bad_indices_are_rejected(sched):
    with pytest.raises(ValueError, match="out of range"):
        sched.timesteps(torch.tensor([1000]))
    with pytest.raises(ValueError, match="integers"):
        sched.timesteps(torch.tensor([1.5]))


def test_vp_rejects_fractional_timesteps_and_bad_tables():
    with pytest.raises(ValueError, match="integer-valued"):
        VariancePreserving().alpha_sigma(torch.tensor([10.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        VariancePreserving(alphas_cumprod=torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        VariancePreserving(alphas_cumprod=torch.tensor([0.5, -0.1]))


@pytest.mark.parametrize("shift", [-1.0, 0.0, 0, math.nan, math.inf, -math.inf, True, "3"])
def test_rectified_flow_refuses_a_shift_that_is_not_finite_and_positive(shift):
    # shift -1 gave sigma 1.5 at index 250 and -inf at index 500.
    with pytest.raises(ValueError, match="RectifiedFlow shift must be a finite number > 0"):
        RectifiedFlow(shift=shift)


def test_numpy_shifts_and_steps_are_accepted_and_bad_step_counts_refused():
    assert RectifiedFlow(shift=np.float32(3.0), num_steps=np.int64(1000)).num_steps == 1000
    for steps in (0, 1000.0, True):
        with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
            RectifiedFlow(num_steps=steps)


@pytest.mark.parametrize(("call", "words"), [
    (lambda: resolution_shift(4096, max_shift=math.nan), "resolution_shift(4096"),
    (lambda: resolution_shift(10**9), "resolution_shift(1000000000"),
    (lambda: resolution_shift(4096, base_shift=-2000.0, max_shift=-2000.0), "got 0.0"),
    (lambda: empirical_shift(10**9, 50), "empirical_shift(1000000000, 50)"),
])
def test_computed_shifts_are_checked(call, words):
    with pytest.raises(ValueError, match="must be a finite number > 0") as info:
        call()
    assert words in str(info.value)


def test_schedule_reprs_are_short():
    text = repr(VariancePreserving())
    assert text == "VariancePreserving(num_steps=1000, alphas_cumprod 0.99915..0.0046601)"
    assert repr(RectifiedFlow()) == "RectifiedFlow(shift=3.0, num_steps=1000)"
