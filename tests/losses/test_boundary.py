"""What the losses refuse: model outputs of the wrong shape or dtype, non-finite values named by
their cause, options checked at construction, and keyword inputs a loss does not use."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from scoredistill import (
    CFG,
    CSDLoss,
    DASMSampler,
    DiffusionLoss,
    DMDLoss,
    RectifiedFlow,
    SDSLoss,
    TSDLoss,
    TSMLoss,
    VSDLoss,
    one_step,
)
from tests.helpers import TinyNet

INDEX = torch.tensor([50, 300, 700, 900])
BIAS = torch.tensor([-25, 0, 10, 24])


@dataclass(eq=False)
class Bent:
    """A TinyNet whose prediction is passed through ``fn`` (cut to a wrong shape, NaN, ...)."""

    net: TinyNet
    fn: Callable[[Tensor], Tensor]

    @property
    def prediction(self):
        return self.net.prediction

    @property
    def schedule(self):
        return self.net.schedule

    def __call__(self, x_t, t, cond):
        return self.fn(self.net(x_t, t, cond))


@dataclass(eq=False)
class Constant:
    """An x0-prediction model that returns ``value`` whatever it is given."""

    value: Tensor
    prediction = "x0"
    schedule = RectifiedFlow()

    def __call__(self, x_t, t, cond):
        return self.value.clone()


@pytest.fixture
def d():
    g = torch.Generator().manual_seed(0)
    # (B, 2, 3) latents, so an output with one channel would broadcast against them.
    z_hat, z, noise = torch.randn(3, 4, 2, 3, generator=g).unbind(0)
    teacher, fake = (TinyNet("flow", RectifiedFlow(), seed=s) for s in (0, 1))
    return dict(teacher=teacher, fake=fake, z_hat=z_hat, z=z, noise=noise,
                cond=torch.randn(4, 3, generator=g), null=torch.randn(1, 3, generator=g))


def one_channel(x):
    return x[:, :1]


def batch_one(x):
    return x[:1]


def nan(x):
    return x * math.nan


def tsd(d, loss=None, **over):
    kw = dict(teacher=d["teacher"], fake=d["fake"], z=d["z"], index=INDEX, noise=d["noise"],
              dasm_bias=BIAS)
    kw.update(over)
    return (loss or TSDLoss(dasm=DASMSampler()))(d["z_hat"], d["cond"], **kw)


# --- Model outputs: shape and dtype, never broadcast ---------------------------------------------


@pytest.mark.parametrize("fn", [one_channel, batch_one])
def test_diffusion_model_output_of_another_shape_is_refused(d, fn):
    with pytest.raises(ValueError, match=r"the model returned a prediction of shape \((1|4), "):
        DiffusionLoss()(d["z_hat"], d["cond"], model=Bent(d["fake"], fn), index=INDEX)


def test_vsd_fake_of_batch_one_is_refused(d):
    with pytest.raises(ValueError) as info:
        VSDLoss()(d["z_hat"], d["cond"], teacher=d["teacher"], fake=Bent(d["fake"], batch_one),
                  index=INDEX)
    assert "the fake returned a prediction of shape (1, 2, 3) for x_t of shape (4, 2, 3)" in str(
        info.value)


@pytest.mark.parametrize("fn", [one_channel, batch_one])
def test_tsd_teacher_of_another_shape_is_refused_in_its_batched_call(d, fn):
    # The teacher is called on z_hat_t and z_t at once (batch 8): a batch-1 output used to die
    # inside torch.split, a one-channel output to broadcast into a finite loss.
    with pytest.raises(ValueError) as info:
        tsd(d, teacher=Bent(d["teacher"], fn))
    message = str(info.value)
    assert message.startswith("the teacher (one call for 2 evaluations) returned a prediction")
    assert "x_t of shape (8, 2, 3)" in message


def test_a_cfg_teacher_and_the_fake_are_named_through_the_wrapper(d):
    with pytest.raises(ValueError, match="the teacher returned a prediction of shape"):
        tsd(d, loss=VSDLoss(), z=None, dasm_bias=None,
            teacher=CFG(Bent(d["teacher"], one_channel), 2.0, d["null"]))
    with pytest.raises(ValueError, match="the fake returned a prediction of shape"):
        tsd(d, loss=VSDLoss(), z=None, dasm_bias=None, fake=Bent(d["fake"], one_channel))


def test_integer_and_non_tensor_outputs_are_refused(d):
    with pytest.raises(ValueError, match=r"the fake returned a torch\.int64 prediction"):
        tsd(d, fake=Bent(d["fake"], lambda x: x.long()))
    tuple_out = Bent(d["teacher"], lambda x: (x,))
    with pytest.raises(ValueError, match=r"the teacher \(one call for 2 evaluations\) returned a "
                                         "tuple, not a tensor"):
        tsd(d, loss=TSMLoss(), fake=None, dasm_bias=None, teacher=tuple_out)


def test_one_step_student_of_another_shape_is_refused(d):
    with pytest.raises(ValueError, match=r"the student returned a prediction of shape \(1, 2, 3\)"):
        one_step(Bent(d["teacher"], batch_one), d["z_hat"], d["cond"])


# --- Non-finite values: the cause is named -------------------------------------------------------


def test_nan_cond_is_named(d):
    with pytest.raises(ValueError, match="non-finite values in cond"):
        TSDLoss()(d["z_hat"], d["cond"] * math.nan, teacher=d["teacher"], fake=d["fake"], z=d["z"])
    with pytest.raises(ValueError, match="non-finite values in cond"):
        DiffusionLoss()(d["z_hat"], d["cond"] * math.nan, model=d["fake"])


def test_nan_null_cond_is_named(d):
    with pytest.raises(ValueError, match="non-finite values in the teacher's null_cond"):
        tsd(d, teacher=CFG(d["teacher"], 2.0, d["null"] * math.nan))


def test_teacher_and_fake_nan_are_named_apart(d):
    with pytest.raises(FloatingPointError) as info:
        tsd(d, teacher=Bent(d["teacher"], nan))
    assert "the teacher returned nan" in str(info.value).lower()
    assert "fake" not in str(info.value)
    with pytest.raises(FloatingPointError) as info:
        tsd(d, fake=Bent(d["fake"], nan))
    assert "the fake returned nan" in str(info.value).lower()
    assert "teacher" not in str(info.value)


class LateNaN(Bent):
    """NaN at timesteps below 500 only: finite at the start of a trajectory, NaN later."""

    def __call__(self, x_t, t, cond):
        return torch.where((t < 500)[:, None], math.nan, self.net(x_t, t, cond))


def test_fake_nan_at_a_later_dasm_point_is_the_fakes():
    # The teacher evaluated after the fake's NaN step is NaN too, but not blamed.
    teacher, fake = (TinyNet("flow", RectifiedFlow(), seed=s) for s in (0, 1))
    z_hat, z = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(1)).unbind(0)
    # From index 700 (t = 562) the points are 700, 750, 800 (t = 429) and 850.
    with pytest.raises(FloatingPointError, match=r"the fake's prediction at DASM point 2 "):
        TSDLoss(dasm=DASMSampler())(z_hat, None, teacher=teacher, fake=LateNaN(fake, None), z=z,
                                    index=torch.full((4,), 700), dasm_bias=torch.zeros(4).long())


def test_nan_time_weighting_is_named(d):
    loss = TSDLoss(time_weighting=lambda alpha, sigma: sigma * math.nan)
    with pytest.raises(ValueError, match="non-finite values in the time weighting"):
        tsd(d, loss=loss, dasm_bias=None)


def test_dmd_normaliser_dividing_by_zero_is_named(d):
    # The teacher's x0 equals z_hat: mean |z_hat - teacher_x0| = 0.
    teacher, fake = Constant(d["z_hat"]), Constant(d["z"])
    with pytest.raises(FloatingPointError, match="DMD's normaliser"):
        DMDLoss()(d["z_hat"], teacher=teacher, fake=fake, index=INDEX)


# --- Options checked at construction, with the allowed values ------------------------------------


@pytest.mark.parametrize(("build", "words"), [
    (lambda: TSDLoss(space="eps"), ("TSDLoss(space=...)", "'eps'", "epsilon")),
    (lambda: TSDLoss(time_weighting="sigma^2"), ("TSDLoss(time_weighting=...)", "sigma2")),
    (lambda: DMDLoss(sample_weighting="dmd2"), ("DMDLoss(sample_weighting=...)", "'dmd'")),
    (lambda: SDSLoss(dasm=DASMSampler()), ("SDSLoss(dasm=...)", "dasm=None")),
    (lambda: VSDLoss(surrogate="sum"), ("VSDLoss(surrogate=...)", "half_mse", "mse")),
    (lambda: VSDLoss(dasm=4), ("VSDLoss(dasm=...)", "DASMSampler")),
    (lambda: VSDLoss(index_sampler=(50, 950)), ("VSDLoss(index_sampler=...)", "UniformIndex")),
    (lambda: VSDLoss(check_finite="yes"), ("VSDLoss(check_finite=...)",)),
    (lambda: DMDLoss(scale=math.nan), ("DMDLoss", "vsd coefficient", "finite")),
    (lambda: CSDLoss(scale="2"), ("CSDLoss", "csd coefficient")),
    (lambda: TSDLoss(lam=math.nan), ("lambda must be in [0, 1]",)),
    (lambda: DiffusionLoss(space="eps"), ("DiffusionLoss(space=...)", "epsilon")),
    (lambda: DiffusionLoss(loss_weighting="logit"), ("DiffusionLoss(loss_weighting=...)",
                                                     "sigma_sqrt")),
])
def test_options_are_checked_at_construction(build, words):
    with pytest.raises(ValueError) as info:
        build()
    for word in words:
        assert word in str(info.value), (word, str(info.value))


# --- Keyword inputs a loss does not use ----------------------------------------------------------


@pytest.mark.parametrize(("loss", "name"), [
    (DMDLoss(), "z"), (SDSLoss(), "z"), (CSDLoss(), "z"), (VSDLoss(), "z"),
    (SDSLoss(), "fake"), (TSMLoss(), "fake"), (CSDLoss(), "fake"), (VSDLoss(), "dasm_bias"),
])
def test_an_unused_keyword_input_is_an_error(d, loss, name):
    given = dict(teacher=CFG(d["teacher"], 1.0, d["null"]), fake=d["fake"], z=d["z"],
                 dasm_bias=BIAS)
    kw = loss.select_inputs(**given)
    assert name not in kw and name not in loss.uses
    kw[name] = given[name]
    with pytest.raises(ValueError, match=f"{type(loss).__name__} does not use {name}="):
        loss(d["z_hat"], d["cond"], index=INDEX, **kw)


def test_uses_lists_what_each_loss_reads():
    assert TSDLoss().uses == {"fake", "z"}
    assert TSDLoss(dasm=DASMSampler()).uses == {"fake", "z", "dasm_bias"}
    assert TSMLoss(dasm=DASMSampler()).uses == {"fake", "z", "dasm_bias"}
    assert TSMLoss().uses == {"z"} and SDSLoss().uses == frozenset()
    assert DMDLoss().uses == {"fake"} and CSDLoss().uses == frozenset()


def test_all_finiteness_checks_are_read_with_one_host_sync(d, monkeypatch):
    # Inputs, weights and every point's teacher and fake outputs: one .tolist() per call.
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or tolist(self))
    tsd(d, teacher=CFG(d["teacher"], 2.0, d["null"]))
    assert len(reads) == 1
    tsd(d, loss=TSDLoss(dasm=DASMSampler(), check_finite=False))
    assert len(reads) == 1
