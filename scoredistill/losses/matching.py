"""DMD (distribution matching) and CSD (classifier score) as configurations of the direction terms.

DMD's direction is VSD's, taken in x0 space and normalised per sample; CSD's is the classifier
score a CFG teacher adds. Both are terms of the same linear mix as VSD/TSM/TSD, so they share one
batched model call per point and compose with the other terms and with DASM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from ..batching import Rider, predict_features, riding
from ..guidance import CFG
from ..messages import brief
from ..parametrization import expand_like
from ..protocols import Cond, Prediction
from ..samplers.timesteps import IndexSampler, UniformIndex
from ..schedules import index_alpha_sigma
from .adversarial import GANTerm, check_head, gan_generator_loss
from .distill import DistillOutput, ScoreDistillationLoss, Term
from .validation import check_inputs, check_option, draw_level
from .weighting import SampleWeighting, Weighting, f_distill_weight, sample_weighting


@dataclass(frozen=True)
class AdversarialOutput(DistillOutput):
    """A DMD / f-distill output with its discriminator's part (`DistillOutput` plus these).

    Attributes:
        gan_loss: The GAN generator term's value before its weight (detached), or None.
        gan_logit: The head's logits (B,) at the GAN sample (detached), or None.
        ratio_logit: f-distill's logits (B,) that ``r`` was read from (detached), or None.
    """

    gan_loss: Tensor | None = None
    gan_logit: Tensor | None = None
    ratio_logit: Tensor | None = None


def _check_logit(logit: Tensor, z_hat: Tensor) -> None:
    if logit.shape != (z_hat.shape[0],):
        raise ValueError(f"the head returned logits of shape {tuple(logit.shape)} for "
                         f"{z_hat.shape[0]} samples: it must return one per sample, (B,)")


def _gan_rider(gan: GANTerm, z_hat: Tensor, cond: Cond, inputs: dict[str, object],
               index: Tensor, noise: Tensor) -> tuple[Rider, Tensor]:
    """The re-noised student sample's call on the GAN role (CFG: its model's conditional
    branch, the call FastGen reads the teacher's features from), with a gradient to ``x``."""
    model = inputs.get(gan.role)
    if model is None:
        raise ValueError(f"GANTerm(role={gan.role!r}) reads the {gan.role}'s features: pass "
                         f"{gan.role}=")
    model = model.model if isinstance(model, CFG) else model
    generator = inputs.get("generator")
    if gan.index_sampler is not None:
        index, noise = draw_level(z_hat, model.schedule.num_steps, gan.index_sampler, None,
                                  None, generator)  # type: ignore[arg-type]
    x = z_hat.detach().float().requires_grad_(True)
    t, alpha, sigma = index_alpha_sigma(model.schedule, index)
    with torch.enable_grad():
        x_gan = expand_like(alpha, x) * x + expand_like(sigma, x) * noise.float()
    return Rider([(model, x_gan, t, cond)], [f"{gan.role} at the GAN sample"], {0: gan.layer},
                 grad=True), x


@dataclass(frozen=True, kw_only=True)
class DMDLoss(ScoreDistillationLoss):
    """Distribution Matching Distillation (Yin et al., CVPR 2024, Eqs. 7-8; DMD2 Alg. 1).

    ``grad = scale * (fake_x0(z_hat_t) - teacher_x0(z_hat_t)) / mean|z_hat - teacher_x0|``: the
    VSD difference in x0 space (Eq. 7's ``s_fake - s_real`` times Eq. 8's ``w_t``, whose
    ``sigma_t^2 / alpha_t`` cancels the scores' ``alpha_t / sigma_t^2``), with DMD's per-sample
    normalisation (`dmd_normalizer`) and no time weighting. Indices are drawn in DMD2's
    ``[0.02, 0.98) * N``. The value returned is DMD2's ``0.5 * F.mse_loss(z_hat, (z_hat -
    grad).detach()) = 0.5 * mean(grad^2)`` (``surrogate="half_mse"``); `osediff` is OSEDiff's
    "VSD" loss, value and gradient. Shapes: ``z_hat`` (B, ...).

    Attributes:
        space: x0, where Eq. 8's weight cancels the scores' ``alpha_t / sigma_t^2``.
        time_weighting: "uniform": no time weighting.
        sample_weighting: "dmd", DMD's per-sample normalisation (`dmd_normalizer`).
        index_sampler: DMD2's ``[0.02, 0.98) * N``, i.e. indices 20..979 of 1000.
        scale: The factor ``scale`` on the direction.
        gan: DMD2's adversarial generator term (`GANTerm`), or None; with it a call takes
            ``head=``, the discriminator head, and returns an `AdversarialOutput`.

    Example:
        >>> out = DMDLoss()(z_hat, cond, teacher=CFG(roles.teacher, 7.5, null), fake=roles.fake)
        >>> dmd2 = DMDLoss(gan=GANTerm(weight=5e-3))  # DMD2, the fake score's features
        >>> out = dmd2(z_hat, cond, teacher=teacher, fake=roles.fake, head=head)
    """

    space: Prediction | None = "x0"
    time_weighting: str | Weighting = "uniform"
    sample_weighting: str | SampleWeighting | None = "dmd"
    index_sampler: IndexSampler = field(default_factory=lambda: UniformIndex(20, 980))
    scale: float = 1.0
    gan: GANTerm | None = None

    def __post_init__(self) -> None:
        if self.gan is not None and not isinstance(self.gan, GANTerm):
            raise ValueError(f"{type(self).__name__}(gan=...): expected a GANTerm or None, got "
                             f"{brief(self.gan)}")
        super().__post_init__()

    def __call__(self, z_hat: Tensor, cond: Cond = None, *, head: nn.Module | None = None,
                 **inputs: object) -> DistillOutput:
        """`ScoreDistillationLoss.__call__`'s keywords, plus ``head`` with a `GANTerm`.

        The GAN sample rides along the distillation term's batched call (one backbone call
        per point, `scoredistill.batching.riding`); ``loss`` is DMD's surrogate plus
        ``gan.weight`` times the GAN term, whose gradient reaches ``z_hat`` only.
        """
        if self.gan is None and head is not None:
            raise ValueError(f"{type(self).__name__} does not use head=: it has no GAN term "
                             "(gan=None); pass gan=GANTerm(...) or drop the argument")
        if self.gan is None:
            return ScoreDistillationLoss.__call__(self, z_hat, cond, **inputs)  # type: ignore[arg-type]
        return self._adversarial(z_hat, cond, check_head(head, type(self).__name__), inputs)

    def _adversarial(self, z_hat: Tensor, cond: Cond, head: nn.Module | None,
                     inputs: dict[str, object],
                     weight: Callable[[Rider, Tensor], Tensor] | None = None,
                     taps: dict[int | str, str | None] | None = None) -> AdversarialOutput:
        """DMD's call with the GAN sample and ``taps`` riding along its batched call;
        ``weight(rider, index)`` makes a per-sample factor (B,) from the rider's features and
        the drawn indices (f-distill's h)."""
        teacher = inputs.get("teacher")
        if teacher is None:
            raise ValueError(f"{type(self).__name__} needs teacher=")
        # Drawn here (as the loss would) since the GAN sample and the time bins need them.
        index, noise = draw_level(z_hat, teacher.schedule.num_steps, self.index_sampler,
                                  inputs.get("index"), inputs.get("noise"),
                                  inputs.get("generator"))  # type: ignore[arg-type]
        check_inputs(z_hat, None, noise, cond, index, None)
        inputs = {**inputs, "index": index, "noise": noise}
        rider, gan_sample, x = Rider(taps=dict(taps or {})), None, None
        if self.gan is not None:
            gan_sample, x = _gan_rider(self.gan, z_hat, cond, inputs, index, noise)
            if self.gan.fused:
                rider = replace(gan_sample, taps={**gan_sample.taps, **rider.taps})
        loss = self
        if weight is not None:
            base = None if self.sample_weighting is None else sample_weighting(
                self.sample_weighting)
            loss = replace(self, sample_weighting=lambda z, x0: weight(rider, index) if base is
                           None else weight(rider, index) * base(z, x0))
        with riding(rider):
            out = ScoreDistillationLoss.__call__(loss, z_hat, cond, **inputs)  # type: ignore[arg-type]
        total, gan_loss, gan_logit = out.loss, None, None
        if self.gan is not None:
            if self.gan.fused:
                features = rider.features[0]
            else:  # a backbone call of its own (DMD2's layout)
                with torch.enable_grad():
                    features = predict_features(gan_sample.calls, gan_sample.roles,
                                                gan_sample.taps)[1][0]  # type: ignore[union-attr]
            logit = head(features)  # type: ignore[misc]
            _check_logit(logit, z_hat)
            value = gan_generator_loss(logit)
            if self.check_finite and not torch.isfinite(value):
                raise FloatingPointError("non-finite GAN generator loss: the head's logits at "
                                         "the GAN sample are not finite")
            # w.r.t. x alone: neither the head's nor any model's weights get a gradient (DMD2
            # and FastGen switch their requires_grad off for the generator's step instead).
            (dx,) = torch.autograd.grad(value, x)
            zf = z_hat.float()
            total = total + self.gan.weight * (value.detach() + ((zf - zf.detach()) * dx).sum())
            gan_loss, gan_logit = value.detach(), logit.detach()
        return AdversarialOutput(total, out.grad, out.grads, out.norms, out.index, out.timesteps,
                                 out.sigmas, gan_loss, gan_logit)

    @classmethod
    def osediff(cls) -> DMDLoss:
        """OSEDiff's ``distribution_matching_loss`` (Wu et al., NeurIPS 2024), value and gradient.

        Returns their ``F.mse_loss(z_hat, (z_hat - grad).detach()) = mean(grad^2)`` with the DMD
        ``grad`` above (``surrogate="mse"``: no 0.5, so the gradient is ``2 grad / numel``);
        DDPM steps ``U{20, ..., 979}``, i.e. indices 20..979. Their teacher is
        ``CFG(unet_fix, 7.5, null)``, their fake score the unguided ``unet_update``.
        """
        return cls(surrogate="mse", index_sampler=UniformIndex(20, 980))

    def mix(self) -> dict[Term, float]:
        return {"vsd": self.scale}


@dataclass(frozen=True, kw_only=True)
class CSDLoss(ScoreDistillationLoss):
    """Classifier Score Distillation (Yu et al. 2023, "Text-to-3D with CSD", Eq. 7).

    ``grad = scale * w(t) (T(z_hat_t; cond) - T(z_hat_t; null))`` with ``teacher=CFG(T, w, null)``
    giving both branches in one call: the classifier score CFG adds, ``w (T_cond - T_null)``, so
    ``w = 1`` is Yu et al.'s direction. No fake score; along DASM it needs one anyway, since the
    trajectory moves ``z_hat_t`` with the fake score (mix it with VSD/TSD for that).
    The value returned is ``0.5 * mean(grad^2)`` (``surrogate="half_mse"``); `pisasr` is
    PiSA-SR's CSD loss, value and gradient. Shapes: ``z_hat`` (B, ...).

    Attributes:
        scale: The factor ``scale`` on the classifier-score direction.

    Example:
        >>> out = CSDLoss()(z_hat, cond, teacher=CFG(roles.teacher, 1.0, null))
    """

    scale: float = 1.0

    @classmethod
    def pisasr(cls) -> CSDLoss:
        """PiSA-SR's ``cal_csd`` (Sun et al., CVPR 2025), value and gradient, with
        ``CFG(unet, 7.5, null)``.

        ``grad = (x0_null - x0_guided) / mean|z_hat - x0_guided|`` (DMD's normalisation); returns
        their ``F.mse_loss(z_hat, (z_hat - grad).detach()) = mean(grad^2)`` (``surrogate="mse"``,
        gradient ``2 grad / numel``); DDPM steps ``U{20, ..., 499}``, i.e. indices 500..979.
        """
        return cls(space="x0", time_weighting="uniform", sample_weighting="dmd", surrogate="mse",
                   index_sampler=UniformIndex(500, 980))

    def mix(self) -> dict[Term, float]:
        return {"csd": self.scale}


@dataclass(frozen=True, kw_only=True)
class FDistillLoss(DMDLoss):
    """f-distill (Xu et al. 2025, arXiv 2502.15681): DMD's direction weighted by ``h(r)``.

    ``grad = h(r) / mean h(r) * DMD's grad`` per sample, ``r`` the density ratio read from a
    discriminator's logit at the same noisy sample (`f_distill_weight`: clamped, exponentiated,
    clipped to ``ratio_range``, detached, normalised per time bin). ``divergence="reverse_kl"``
    gives ``h = 1``, i.e. `DMDLoss`. The logit is the head's on the ``ratio_role``'s features
    (the teacher's, as FastGen) at DMD's noisy sample, read from DMD's own batched call
    (``head=``), or given (``logit=`` (B,)). The head is the caller's, trained with
    `GANHeadLoss`; FastGen adds DMD2's generator term too
    (``gan=GANTerm(role="teacher", index_sampler=None)``). The value returned is the
    ``surrogate`` of ``grad`` (plus the GAN term). Shapes: ``z_hat`` (B, ...).

    Attributes:
        divergence: "reverse_kl", "kl", "js" or "squared_hellinger" (`F_DIVERGENCES`).
        ratio_range: ``(low, high)`` the clip of ``r`` (FastGen's defaults 0.1, 20).
        ratio_role: Whose features the head reads for ``r``: "teacher" (FastGen) or "fake".
        ratio_layer: Their layer (None: the adapter's default, `feature_layer`).
        time_bins: ``r`` is divided by its batch mean within its sample's time bin, one of
            ``time_bins`` equal bins of the schedule's indices (FastGen: 10 bins of its time
            ``t``, EMA rate 0); None: no per-bin normalisation.

    Example:
        >>> loss_fn = FDistillLoss(divergence="js", gan=GANTerm(role="teacher"))
        >>> out = loss_fn(z_hat, cond, teacher=t, fake=f, head=head)
        >>> out = FDistillLoss(divergence="js")(z_hat, cond, teacher=t, fake=f, logit=logit)
    """

    divergence: str = "js"
    ratio_range: tuple[float, float] = (0.1, 20.0)
    ratio_role: str = "teacher"
    ratio_layer: str | None = None
    time_bins: int | None = 10

    def __post_init__(self) -> None:
        check_option("FDistillLoss", "divergence",
                     lambda: f_distill_weight(self.divergence, torch.zeros(1)))
        low, high = self.ratio_range if isinstance(self.ratio_range, tuple) and len(
            self.ratio_range) == 2 else (None, None)
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)) \
                or not 0 < low < high < float("inf"):
            raise ValueError("FDistillLoss(ratio_range=...): expected (low, high) with "
                             f"0 < low < high, got {brief(self.ratio_range)}")
        if self.time_bins is not None and (isinstance(self.time_bins, bool) or not isinstance(
                self.time_bins, int) or self.time_bins < 1):
            raise ValueError(f"FDistillLoss(time_bins=...): expected a positive int or None, "
                             f"got {brief(self.time_bins)}")
        if self.ratio_role not in ("teacher", "fake"):
            raise ValueError(f"FDistillLoss(ratio_role=...): expected 'teacher' or 'fake', got "
                             f"{brief(self.ratio_role)}")
        super().__post_init__()

    def __call__(self, z_hat: Tensor, cond: Cond = None, *, logit: Tensor | None = None,
                 head: nn.Module | None = None, **inputs: object) -> AdversarialOutput:
        """DMD's call (`ScoreDistillationLoss.__call__`, same keywords) plus ``head``, the
        discriminator head read at DMD's noisy sample, or ``logit`` (B,), its logits given.

        Raises:
            ValueError: Neither or (without a GAN term) both of ``head`` and ``logit``.
        """
        if logit is None:
            head = check_head(head, "FDistillLoss (or logit=, the head's logits)")
        elif head is not None and self.gan is None:
            raise ValueError("FDistillLoss takes head= (r read from DMD's call) or logit= "
                             "(given), not both")
        elif self.gan is not None:
            head = check_head(head, "FDistillLoss(gan=...)")
        if logit is not None and logit.shape != (z_hat.shape[0],):
            raise ValueError(f"logit must have shape ({z_hat.shape[0]},), one per sample of "
                             f"z_hat, got {tuple(logit.shape)}")
        seen: dict[str, Tensor] = {}

        def weight(rider: Rider, index: Tensor) -> Tensor:
            if "h" not in seen:  # once: along DASM the features are the first point's
                if logit is None:
                    with torch.no_grad():
                        seen["logit"] = head(rider.features[self.ratio_role]).detach()
                    _check_logit(seen["logit"], z_hat)
                else:
                    seen["logit"] = logit.detach()
                bins = None if self.time_bins is None else (
                    index * self.time_bins // inputs["teacher"].schedule.num_steps)
                seen["h"] = f_distill_weight(self.divergence, seen["logit"].to(z_hat.device),
                                             *self.ratio_range, bins=bins)
            return seen["h"]

        taps = {self.ratio_role: self.ratio_layer} if logit is None else {}
        out = self._adversarial(z_hat, cond, head, inputs, weight, taps)
        return replace(out, ratio_logit=seen.get("logit"))
