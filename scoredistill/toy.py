"""A super-resolution-like toy problem with an exact teacher: for demos, tests and benchmarks.

HQ samples come from a Gaussian mixture (the analytic teacher knows their exact score); LQ is a
lossy linear operator of HQ plus noise; a small one-step generator maps LQ to HQ, and a small MLP
learns the fake score of its outputs, exactly the roles of TSD-SR's student and LoRA model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from .analytic import GaussianMixture
from .losses.diffusion import DiffusionLoss
from .losses.distill import ScoreDistillationLoss
from .parametrization import expand_like, from_x0_eps
from .protocols import Cond, NoiseSchedule, Prediction, ScoreModel
from .schedules import RectifiedFlow


@dataclass(eq=False)
class ToySR:
    """HQ ``x ~ GMM`` in ``D = 2d`` dims, LQ ``y = x[:d] + noise_std * n``: half the dims are lost.

    Each LQ corner ``+-1.5`` has two HQ completions (all lost coordinates ``+1.5`` or all
    ``-1.5``), so the least-squares answer (their mean, 0) lies off the data manifold: the blur
    that reconstruction losses produce and score distillation is meant to fix.
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
        """The condition ``(lq, 1)`` (B, d + 1) of `ToyPosterior`; its null condition is zeros."""
        return torch.cat([lq, lq.new_ones(lq.shape[0], 1)], dim=1)


@dataclass(frozen=True, eq=False)
class ToyPosterior:
    """The exact conditional teacher ``p(x0 | lq)`` of `ToySR` (the prompt's role in CSD).

    Given ``lq = x[:d] + n eps``, each component's seen dims get the Gaussian posterior
    ``N((n^2 mu + s^2 lq) / (s^2 + n^2), s^2 n^2 / (s^2 + n^2))`` and weight
    ``pi_k N(lq; mu_seen, s^2 + n^2)``; lost dims keep the prior. ``cond`` (B, d + 1) is
    ``ToySR.cond(lq)``; rows whose last entry is 0 (the null condition) or ``cond=None`` get
    the unconditional teacher, so CFG's null branch is exact too. Inputs (B, D).
    """

    problem: ToySR
    schedule: NoiseSchedule = field(default_factory=RectifiedFlow)
    prediction: Prediction = "flow"

    def _components(self, cond: Tensor | None, b: int) -> tuple[Tensor, Tensor, Tensor]:
        gmm, d, n2 = self.problem.teacher, self.problem.lq_dim, self.problem.noise_std**2
        mean = gmm.means[None].expand(b, -1, -1)
        var = (gmm.stds[None, :, None] ** 2).expand(b, -1, gmm.dim)
        logw = gmm.weights.log()[None].expand(b, -1)
        if cond is None:
            return mean, var, logw
        lq, on = cond[:, None, :d], cond[:, None, d:] > 0  # (B, 1, d), (B, 1, 1)
        s2 = var[..., :d]
        post_mean = torch.cat([(n2 * mean[..., :d] + s2 * lq) / (s2 + n2), mean[..., d:]], -1)
        post_var = torch.cat([s2 * n2 / (s2 + n2), var[..., d:]], -1)
        lik = -0.5 * ((lq - mean[..., :d]).square() / (s2 + n2)
                      + torch.log(2 * math.pi * (s2 + n2))).sum(-1)
        return (torch.where(on, post_mean, mean), torch.where(on, post_var, var),
                torch.where(on[..., 0], logw + lik, logw))

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        """The exact prediction of kind ``self.prediction`` at ``(x_t, t)`` given ``cond``."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        a3, s3 = alpha[:, None, None], sigma[:, None, None]
        mean, var, logw = self._components(cond, x_t.shape[0])  # type: ignore[arg-type]
        marg = a3**2 * var + s3**2  # (B, K, D) per-dim marginal variance
        resid = x_t[:, None] - a3 * mean
        log_r = logw - 0.5 * (resid.square() / marg + torch.log(2 * math.pi * marg)).sum(-1)
        x0 = (log_r.softmax(1)[..., None] * (mean + a3 * var / marg * resid)).sum(1)
        a, s = expand_like(alpha, x_t), expand_like(sigma, x_t)
        return from_x0_eps(x0, (x_t - a * x0) / s, self.prediction, a, s)


class SRProblem(Protocol):
    """What the trainer needs from a problem: :class:`ToySR` and ``scoredistill.patches.PatchSR``.

    ``teacher`` the exact ScoreModel of HQ, ``operator`` (d, D) the linear part of the
    degradation, ``sample(n, generator) -> (hq (n, D), lq (n, d))``.
    """

    teacher: ScoreModel
    operator: Tensor

    @property
    def dim(self) -> int: ...

    def sample(self, n: int, generator: torch.Generator | None = None
               ) -> tuple[Tensor, Tensor]: ...


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
    """Sliced 2-Wasserstein distance between equal-size samples (n, D) (Rabin et al. 2011)."""
    theta = torch.randn(x.shape[1], projections, generator=generator, dtype=x.dtype)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).sort(dim=0).values, (y @ theta).sort(dim=0).values
    return (px - py).square().mean().sqrt()


@torch.no_grad()
def evaluate(problem: ToySR, gen: OneStepGenerator, n: int = 4096, seed: int = 1234
             ) -> dict[str, float]:
    """NLL under the true density, sliced Wasserstein to it, and MSE to the paired HQ."""
    g = torch.Generator().manual_seed(seed)
    hq, lq = problem.sample(n, g)
    out = gen(lq)
    return {"nll": float(-problem.teacher.log_prob(out).mean()),
            "sliced_w2": float(sliced_wasserstein(out, problem.teacher.sample(n, g), generator=g)),
            "mse": float((out - hq).square().mean())}


@dataclass
class ToyTrainer:
    """Alternating student / fake-score updates of TSD-SR Alg. 1 on `ToySR` (or any `SRProblem`).

    ``teacher`` defaults to the problem's exact one; pass a learned ScoreModel to study an
    imperfect teacher. ``hidden`` is the width of the generator's and the fake score's MLPs.
    ``condition`` maps the LQ batch to the loss's ``cond`` (e.g. ``ToySR.cond`` for CSD with
    `ToyPosterior`); None: unconditional.
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

    def __post_init__(self) -> None:
        torch.manual_seed(self.seed)
        if self.teacher is None:
            self.teacher = self.problem.teacher
        self.gen = OneStepGenerator(self.problem.operator, self.hidden)
        self.fake = MLPScore(self.problem.dim, self.hidden)
        self.g = torch.Generator().manual_seed(self.seed)
        self.opt = torch.optim.Adam(self.gen.parameters(), lr=self.lr)
        self.fake_opt = torch.optim.Adam(self.fake.parameters(), lr=self.fake_lr)
        self.fake_loss = DiffusionLoss(space="flow")

    def fake_step(self, lq: Tensor) -> Tensor:
        """One Eq. (9) update of the fake score on the generator's current outputs."""
        with torch.no_grad():
            z_hat = self.gen(lq)
        loss = self.fake_loss(z_hat, model=self.fake, generator=self.g).loss
        self.fake_opt.zero_grad()
        loss.backward()
        self.fake_opt.step()
        return loss.detach()

    def step(self) -> dict[str, Tensor]:
        """One generator step (reconstruction + regulariser), then one fake-score step."""
        hq, lq = self.problem.sample(self.batch, self.g)
        z_hat = self.gen(lq)
        loss = self.recon_weight * (z_hat - hq).square().mean()
        logs: dict[str, Tensor] = {}
        if self.loss is not None:
            cond = None if self.condition is None else self.condition(lq)
            out = self.loss(z_hat, cond, teacher=self.teacher, fake=self.fake, z=hq,
                            generator=self.g)
            loss = loss + self.reg_weight * out.loss
            logs = {f"norm/{k}": v.mean() for k, v in out.norms.items()}
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        logs["loss/fake"] = self.fake_step(lq)
        return logs

    def warm_up_fake(self, steps: int) -> None:
        """Fit the fake score to the initial generator before distilling (as VSD does)."""
        for _ in range(steps):
            self.fake_step(self.problem.sample(self.batch, self.g)[1])
