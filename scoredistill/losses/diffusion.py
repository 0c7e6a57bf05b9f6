"""The fake-score ("LoRA model") diffusion loss, TSD-SR Eq. (9)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..batching import check_output
from ..conditioning import leaves
from ..guidance import CFG
from ..messages import brief
from ..parametrization import (
    check_alpha_nonzero,
    check_prediction,
    convert,
    expand_like,
    from_x0_eps,
)
from ..protocols import Cond, Prediction, ScoreModel
from ..samplers.timesteps import IndexSampler, UniformIndex
from ..schedules import index_alpha_sigma
from .validation import FiniteChecks, check_inputs, check_option, draw_level
from .weighting import sd3_loss_weight


@dataclass(frozen=True)
class DiffusionOutput:
    """A fake-score step's loss and what a researcher logs.

    Attributes:
        loss: The scalar loss, the mean of ``per_sample``.
        per_sample: The weighted per-sample losses (B,).
        index: The drawn schedule indices (B,).
        timesteps: The network timesteps (B,) at those indices.
    """

    loss: Tensor
    per_sample: Tensor
    index: Tensor
    timesteps: Tensor


@dataclass(frozen=True, kw_only=True)
class DiffusionLoss:
    """Denoising loss fitting the fake score to the student's outputs (TSD-SR Eq. 9; Alg. 1, 27-31).

    ``0.5 * w(sigma) * mean((pred - target)^2)`` in the ``space`` parametrisation. The timestep
    density (``index_sampler``) and the ``loss_weighting`` are kept apart: no random draw ever
    multiplies the loss.

    Called like every loss here: samples first, the model by keyword,
    ``DiffusionLoss()(z_hat.detach(), cond, model=fake)``. ``model`` may be a `CFG`: its guided
    prediction is what is fitted, as SiD-LSG trains its fake score with scale kappa1
    (``DiffusionLoss(space="epsilon")(x0, cond, model=CFG(fake, kappa1, null))``; see
    `SiDLoss`). A prediction of another shape than ``x_t``, or not floating, is a
    ``ValueError`` (never broadcast). Options are checked at construction.

    Attributes:
        space: The parametrisation the loss is taken in (default x0, as the TSD-SR release;
            with ``loss_weighting="sigma_sqrt"`` x0 space equals flow-velocity space).
        loss_weighting: SD3's loss weighting w(sigma), "none", "sigma_sqrt" or "cosmap"
            (`sd3_loss_weight`).
        index_sampler: The timestep density: uniform 50..949 by default; SD3's
            ``LogitNormalIndex``/``ModeIndex``.
        check_finite: Raise on non-finite inputs (ValueError naming x0, noise or cond) or
            predictions (FloatingPointError naming the model); one host sync per call.
    """

    space: Prediction = "x0"
    loss_weighting: str = "none"
    index_sampler: IndexSampler = field(default_factory=UniformIndex)
    check_finite: bool = True

    def __post_init__(self) -> None:
        check_option("DiffusionLoss", "space", lambda: check_prediction(self.space))
        check_option("DiffusionLoss", "loss_weighting",
                     lambda: sd3_loss_weight(self.loss_weighting, torch.ones(1)))
        if not callable(self.index_sampler):
            raise ValueError("DiffusionLoss(index_sampler=...): expected an IndexSampler such as "
                             f"UniformIndex(50, 950), got {brief(self.index_sampler)}")
        if not isinstance(self.check_finite, bool):
            raise ValueError("DiffusionLoss(check_finite=...): expected True or False, got "
                             f"{brief(self.check_finite)}")

    def __call__(self, x0: Tensor, cond: Cond = None, *, model: ScoreModel,
                 index: Tensor | None = None, noise: Tensor | None = None,
                 generator: torch.Generator | None = None) -> DiffusionOutput:
        """Loss of ``model`` on clean samples ``x0`` (B, ...), which are detached.

        Args:
            x0: Clean samples (B, ...), e.g. the student's outputs; detached.
            cond: The condition pytree (batch B).
            model: The fake-score ScoreModel being fitted.
            index: Schedule indices (B,) int64; drawn by ``index_sampler`` when not given.
            noise: The noise (B, ...); drawn with ``generator`` when not given.
            generator: The random generator for whatever is drawn.

        Returns:
            The loss, the per-sample losses and the drawn indices and timesteps.
        """
        space = check_prediction(self.space)
        x0 = x0.detach()
        index, noise = draw_level(x0, model.schedule.num_steps, self.index_sampler, index, noise,
                                  generator)
        check_inputs(x0, None, noise, cond, index, None, x_name="x0")
        t, alpha, sigma = index_alpha_sigma(model.schedule, index)
        if model.prediction == "epsilon" and space != "epsilon":
            check_alpha_nonzero(alpha, "DiffusionLoss")
        a, s = expand_like(alpha, x0), expand_like(sigma, x0)
        x0f, noise = x0.float(), noise.float()
        x_t = a * x0f + s * noise
        raw = check_output(model(x_t, t, cond), x_t, "model")
        weight = sd3_loss_weight(self.loss_weighting, sigma)
        if self.check_finite:
            checks = FiniteChecks()
            checks.note_input("x0", x0)
            checks.note_input("noise", noise)
            checks.note_input("cond", leaves(cond))
            if isinstance(model, CFG):
                checks.note_input("the model's null_cond", leaves(model.null_cond))
            checks.note(weight, ValueError, "non-finite values in the loss weighting "
                        f"{self.loss_weighting!r} at the drawn levels")
            checks.note_model("model", raw)
            checks.raise_first()
        pred = convert(raw.float(), model.prediction, space, x_t, a, s)
        target = from_x0_eps(x0f, noise, space, a, s)
        per_sample = 0.5 * weight * (pred - target).square().flatten(1).mean(1)
        return DiffusionOutput(per_sample.mean(), per_sample, index, t)
