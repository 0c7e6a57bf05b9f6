"""A super-resolution-like toy problem with an exact teacher: for demos, tests and benchmarks.

HQ samples come from a Gaussian mixture (the analytic teacher knows their exact score); LQ is a
lossy linear operator of HQ plus noise; a small one-step generator maps LQ to HQ, and a small MLP
learns the fake score of its outputs, exactly the roles of TSD-SR's student and LoRA model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from .analytic import FullGaussianMixture, GaussianMixture
from .features import FeatureLayer, as_tensor, submodule
from .losses.adversarial import GANHeadLoss
from .losses.diffusion import DiffusionLoss
from .losses.distill import ScoreDistillationLoss
from .posterior import LinearGaussianPosterior, PosteriorTeacher, lq_condition
from .protocols import Cond, NoiseSchedule, Prediction, ScoreModel
from .schedules import RectifiedFlow


@dataclass(eq=False)
class ToySR:
    """HQ ``x ~ GMM`` in ``D = 2d`` dims, LQ ``y = x[:d] + noise_std * n``: half the dims are lost.

    Each LQ corner ``+-1.5`` has two HQ completions (all lost coordinates ``+1.5`` or all
    ``-1.5``), so the least-squares answer (their mean, 0) lies off the data manifold: the blur
    that reconstruction losses produce and score distillation is meant to fix.

    Attributes:
        lq_dim: ``d``, the LQ dimension; HQ has ``D = 2d``.
        std: The standard deviation of each mixture component.
        noise_std: The LQ noise's standard deviation.
        teacher: The exact HQ teacher (`GaussianMixture`, one component per HQ corner), built
            at construction.
        operator: The degradation's linear part (d, D), ``[I 0]``, built at construction.
    """

    lq_dim: int = 2
    std: float = 0.25
    noise_std: float = 0.05
    teacher: GaussianMixture = field(init=False)
    operator: Tensor = field(init=False)

    def __post_init__(self) -> None:
        # Every corner of the LQ square, each with two HQ completions: (+1.5, ..) or (-1.5, ..).
        seen = torch.cartesian_prod(*[torch.tensor([-1.5, 1.5])] * self.lq_dim)
        lost = torch.tensor([[1.5], [-1.5]]).expand(2, self.lq_dim)
        means = torch.cat([torch.cat([seen, lost[i].expand_as(seen)], 1) for i in range(2)])
        k = means.shape[0]
        self.teacher = GaussianMixture(means, torch.full((k,), self.std), torch.full((k,), 1 / k))
        self.operator = torch.eye(self.lq_dim, 2 * self.lq_dim)

    @property
    def dim(self) -> int:
        return 2 * self.lq_dim

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Paired ``(hq (n, D), lq (n, d))``."""
        hq = self.teacher.sample(n, generator)
        lq = hq @ self.operator.T + self.noise_std * torch.randn(
            n, self.lq_dim, generator=generator)
        return hq, lq

    def cond(self, lq: Tensor) -> Tensor:
        """The condition ``(lq, 1)`` (B, d + 1) of `conditional_teacher`; the null one is zeros."""
        return lq_condition(lq)

    def conditional_teacher(self, prediction: Prediction = "flow") -> PosteriorTeacher:
        """The exact teacher of ``p(x0 | lq)`` (the prompt's role in CSD), given ``cond(lq)``."""
        gmm = self.teacher
        covs = torch.diag_embed(gmm.stds[:, None].square().expand(-1, gmm.dim))
        prior = FullGaussianMixture(gmm.means, covs, gmm.weights)
        return PosteriorTeacher(LinearGaussianPosterior(prior, self.operator, self.noise_std),
                                prediction=prediction)


class SRProblem(Protocol):
    """What the trainer needs from a problem: :class:`ToySR` and ``scoredistill.patches.PatchSR``.

    Besides ``sample(n, generator) -> (hq (n, D), lq (n, d))``, conditional losses (CSD) use
    ``conditional_teacher()``, the exact teacher of ``p(x0 | lq)`` given ``cond(lq)``.

    Attributes:
        teacher: The exact ScoreModel of HQ.
        operator: The linear part of the degradation (d, D).
    """

    teacher: ScoreModel
    operator: Tensor

    @property
    def dim(self) -> int: ...

    def sample(self, n: int, generator: torch.Generator | None = None
               ) -> tuple[Tensor, Tensor]: ...

    def cond(self, lq: Tensor) -> Tensor: ...

    def conditional_teacher(self, prediction: Prediction = "flow") -> ScoreModel: ...


def _time_features(t: Tensor, num_steps: int) -> Tensor:
    freqs = torch.arange(1, 5, dtype=torch.float32, device=t.device) * math.pi
    phase = (t.float() / num_steps)[:, None] * freqs
    return torch.cat([phase.sin(), phase.cos()], dim=1)


class MLPScore(nn.Module):
    """A learnable ScoreModel on flat (B, D) inputs: an MLP of ``(x_t, features(t))``."""

    def __init__(self, dim: int, hidden: int = 128, prediction: Prediction = "flow",
                 schedule: NoiseSchedule | None = None) -> None:
        super().__init__()
        self.prediction, self.schedule = prediction, schedule or RectifiedFlow()
        self.net = nn.Sequential(nn.Linear(dim + 8, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        return self.net(torch.cat([x_t, _time_features(t, self.schedule.num_steps)], dim=1))

    def feature_layer(self, layer: str | None = None) -> FeatureLayer:
        """The last hidden layer's activations (N, hidden) (``net.3``) by default."""
        name = layer or "net.3"
        return FeatureLayer(name, submodule(self, name, "MLPScore"),
                            self.net[2].out_features if name == "net.3" else None,
                            lambda out, _: as_tensor(out, name), spatial=False)


class OneStepGenerator(nn.Module):
    """``G(y) = A^+ y + MLP(y)``: starts at the pseudo-inverse, the blurry least-squares guess."""

    def __init__(self, operator: Tensor, hidden: int = 128) -> None:
        super().__init__()
        self.register_buffer("pinv", torch.linalg.pinv(operator))
        d_lq, dim = operator.shape
        self.net = nn.Sequential(nn.Linear(d_lq, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, lq: Tensor) -> Tensor:
        return lq @ self.pinv.T + self.net(lq)


def sliced_wasserstein(x: Tensor, y: Tensor, projections: int = 256,
                       generator: torch.Generator | None = None) -> Tensor:
    """Sliced 2-Wasserstein distance between equal-size samples (n, D) (Rabin et al. 2011).

    Args:
        x: One sample (n, D).
        y: The other sample (n, D).
        projections: The number of random directions.
        generator: Draws the directions.
    """
    theta = torch.randn(x.shape[1], projections, generator=generator, dtype=x.dtype)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).sort(dim=0).values, (y @ theta).sort(dim=0).values
    return (px - py).square().mean().sqrt()


@torch.no_grad()
def evaluate(problem: ToySR, gen: OneStepGenerator, n: int = 4096, seed: int = 1234
             ) -> dict[str, float]:
    """NLL under the true density, sliced Wasserstein to it, and MSE to the paired HQ.

    Args:
        problem: The toy problem.
        gen: The one-step generator evaluated.
        n: The number of held-out pairs.
        seed: Seeds the pairs and the reference samples.

    Returns:
        ``{"nll", "sliced_w2", "mse"}`` as floats.
    """
    g = torch.Generator().manual_seed(seed)
    hq, lq = problem.sample(n, g)
    out = gen(lq)
    return {"nll": float(-problem.teacher.log_prob(out).mean()),
            "sliced_w2": float(sliced_wasserstein(out, problem.teacher.sample(n, g), generator=g)),
            "mse": float((out - hq).square().mean())}


@dataclass
class ToyTrainer:
    """Alternating student / fake-score updates of TSD-SR Alg. 1 on `ToySR` (or any `SRProblem`).

    Attributes:
        problem: The problem: HQ/LQ pairs, the exact teacher and the operator.
        loss: The score-distillation regulariser, or None for reconstruction alone.
        teacher: The teacher; None: the problem's exact one. Pass a learned ScoreModel to study
            an imperfect teacher.
        recon_weight: The weight of the reconstruction MSE to the paired HQ.
        reg_weight: The weight of the regulariser ``loss``.
        batch: The batch size of each step.
        lr: The generator's Adam learning rate.
        fake_lr: The fake score's Adam learning rate.
        seed: Seeds the networks' initialisation and the sampling generator.
        hidden: The width of the generator's and the fake score's MLPs.
        condition: Maps the LQ batch to the loss's ``cond`` (e.g. ``ToySR.cond`` for CSD with
            ``ToySR.conditional_teacher()``); None: unconditional.
        head: A discriminator head (DMD2, f-distill), passed to ``loss`` as ``head=``; None:
            none. It is trained with the fake score (DMD2's layout): each fake step adds
            ``head_weight * head_loss`` on the HQ batch and the generator's outputs.
        head_loss: The head's loss (a `GANHeadLoss`); required with ``head``.
        head_role: Whose features the head reads: "fake" (DMD2: the head's loss trains the fake
            score too) or "teacher" (FastGen's f-distill: only the head learns).
        head_weight: The head loss's weight in the fake step (DMD2: 1e-2).
    """

    problem: SRProblem
    loss: ScoreDistillationLoss | None
    teacher: ScoreModel | None = None
    recon_weight: float = 1.0
    reg_weight: float = 1.0
    batch: int = 256
    lr: float = 1e-3
    fake_lr: float = 1e-3
    seed: int = 0
    hidden: int = 128
    condition: Callable[[Tensor], Cond] | None = None
    head: nn.Module | None = None
    head_loss: GANHeadLoss | None = None
    head_role: Literal["fake", "teacher"] = "fake"
    head_weight: float = 1e-2

    def __post_init__(self) -> None:
        torch.manual_seed(self.seed)
        if self.teacher is None:
            self.teacher = self.problem.teacher
        if (self.head is None) != (self.head_loss is None):
            raise ValueError("ToyTrainer: pass head= and head_loss= together (the head is "
                             "trained by its loss in the fake step), or neither")
        if self.head_role not in ("fake", "teacher"):
            raise ValueError(f"ToyTrainer(head_role=...): expected 'fake' or 'teacher', got "
                             f"{self.head_role!r}")
        self.gen = OneStepGenerator(self.problem.operator, self.hidden)
        self.fake = MLPScore(self.problem.dim, self.hidden)
        self.g = torch.Generator().manual_seed(self.seed)
        self.opt = torch.optim.Adam(self.gen.parameters(), lr=self.lr)
        self.fake_opt = torch.optim.Adam(self.fake.parameters(), lr=self.fake_lr)
        self.fake_loss = DiffusionLoss(space="flow")
        # The head's own optimiser, stepped with the fake score's (same lr).
        self.head_opt = None if self.head is None else torch.optim.Adam(
            self.head.parameters(), lr=self.fake_lr)

    def fake_step(self, lq: Tensor, hq: Tensor | None = None, fake: bool = True) -> Tensor:
        """One Eq. (9) update of the fake score on the generator's current outputs, plus the
        head's update on ``hq`` (the real samples; required with a head). ``fake=False``
        updates the head alone (its warm-up)."""
        with torch.no_grad():
            z_hat = self.gen(lq)
        loss = self.fake_loss(z_hat, model=self.fake, generator=self.g).loss if fake else 0.0
        if self.head is not None:
            if hq is None:
                raise ValueError("ToyTrainer.fake_step: a trainer with a head needs hq=, the "
                                 "real samples of its loss")
            model = self.fake if self.head_role == "fake" else self.teacher
            loss = loss + self.head_weight * self.head_loss(  # type: ignore[misc]
                hq, z_hat, model=model, head=self.head, generator=self.g).loss
        self.fake_opt.zero_grad()
        if self.head_opt is not None:
            self.head_opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        if fake:
            self.fake_opt.step()
        if self.head_opt is not None:
            self.head_opt.step()
        return loss.detach()  # type: ignore[union-attr]

    def step(self) -> dict[str, Tensor]:
        """One generator step (reconstruction + regulariser), then one fake-score step."""
        hq, lq = self.problem.sample(self.batch, self.g)
        z_hat = self.gen(lq)
        loss = self.recon_weight * (z_hat - hq).square().mean()
        logs: dict[str, Tensor] = {}
        if self.loss is not None:
            cond = None if self.condition is None else self.condition(lq)
            heads = {} if self.head is None else {"head": self.head}
            out = self.loss(z_hat, cond, generator=self.g, **heads, **self.loss.select_inputs(
                teacher=self.teacher, fake=self.fake, z=hq))
            loss = loss + self.reg_weight * out.loss
            logs = {f"norm/{k}": v.mean() for k, v in out.norms.items()}
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        logs["loss/fake"] = self.fake_step(lq, hq)
        return logs

    def warm_up_fake(self, steps: int) -> None:
        """Fit the fake score (and head) to the initial generator before distilling (as VSD
        does)."""
        for _ in range(steps):
            hq, lq = self.problem.sample(self.batch, self.g)
            self.fake_step(lq, hq)

    def warm_up_head(self, steps: int) -> None:
        """Fit the head alone to the current generator (the fake score already warmed up)."""
        if self.head is None:
            raise ValueError("ToyTrainer.warm_up_head: this trainer has no head (head=None)")
        for _ in range(steps):
            hq, lq = self.problem.sample(self.batch, self.g)
            self.fake_step(lq, hq, fake=False)
