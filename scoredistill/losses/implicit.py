"""SiD and SIM: losses whose gradient runs through the teacher's and fake score's predictions.

Every other loss of the library treats the predictions as constants (a surrogate with a detached
direction). Score identity Distillation and Score Implicit Matching differentiate the predictions
with respect to their input ``x_t = alpha_t x + sigma_t eps``: the teacher's and fake score's
calls are made with autograd on, in one batched (fused) call, and their Jacobians reach the
student's output ``x`` by ``torch.autograd.grad`` with respect to ``x`` alone, so no parameter of
either model receives a gradient. The result is returned as a scalar whose value is the method's
loss and whose gradient w.r.t. ``x`` is the method's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..batching import predict_batched
from ..conditioning import leaves
from ..guidance import CFG
from ..messages import brief
from ..parametrization import check_alpha_nonzero, expand_like, to_x0_eps
from ..protocols import Cond, ScoreModel
from ..samplers.timesteps import IndexSampler, UniformIndex, check_number
from ..schedules import index_alpha_sigma
from .distill import DistillOutput
from .validation import FakeOnlyInputs, FiniteChecks, check_inputs, check_option, draw_level
from .weighting import Weighting, distill_weighting


def _non_negative(owner: str, name: str, value: float) -> None:
    check_option(owner, name, lambda: check_number(value, name))
    if value < 0:
        raise ValueError(f"{owner}({name}=...): {name} must be >= 0, got {value}")


# Why SiD and SIM take no DASM trajectory. Their gradient identity (SiD Thm. 1, SIM's
# score-divergence gradient theorem) needs x_t drawn from q(x_t | x) = N(alpha_t x, sigma_t^2):
# it is where f_f = E[x | x_t] (Tweedie) and grad log q(x_t | x) = -(x_t - alpha_t x) / sigma_t^2
# hold. A DASM point after the first is a DDIM step of the fake from the first point, whose law
# given x is not q(x_t | x), so both losses would lose the identity that makes their expected
# gradient the divergence's; a single point is what index_sampler already draws.
DASM_REFUSAL = ("SiD and SIM rest on x_t drawn from q(x_t | x) (Tweedie's E[x | x_t] and "
                "grad log q(x_t | x)); a DASM point after the first is a DDIM step of the fake, "
                "not such a draw, so they take no DASM trajectory")


@dataclass(frozen=True, kw_only=True)
class InputGradientLoss(FakeOnlyInputs):
    """Base of SiD and SIM: ``objective(x, f_r, f_f)`` with its gradient through both models.

    ``f_r``, ``f_f`` are the teacher's and fake score's x0 predictions at ``x_t = alpha_t x +
    sigma_t eps`` (any parametrisation and schedule, converted with `to_x0_eps`; a CFG teacher is
    guided in its own parametrisation first). The value returned is
    ``mean over all elements of w(t) * objective`` and its gradient w.r.t. ``x`` is the exact one,
    through ``f_r(x_t)`` and ``f_f(x_t)`` (both calls in one `predict_batched` call, per-sample
    timesteps) but into neither model's parameters.

    Attributes:
        time_weighting: w(t) by name ("uniform", "sigma", "sigma2") or a callable
            ``(alpha, sigma) -> (B,)``.
        index_sampler: The per-sample index (B,) into ``teacher.schedule`` (default DMD2's
            20..979 of 1000).
        check_finite: Raise on non-finite inputs (ValueError) or model outputs and normalisers
            (FloatingPointError), one host sync per call.
        dasm: Refused unless None (`DASM_REFUSAL`): both losses rest on ``x_t ~ q(x_t | x)``.
    """

    time_weighting: str | Weighting = "uniform"
    index_sampler: IndexSampler = field(default_factory=lambda: UniformIndex(20, 980))
    check_finite: bool = True
    dasm: None = None

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if self.dasm is not None:
            raise ValueError(f"{owner}(dasm=...): {DASM_REFUSAL}; use dasm=None")
        check_option(owner, "time_weighting", lambda: distill_weighting(self.time_weighting))
        if not callable(self.index_sampler):
            raise ValueError(f"{owner}(index_sampler=...): expected an IndexSampler such as "
                             f"UniformIndex(20, 980), got {brief(self.index_sampler)}")
        if not isinstance(self.check_finite, bool):
            raise ValueError(f"{owner}(check_finite=...): expected True or False, got "
                             f"{brief(self.check_finite)}")

    name = "implicit"

    def objective(self, x: Tensor, f_r: Tensor, f_f: Tensor, checks: FiniteChecks | None
                  ) -> Tensor:
        """The per-element loss (B, ...) whose sum over a sample is the method's loss."""
        raise NotImplementedError

    def __call__(
        self, z_hat: Tensor, cond: Cond = None, *, teacher: ScoreModel, fake: ScoreModel,
        index: Tensor | None = None, noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> DistillOutput:
        """The loss for the student's output ``z_hat`` (B, ...), differentiable w.r.t. it.

        Args:
            z_hat: The student's output (B, ...); the gradient flows to it only.
            cond: The condition pytree (batch B).
            teacher: The teacher ScoreModel (a `CFG` is guided in its own parametrisation).
            fake: The fake-score model.
            index: Indices (B,) int64 into ``teacher.schedule``; drawn when None.
            noise: The injected noise (B, ...); drawn when None.
            generator: The generator for what is drawn.

        Returns:
            A `DistillOutput`: ``loss`` the method's value with its exact gradient w.r.t.
            ``z_hat``; ``grad`` is ``numel * d loss / d z_hat`` (the other losses' convention:
            their ``half_mse`` surrogate has gradient ``grad / numel``); ``index``,
            ``timesteps``, ``sigmas`` (B, 1).

        Raises:
            ValueError: A missing fake, mismatched schedules or inputs, or a model whose
                prediction carries no gradient w.r.t. its input.
            FloatingPointError: A non-finite model output or normaliser.
        """
        owner = type(self).__name__
        if fake is None:
            raise ValueError(f"{owner} needs a fake-score model `fake`")
        schedule = teacher.schedule
        if fake.schedule != schedule:
            raise ValueError("teacher and fake must share one noise schedule")
        index, noise = draw_level(z_hat, schedule.num_steps, self.index_sampler, index, noise,
                                  generator)
        check_inputs(z_hat, None, noise, cond, index, None)
        t, alpha, sigma = index_alpha_sigma(schedule, index)
        if any(m.prediction == "epsilon" for m in (teacher, fake)):
            check_alpha_nonzero(alpha, owner)
        checks = FiniteChecks() if self.check_finite else None
        if checks is not None:
            checks.note_input("z_hat", z_hat)
            checks.note_input("noise", noise)
            checks.note_input("cond", leaves(cond))
            for role, model in (("teacher", teacher), ("fake", fake)):
                if isinstance(model, CFG):
                    checks.note_input(f"the {role}'s null_cond", leaves(model.null_cond))
        w = distill_weighting(self.time_weighting)(alpha, sigma)
        if checks is not None:
            checks.note(w, ValueError, "non-finite values in the time weighting "
                        "w(alpha, sigma) at the drawn levels (time_weighting)")

        x = z_hat.detach().float().requires_grad_(True)
        a, s = expand_like(alpha, x), expand_like(sigma, x)
        with torch.enable_grad():
            x_t = a * x + s * noise.float()
            roles = ["teacher", "fake"]
            preds = predict_batched([(teacher, x_t, t, cond), (fake, x_t, t, cond)], roles)
            for role, pred in zip(roles, preds, strict=True):
                if not pred.requires_grad:
                    raise ValueError(f"{owner}: the {role}'s prediction carries no gradient "
                                     "w.r.t. its input x_t (is it run under torch.no_grad or "
                                     "detached inside?); SiD/SIM differentiate through it")
                if checks is not None:
                    checks.note_model(role, pred.detach())
            f_r = to_x0_eps(preds[0].float(), teacher.prediction, x_t, a, s)[0]
            f_f = to_x0_eps(preds[1].float(), fake.prediction, x_t, a, s)[0]
            per_element = expand_like(w, x) * self.objective(x, f_r, f_f, checks)
            value = per_element.mean()
        if checks is not None:
            checks.note(value.detach(), FloatingPointError,
                        f"non-finite {owner} value although every input, weight and model "
                        "output is finite (float32 overflow?)")
            checks.raise_first()
        (dx,) = torch.autograd.grad(value, x)
        # Value: the method's loss; gradient w.r.t. z_hat: dx (detached, so nothing flows into
        # the models' parameters when the caller backpropagates).
        zf = z_hat.float()
        loss = value.detach() + ((zf - zf.detach()) * dx).sum()
        grad = dx * x.numel()
        index2 = index[:, None]
        return DistillOutput(loss, grad, {self.name: grad},
                             {self.name: grad.flatten(1).norm(dim=1)[:, None]}, index2,
                             t[:, None], sigma[:, None])


@dataclass(frozen=True, kw_only=True)
class SiDLoss(InputGradientLoss):
    """Score identity Distillation's generator loss (Zhou et al., ICML 2024, Eq. 23 / Alg. 1).

    Per sample ``(f_r - f_f)^T [(f_r - x) - alpha (f_r - f_f)] / mean|x - f_r|``, the
    normaliser detached and nothing else: the gradient runs through ``f_r(x_t)`` and
    ``f_f(x_t)`` back to ``x`` (``mingyuanzhou/SiD``, ``training/sid_loss.py``). The value
    returned is that, times w(t), averaged over all elements (the authors sum over elements and
    average over the batch: a constant factor ``numel / B``).

    With the predictions held constant the gradient is ``(f_f - f_r) / mean|x - f_r| / numel``,
    exactly `DMDLoss`'s, and ``alpha`` drops out. ``alpha`` 1.2 is the EDM version's (the
    authors' ``run_sid.sh``); SiD-LSG uses 1. Shapes: ``z_hat`` (B, ...).

    SiD-LSG's guidance (Zhou et al., ICLR 2025, ``mingyuanzhou/SiD-LSG``) has three scales, each
    a `CFG` of its own network: ``teacher=CFG(T, kappa4, null)`` and ``fake=CFG(F, kappa2,
    null)`` here, and ``DiffusionLoss(space="epsilon")(..., model=CFG(F, kappa1, null))`` for
    the fake score's own training. They guide in epsilon space; x0 is affine in epsilon with
    weights summing to one, so guiding the x0 predictions is the same. With ``kappa1`` or
    ``kappa2`` not 1 the authors train the fake on prompts dropped to the null prompt 10% of
    the time, so its null branch is fitted: that is the caller's ``cond``.

    Attributes:
        alpha: SiD's alpha, any finite number: 1.2 as the EDM version, 1 as SiD-LSG.

    Example:
        >>> out = SiDLoss(alpha=1.2)(z_hat, cond, teacher=teacher, fake=fake)
        >>> out.loss.backward()  # gradient into the student only
        >>> lsg = SiDLoss(alpha=1.0)(z_hat, cond, teacher=CFG(teacher, 4.5, null),
        ...                          fake=CFG(fake, 4.5, null))  # SiD-LSG, kappa4 and kappa2
    """

    alpha: float = 1.2
    name = "sid"

    def __post_init__(self) -> None:
        # Any finite alpha: the authors' --alpha (sid_train.py in SiD and SiD-LSG) takes any
        # value above -1000, negative ones included.
        check_option("SiDLoss", "alpha", lambda: check_number(self.alpha, "alpha"))
        super().__post_init__()

    def objective(self, x: Tensor, f_r: Tensor, f_f: Tensor, checks: FiniteChecks | None
                  ) -> Tensor:
        norm = 1.0 / (x - f_r).detach().abs().flatten(1).mean(dim=1)
        if checks is not None:
            checks.note(norm, FloatingPointError,
                        "non-finite values in SiD's normaliser 1 / mean|z_hat - teacher_x0|: "
                        "z_hat equals the teacher's x0 for a sample, a division by zero")
        diff = f_r - f_f
        return expand_like(norm, x) * diff * ((f_r - x) - self.alpha * diff)


@dataclass(frozen=True, kw_only=True)
class SIMLoss(InputGradientLoss):
    """Score Implicit Matching (Luo et al., NeurIPS 2024, Eq. 3.5) with the pseudo-Huber distance.

    Per sample ``d'(y)^T (f_f - x)`` with ``y = f_r - f_f`` and ``d'(y) = y / sqrt(|y|^2 +
    c^2)`` (``c=None``: the squared-L2 distance, ``d'(y) = 2 y``). This is the paper's
    ``d'(y_t)^T (s_f(x_t) - grad log q(x_t | x))`` in x0 units: the scores are
    ``s = (alpha_t f - x_t) / sigma_t^2``, so ``y_t = (alpha_t / sigma_t^2)(f_r - f_f)`` and
    ``s_f - grad log q = (alpha_t / sigma_t^2)(f_f - x)``; the paper's ``c`` in score units is
    ``c sigma_t^2 / alpha_t`` here, and its loss is this one times ``alpha_t / sigma_t^2``
    (times ``alpha_t^2 / sigma_t^4`` for squared L2). Nothing is detached: the gradient runs
    through both predictions to ``x``, as in AI4ImagingLab/Dive3D (``nerf/sd.py``, which uses
    this x0 form with ``c = 0``); the models' parameters get none (the paper's ``sg[theta]``).

    The squared-L2 case is twice SiD's numerator at ``alpha = 1``: per sample
    ``2 (f_r - f_f)^T (f_f - x)``. The value returned is w(t) times the per-sample loss,
    summed over a sample's elements and averaged over all elements of the batch.
    Shapes: ``z_hat`` (B, ...).

    Attributes:
        c: The pseudo-Huber constant (>= 0) in x0 units, required (the paper leaves it to the
            user; Dive3D uses 0, the normalised direction, undefined where ``f_r = f_f``);
            None for the squared-L2 distance.

    Example:
        >>> out = SIMLoss(c=1.0)(z_hat, cond, teacher=teacher, fake=fake)
    """

    c: float | None
    name = "sim"

    def __post_init__(self) -> None:
        if self.c is not None:
            _non_negative("SIMLoss", "c", self.c)
        super().__post_init__()

    def objective(self, x: Tensor, f_r: Tensor, f_f: Tensor, checks: FiniteChecks | None
                  ) -> Tensor:
        y = f_r - f_f
        if self.c is None:
            slope = 2.0 * y
        else:
            size = (y.flatten(1).square().sum(dim=1) + self.c**2).sqrt()
            if checks is not None and self.c == 0:
                checks.note(1.0 / size, FloatingPointError,
                            "SIMLoss(c=0): the teacher's and fake's x0 are equal for a sample, "
                            "where d'(y) = y / |y| is undefined; use c > 0")
            slope = y / expand_like(size, y)
        return slope * (f_f - x)
