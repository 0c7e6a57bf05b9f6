"""The ScoreModel contract, checked alike for every adapter (module, every family, LoRA roles)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from families import FAMILIES, Family
from tiny_models import sd3_cond
from torch import nn

from scoredistill import CFG, ScoreModel, VariancePreserving
from scoredistill.adapters import ModuleScoreModel
from scoredistill.conditioning import expand_cond
from scoredistill.parametrization import expand_like, from_x0_eps, to_x0_eps


class TinyDenoiser(nn.Module):
    """A conv net ``(x, t, cond (B, 4)) -> eps`` standing in for any user backbone."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.cond = nn.Linear(4, 4)

    def forward(self, x, t, cond):
        shift = self.cond(cond) + torch.cos(t / 100)[:, None].to(x.dtype)
        return self.conv(x) + shift[:, :, None, None]


@dataclass
class Case:
    """How to build one adapter (weights in ``dtype``) and its inputs of batch B."""

    build: Callable[[torch.dtype], ScoreModel]
    shape: tuple[int, ...]
    cond: Callable[[int, int], object]


def _plain(family: Family) -> Callable[[torch.dtype], ScoreModel]:
    return lambda dtype: family.wrap(family.module().to(dtype))


def _role(family: Family, name: str) -> Callable[[torch.dtype], ScoreModel]:
    def build(dtype: torch.dtype) -> ScoreModel:
        roles = family.roles()
        roles.backbone.module.to(dtype)
        return getattr(roles, name)

    return build


def _module(dtype: torch.dtype) -> ScoreModel:
    torch.manual_seed(0)
    return ModuleScoreModel(TinyDenoiser().to(dtype), "epsilon", VariancePreserving())


def _cond(*shape: int) -> Callable[[int, int], torch.Tensor]:
    return lambda batch, seed: torch.randn(batch, *shape,
                                           generator=torch.Generator().manual_seed(seed))


CASES = {
    "module": Case(_module, (4, 8, 8), _cond(4)),
    **{name: Case(_plain(f), f.shape, f.cond) for name, f in FAMILIES.items()},
    # Every role on SD3; the student (the widest target list, convs on UNets) on every family.
    **{f"lora-sd3-{r}": Case(_role(FAMILIES["sd3"], r), FAMILIES["sd3"].shape, sd3_cond)
       for r in ("teacher", "fake")},
    **{f"lora-{name}-student": Case(_role(FAMILIES[name], "student"), FAMILIES[name].shape,
                                    FAMILIES[name].cond)
       for name in ("sd3", "sd35", "flux-dev", "flux2-dev", "sdxl", "sd2")},
}


@pytest.fixture(params=sorted(CASES))
def case(request) -> Case:
    return CASES[request.param]


def inputs(case: Case, model: ScoreModel, batch: int = 2):
    x = torch.randn(batch, *case.shape, generator=torch.Generator().manual_seed(0))
    t = model.schedule.timesteps(torch.tensor([100, 600, 900][:batch]))
    return x, t, case.cond(batch, 1)


EXPLICIT_X0 = {
    "epsilon": lambda x, a, s, pred: (x - s * pred) / a,
    "v": lambda x, a, s, pred: (a * x - s * pred) / (a**2 + s**2),  # v = a eps - s x0
    "x0": lambda x, a, s, pred: pred,
    "flow": lambda x, a, s, pred: x - s * pred,  # rectified flow: a = 1 - s
}


class TestScoreModelContract:
    def test_protocol_shape_dtype_and_determinism(self, case):
        model = case.build(torch.float32)
        assert isinstance(model, ScoreModel)
        x, t, cond = inputs(case, model)
        with torch.no_grad():
            out, again = model(x, t, cond), model(x, t, cond)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        assert torch.equal(out, again)

    def test_bf16_weights_give_float32_close_to_fp32(self, case):
        x, t, cond = inputs(case, case.build(torch.float32))
        with torch.no_grad():
            ref = case.build(torch.float32)(x, t, cond)
            out = case.build(torch.bfloat16)(x, t, cond)
        assert out.dtype == torch.float32
        assert (out - ref).norm() <= 0.05 * ref.norm()

    def test_x0_round_trip(self, case):
        model = case.build(torch.float32)
        x, t, cond = inputs(case, model)
        with torch.no_grad():
            pred = model(x, t, cond)
        alpha, sigma = (expand_like(c, x) for c in model.schedule.alpha_sigma(t))
        x0, eps = to_x0_eps(pred, model.prediction, x, alpha, sigma)
        # x0 from the kind's defining equation, written out (flow: x_t = (1 - s) x0 + s eps with
        # u = eps - x0, so x0 = x_t - s u): a sign error on both sides of the conversions would
        # still round-trip, but not match this.
        torch.testing.assert_close(x0, EXPLICIT_X0[model.prediction](x, alpha, sigma, pred),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(alpha * x0 + sigma * eps, x, rtol=1e-4, atol=1e-4)
        back = from_x0_eps(x0, eps, model.prediction, alpha, sigma)
        torch.testing.assert_close(back, pred, rtol=1e-4, atol=1e-4)

    def test_cfg_equals_two_separate_calls(self, case):
        model = case.build(torch.float32)
        x, t, cond = inputs(case, model)
        null = case.cond(1, 9)
        null_b = expand_cond(null, x.shape[0])
        with torch.no_grad():
            guided = CFG(model, 3.0, null)(x, t, cond)
            c, u = model(x, t, cond), model(x, t, null_b)
        torch.testing.assert_close(guided, u + 3.0 * (c - u), rtol=1e-5, atol=1e-5)

