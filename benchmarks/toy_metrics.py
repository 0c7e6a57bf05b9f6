"""Toy-problem helpers for benchmarks: learned teacher, direction probes, mean ± std, plot.

The probe measures TSD-SR Fig. 3's cosine (teacher direction vs the true one) on the student's
noisy latents and on the paired noisy HQ latents, and how the TSM term (Eq. 4) points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from scoredistill import DiffusionLoss, ScoreModel, TSMLoss, UniformIndex, to_x0_eps
from scoredistill.parametrization import expand_like
from scoredistill.toy import MLPScore, SRProblem

FIG3_TIMESTEP = 100.0  # TSD-SR Fig. 3 measures at t = 100, i.e. sigma = 0.1 for rectified flow


def train_learned_teacher(problem: SRProblem, steps: int, seed: int, batch: int = 512,
                          lr: float = 2e-3, hidden: int = 128) -> MLPScore:
    """A frozen MLP teacher fitted to true HQ samples with the plain diffusion loss (Eq. 9).

    It sees every noise level (indices 0..999) but only noisy *data*: off the data manifold at low
    noise it extrapolates, which is the imperfect-teacher case Fig. 3 is about.
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = MLPScore(problem.dim, hidden)
    loss_fn = DiffusionLoss(space="flow", index_sampler=UniformIndex(0, 1000))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = loss_fn(problem.teacher.sample(batch, g), model=model, generator=g).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.requires_grad_(False).eval()


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample cosine similarity (B,) of flat (B, D) vectors; 0 where either is zero."""
    return nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-12)


def _x0(model: ScoreModel, x_t: Tensor, t: Tensor) -> Tensor:
    alpha, sigma = model.schedule.alpha_sigma(t)
    a, s = expand_like(alpha, x_t), expand_like(sigma, x_t)
    return to_x0_eps(model(x_t, t, None).float(), model.prediction, x_t, a, s)[0]


@dataclass
class DirectionProbe:
    """Fixed pairs, noise and timesteps on which every run is probed during training.

    Fig. 3 cosine (``cos_hat``, ``cos_hq``): at ``t = 100`` with one shared noise ``eps``,
    ``x_t`` is the noisy student latent ``z_hat_t = (1 - s) z_hat + s eps`` or the noisy HQ latent
    ``z_t = (1 - s) z + s eps``; the teacher's direction is its denoising step
    ``x0_T(x_t) - x_t`` (= ``-s v_T`` for a flow teacher) and the true direction is toward the
    paired HQ latent, ``z - x_t``; the value is the mean over pairs of their cosine.
    ``cos_*_exact``: the same teacher direction against the exact (analytic) teacher's
    ``x0*(x_t) - x_t``, i.e. how wrong a learned teacher is there (1 for the exact one).
    ``tsm_align_<space>``: cosine, over the whole batch stacked into one vector, of the TSM
    descent direction ``-g_tsm`` (Eq. 4, sigma^2 weighting, difference taken in ``space``, random
    training indices) with ``z - z_hat``; negative means TSM alone pushes ``z_hat`` away from the
    paired HQ latents (the MSE to them grows).
    """

    problem: SRProblem
    n: int = 1024
    seed: int = 4321
    hq: Tensor = field(init=False)
    lq: Tensor = field(init=False)
    noise: Tensor = field(init=False)
    index: Tensor = field(init=False)

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.hq, self.lq = self.problem.sample(self.n, g)
        self.noise = torch.randn(self.hq.shape, generator=g)
        self.index = UniformIndex()(self.n, 1000, generator=g)

    @torch.no_grad()
    def __call__(self, gen: nn.Module, teacher: ScoreModel) -> dict[str, float]:
        """Probe values for generator ``gen`` under ``teacher`` (exact or learned)."""
        exact = self.problem.teacher
        z, z_hat = self.hq, gen(self.lq)
        t = torch.full((self.n,), FIG3_TIMESTEP)
        _, sigma = exact.schedule.alpha_sigma(t)
        s = sigma[0].item()
        out = {"mse": float((z_hat - z).square().mean())}
        for name, x in (("hat", z_hat), ("hq", z)):
            x_t = (1 - s) * x + s * self.noise
            d_teacher = _x0(teacher, x_t, t) - x_t
            out[f"cos_{name}"] = float(cosine(d_teacher, z - x_t).mean())
            out[f"cos_{name}_exact"] = float(cosine(d_teacher, _x0(exact, x_t, t) - x_t).mean())
        for space in ("flow", "epsilon"):
            g = TSMLoss(space=space)(z_hat, teacher=teacher, z=z, index=self.index,
                                     noise=self.noise).grads["tsm"]
            # One cosine over the whole batch: the sign of d(MSE)/dt under the TSM flow alone.
            out[f"tsm_align_{space}"] = float(cosine(-g.reshape(1, -1), (z - z_hat).reshape(1, -1)))
        return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaN for none."""
    if not values:
        return math.nan, math.nan
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


TEACHER_COLORS = {"exact": "tab:blue", "learned": "tab:orange"}
# Curves drawn in the cosine panels: the baseline, the two ingredients and the full method.
COSINE_RUNS = {"recon only": "tab:gray", "+ VSD": "tab:red", "+ TSM (flow)": "tab:purple",
               "+ TSD+DASM (eps)": "tab:green"}
METRIC_LABELS = {"nll": "NLL under the true density ↓", "sliced_w2": "sliced W2 to the truth ↓",
                 "mse": "MSE to the paired HQ (fidelity)"}


def save_plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Bars (mean ± std) of NLL / sliced W2 / MSE per loss and teacher; cosine and TSM curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = list(dict.fromkeys(r["loss"] for r in rows))
    by = {(r["teacher"], r["loss"]): r for r in rows}
    fig, axes = plt.subplots(2, 3, figsize=(17, 10))
    width = 0.4
    for ax, metric in zip(axes[0], METRIC_LABELS, strict=True):
        for j, (teacher, color) in enumerate(TEACHER_COLORS.items()):
            # A loss without a row for this teacher (CSD: exact only) gets no bar.
            mu = [by.get((teacher, n), {}).get(f"{metric}_mean", math.nan) for n in losses]
            sd = [by.get((teacher, n), {}).get(f"{metric}_std", math.nan) for n in losses]
            xs = [i + (j - 0.5) * width for i in range(len(losses))]
            ax.bar(xs, mu, width, yerr=sd, capsize=3, color=color, label=f"{teacher} teacher")
        # A log axis: one loss far off (CSD's NLL ~2e3) flattens every other bar on a linear one.
        values = [r[f"{metric}_mean"] for r in rows if math.isfinite(r[f"{metric}_mean"])]
        ax.set_yscale("log" if all(v > 0 for v in values) else "symlog")
        ax.set_xticks(range(len(losses)), losses, rotation=40, ha="right", fontsize=9)
        ax.set_title(METRIC_LABELS[metric] + " (log scale)")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend()

    for ax, teacher in zip(axes[1, :2], TEACHER_COLORS, strict=True):
        for name, color in COSINE_RUNS.items():
            c = by[teacher, name]["curves"]
            ax.plot(c["step"], c["cos_hat"], color=color, label=f"z_hat_t, {name}")
        c = by[teacher, "recon only"]["curves"]
        ax.plot(c["step"], c["cos_hq"], "k--", label="z_t (paired HQ)")
        if teacher == "learned":
            ax.plot(c["step"], c["cos_hq_exact"], "k:", label="z_t: learned vs exact direction")
            c = by[teacher, "+ TSD+DASM (eps)"]["curves"]
            ax.plot(c["step"], c["cos_hat_exact"], ":", color="tab:green",
                    label="z_hat_t (TSD+DASM eps): learned vs exact")
        ax.set(title=f"Fig. 3 cosine, {teacher} teacher (t = 100)", xlabel="generator step",
               ylabel="cos(teacher direction, z - x_t)", ylim=(-0.6, 1.05))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center right")

    ax = axes[1, 2]
    for name, color in (("+ TSM (flow)", "tab:purple"), ("+ TSM (eps)", "tab:cyan"),
                        ("+ TSD+DASM (eps)", "tab:green")):
        c = by["exact", name]["curves"]
        ax.plot(c["step"], c["tsm_align_flow"], "-", color=color, label=f"flow space, {name}")
        ax.plot(c["step"], c["tsm_align_epsilon"], "--", color=color, label=f"eps space, {name}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set(title="TSM descent direction vs z - z_hat (exact teacher)", xlabel="generator step",
           ylabel="cosine (< 0: pushes away from HQ)", ylim=(-1.05, 1.05))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    fig.suptitle(f"Score-distillation losses on the toy SR problem ({title}; mean ± std over "
                 "seeds, curves: mean)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
