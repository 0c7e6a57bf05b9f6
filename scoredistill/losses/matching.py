"""DMD (distribution matching) and CSD (classifier score) as configurations of the direction terms.

DMD's direction is VSD's, taken in x0 space and normalised per sample; CSD's is the classifier
score a CFG teacher adds. Both are terms of the same linear mix as VSD/TSM/TSD, so they share one
batched model call per point and compose with the other terms and with DASM.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..messages import brief
from ..protocols import Cond, Prediction
from ..samplers.timesteps import IndexSampler, UniformIndex
from .distill import DistillOutput, ScoreDistillationLoss, Term
from .validation import check_option
from .weighting import SampleWeighting, Weighting, f_distill_weight, sample_weighting


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

    Example:
        >>> out = DMDLoss()(z_hat, cond, teacher=CFG(roles.teacher, 7.5, null), fake=roles.fake)
    """

    space: Prediction | None = "x0"
    time_weighting: str | Weighting = "uniform"
    sample_weighting: str | SampleWeighting | None = "dmd"
    index_sampler: IndexSampler = field(default_factory=lambda: UniformIndex(20, 980))
    scale: float = 1.0

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
    clipped to ``ratio_range``, detached). ``divergence="reverse_kl"`` gives ``h = 1``, i.e.
    `DMDLoss`. The head producing the logit is the caller's (it is trained with its own GAN
    loss); a call takes it as ``logit=`` (B,). The value returned is the ``surrogate`` of
    ``grad``, as for DMD. Shapes: ``z_hat`` (B, ...).

    Attributes:
        divergence: "reverse_kl", "kl", "js" or "squared_hellinger" (`F_DIVERGENCES`).
        ratio_range: ``(low, high)`` the clip of ``r`` (FastGen's defaults 0.1, 20).

    Example:
        >>> logit = head(teacher_features).squeeze(1)  # (B,), the caller's discriminator
        >>> out = FDistillLoss(divergence="js")(z_hat, cond, teacher=t, fake=f, logit=logit)
    """

    divergence: str = "js"
    ratio_range: tuple[float, float] = (0.1, 20.0)

    def __post_init__(self) -> None:
        check_option("FDistillLoss", "divergence",
                     lambda: f_distill_weight(self.divergence, torch.zeros(1)))
        low, high = self.ratio_range if isinstance(self.ratio_range, tuple) and len(
            self.ratio_range) == 2 else (None, None)
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)) \
                or not 0 < low < high < float("inf"):
            raise ValueError("FDistillLoss(ratio_range=...): expected (low, high) with "
                             f"0 < low < high, got {brief(self.ratio_range)}")
        super().__post_init__()

    def __call__(self, z_hat: Tensor, cond: Cond = None, *, logit: Tensor,
                 **inputs: object) -> DistillOutput:
        """DMD's call (`ScoreDistillationLoss.__call__`, same keywords) plus ``logit`` (B,),
        the discriminator's logit per sample of ``z_hat``."""
        if logit.shape != (z_hat.shape[0],):
            raise ValueError(f"logit must have shape ({z_hat.shape[0]},), one per sample of "
                             f"z_hat, got {tuple(logit.shape)}")
        h = f_distill_weight(self.divergence, logit.to(z_hat.device), *self.ratio_range)
        base = None if self.sample_weighting is None else sample_weighting(self.sample_weighting)

        def weight(x: Tensor, teacher_x0: Tensor) -> Tensor:
            return h if base is None else h * base(x, teacher_x0)

        dmd = replace(self, sample_weighting=weight)
        return ScoreDistillationLoss.__call__(dmd, z_hat, cond, **inputs)  # type: ignore[arg-type]
