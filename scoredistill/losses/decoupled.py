"""Decoupled DMD: DMD's CFG-teacher gradient as two terms, each with its weight and noise level."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..batching import predict_batched
from ..conditioning import expand_cond, leaves
from ..guidance import CFG
from ..messages import brief
from ..parametrization import check_alpha_nonzero, expand_like, to_x0_eps
from ..protocols import Cond, ScoreModel
from ..samplers.timesteps import IndexSampler, UniformIndex, check_number
from ..schedules import index_alpha_sigma
from .distill import DistillOutput
from .surrogate import Surrogate, check_surrogate, surrogate_loss
from .validation import (
    FakeOnlyInputs,
    FiniteChecks,
    check_inputs,
    check_option,
    check_per_sample_int,
    draw_level,
)


@dataclass(frozen=True, kw_only=True)
class DecoupledDMDLoss(FakeOnlyInputs):
    """Decoupled DMD (Liu et al. 2025, arXiv 2511.22677): DM and CFG-augmentation terms.

    With ``teacher=CFG(T, alpha, null)`` DMD's direction splits as ``f_fake - f_cfg =
    (f_fake - T_cond) - (alpha - 1)(T_cond - T_null)`` (x0 predictions): the distribution-matching
    (DM) term and the CFG-augmentation (CA) term. Here each is taken at its own noise level,
    ``x_dm = a z_hat + s eps`` at ``dm_index`` and ``x_ca`` at ``ca_index`` (own noise), and
    ``grad = dm_weight * N_dm (F(x_dm) - T_cond(x_dm))
    - ca_weight * (alpha - 1) N_ca (T_cond(x_ca) - T_null(x_ca))``, with ``N`` each term's DMD
    normaliser ``1 / mean|z_hat - T_cond x0|`` at its own level (``normalise=False``: none).
    All four predictions come from one `predict_batched` call. With equal levels and noise,
    unit weights and no normaliser this is `DMDLoss` with the CFG teacher and no normaliser.

    The paper draws the CA level cleaner than the student's input; the indices are in sampling
    order (higher is cleaner), so for a few-step student at step index ``k`` draw
    ``ca_index > k`` and pass ``input_index`` to have it checked (for a one-step student any
    level is cleaner than its pure-noise input).
    The value returned is the ``surrogate`` of ``grad`` (`surrogate_loss`).
    Shapes: ``z_hat`` (B, ...); ``dm_index``, ``ca_index`` (B,) int64.

    Attributes:
        dm_weight: The DM term's weight.
        ca_weight: The CA term's weight.
        dm_index_sampler: The DM term's index (B,) (default DMD2's 20..979 of 1000).
        ca_index_sampler: The CA term's index (B,); draw it cleaner (higher) than the
            student's input level.
        normalise: Each term times its own DMD normaliser ``1 / mean|z_hat - teacher_cond_x0|``.
        surrogate: "half_mse" or "mse" (`surrogate_loss`).
        check_finite: Raise on non-finite inputs (ValueError) or model outputs and normalisers
            (FloatingPointError), one host sync per call.

    Example:
        >>> loss_fn = DecoupledDMDLoss(ca_index_sampler=UniformIndex(500, 980))
        >>> out = loss_fn(z_hat, cond, teacher=CFG(model, 4.0, null), fake=fake)
    """

    dm_weight: float = 1.0
    ca_weight: float = 1.0
    dm_index_sampler: IndexSampler = field(default_factory=lambda: UniformIndex(20, 980))
    ca_index_sampler: IndexSampler = field(default_factory=lambda: UniformIndex(20, 980))
    normalise: bool = True
    surrogate: Surrogate = "half_mse"
    check_finite: bool = True

    def __post_init__(self) -> None:
        for name in ("dm_weight", "ca_weight"):
            check_option("DecoupledDMDLoss", name,
                         lambda name=name: check_number(getattr(self, name), name))
        for name in ("dm_index_sampler", "ca_index_sampler"):
            if not callable(getattr(self, name)):
                raise ValueError(f"DecoupledDMDLoss({name}=...): expected an IndexSampler such "
                                 f"as UniformIndex(20, 980), got {brief(getattr(self, name))}")
        for name in ("normalise", "check_finite"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DecoupledDMDLoss({name}=...): expected True or False, got "
                                 f"{brief(getattr(self, name))}")
        check_option("DecoupledDMDLoss", "surrogate", lambda: check_surrogate(self.surrogate))

    def __call__(
        self, z_hat: Tensor, cond: Cond = None, *, teacher: CFG, fake: ScoreModel,
        dm_index: Tensor | None = None, ca_index: Tensor | None = None,
        noise: Tensor | None = None, ca_noise: Tensor | None = None,
        input_index: Tensor | None = None, generator: torch.Generator | None = None,
    ) -> DistillOutput:
        """The loss for the student's output ``z_hat`` (B, ...).

        Args:
            z_hat: The student's output (B, ...); the gradient flows to it.
            cond: The condition pytree (batch B).
            teacher: ``CFG(model, alpha, null_cond)``: the CA term's ``alpha`` is its scale.
            fake: The fake-score model (unguided).
            dm_index: The DM term's indices (B,) int64; drawn when None.
            ca_index: The CA term's indices (B,) int64; drawn when None.
            noise: The DM term's noise (B, ...); drawn when None.
            ca_noise: The CA term's noise (B, ...); drawn when None.
            input_index: The student's input level (B,) int64 in the same indices (a few-step
                student's step); when given, every CA index must be strictly cleaner (higher),
                as the paper draws it, or the call raises naming the sample.
            generator: The generator for what is drawn.

        Returns:
            A `DistillOutput` with ``grads`` "dm" and "ca" (before the weights) and
            ``index``, ``timesteps``, ``sigmas`` (B, 2): DM level, then CA level.
        """
        if not isinstance(teacher, CFG):
            raise ValueError("DecoupledDMDLoss needs teacher=CFG(model, alpha, null_cond): the CA "
                             "term is (alpha - 1)(model(cond) - model(null))")
        if fake is None:
            raise ValueError("DecoupledDMDLoss needs a fake-score model `fake` (DM term)")
        model, schedule = teacher.model, teacher.schedule
        if fake.schedule != schedule:
            raise ValueError("teacher and fake must share one noise schedule")
        b = z_hat.shape[0]
        levels = []
        for index, sampler, eps in ((dm_index, self.dm_index_sampler, noise),
                                    (ca_index, self.ca_index_sampler, ca_noise)):
            index, eps = draw_level(z_hat, schedule.num_steps, sampler, index, eps, generator)
            check_inputs(z_hat, None, eps, cond, index, None)
            levels.append((index, eps))
        (i_dm, n_dm), (i_ca, n_ca) = levels
        if input_index is not None:
            check_per_sample_int("input_index", input_index, b, z_hat.device)
            if bool((i_ca <= input_index).any()):
                k = int((i_ca <= input_index).nonzero()[0])
                raise ValueError(
                    f"DecoupledDMDLoss: the CA level must be cleaner than the student's input, "
                    f"but sample {k} has ca_index {int(i_ca[k])} <= input_index "
                    f"{int(input_index[k])} (higher is cleaner); draw ca_index above it, e.g. "
                    f"ca_index_sampler=UniformIndex({int(input_index.max()) + 1}, 980)")
        points = torch.stack([i_dm, i_ca], dim=1)
        t_all, a_all, s_all = index_alpha_sigma(schedule, points)
        if any(m.prediction == "epsilon" for m in (model, fake)):
            check_alpha_nonzero(a_all, "DecoupledDMDLoss")
        checks = FiniteChecks() if self.check_finite else None
        if checks is not None:
            for name, value in (("z_hat", z_hat), ("noise", n_dm), ("ca_noise", n_ca)):
                checks.note_input(name, value)
            checks.note_input("cond", leaves(cond))
            checks.note_input("the teacher's null_cond", leaves(teacher.null_cond))

        x = z_hat.detach().float()
        a = [expand_like(a_all[:, k], x) for k in range(2)]
        s = [expand_like(s_all[:, k], x) for k in range(2)]
        x_dm, x_ca = a[0] * x + s[0] * n_dm.float(), a[1] * x + s[1] * n_ca.float()
        null = expand_cond(teacher.null_cond, b, "null_cond")
        calls = [(model, x_dm, t_all[:, 0], cond), (fake, x_dm, t_all[:, 0], cond),
                 (model, x_ca, t_all[:, 1], cond), (model, x_ca, t_all[:, 1], null)]
        roles = ["teacher", "fake", "teacher", "teacher"]
        with torch.no_grad():
            preds = [p.float() for p in predict_batched(calls, roles)]
        if checks is not None:
            for role, pred, level in zip(roles, preds, ("DM", "DM", "CA", "CA"), strict=True):
                checks.note_model(role, pred, f" at the {level} level")
        k_of = (0, 0, 1, 1)
        x0 = [to_x0_eps(p, c[0].prediction, c[1], a[k], s[k])[0]
              for p, c, k in zip(preds, calls, k_of, strict=True)]
        cond_dm, fake_dm, cond_ca, null_ca = x0
        dm = fake_dm - cond_dm
        ca = -(teacher.scale - 1.0) * (cond_ca - null_ca)
        if self.normalise:
            for term, ref in (("dm", cond_dm), ("ca", cond_ca)):
                norm = 1.0 / (x - ref).abs().flatten(1).mean(dim=1)
                if checks is not None:
                    checks.note(norm, FloatingPointError,
                                f"non-finite values in the {term.upper()} term's normaliser "
                                "1 / mean|z_hat - teacher_x0|: z_hat equals the teacher's x0 "
                                "for a sample, a division by zero")
                if term == "dm":
                    dm = dm * expand_like(norm, x)
                else:
                    ca = ca * expand_like(norm, x)
        if checks is not None:
            checks.raise_first()
        grad = self.dm_weight * dm + self.ca_weight * ca
        norms = {"dm": (self.dm_weight * dm).flatten(1).norm(dim=1)[:, None],
                 "ca": (self.ca_weight * ca).flatten(1).norm(dim=1)[:, None]}
        return DistillOutput(surrogate_loss(z_hat, grad, self.surrogate), grad,
                             {"dm": dm, "ca": ca}, norms, points, t_all, s_all)
