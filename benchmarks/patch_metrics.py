"""Metrics of the natural-patch benchmark, all against the exact prior and posterior, and plots.

For LQ inputs ``y`` with paired HQ ``x``, a generator's outputs ``G(y)`` are scored by
``post_nll`` -log p(G(y) | y) per dimension under the exact posterior given their own LQ;
``prior_nll`` -log p(G(y)) per dimension; ``mse_hq`` the MSE to the paired HQ; ``mse_pmean`` the
MSE to the exact posterior mean E[x | y] (the MSE optimum); ``detail`` the energy of
``G(y) - E[x | y]`` over the posterior's own variance E||x - E[x | y]||^2 (1 for a posterior
sample, 0 for the posterior mean: how much of the texture the LQ leaves open the output draws);
``swd`` the sliced 2-Wasserstein distance between the outputs' details ``G(y) - E[x | y]`` and
those of as many exact posterior samples of the same LQ, ``x' - E[x | y]``: the conditional
distributions compared after removing what the LQ fixes (on whole patches the projections are
dominated by the low frequencies the LQ already determines, and the posterior mean would score
like a sample).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from scoredistill.patches import PatchSR
from scoredistill.toy import sliced_wasserstein

METRIC_LABELS = {
    "post_nll": "-log p(G(y) | y) per dim ↓",
    "prior_nll": "-log p(G(y)) per dim ↓",
    "swd": "sliced W2 of details to posterior samples' ↓",
    "detail": "detail energy / posterior variance (1 = sample)",
    "mse_hq": "MSE to the paired HQ (fidelity) ↓",
    "mse_pmean": "MSE to the exact posterior mean ↓",
}


@dataclass
class PatchEval:
    """A fixed evaluation set of ``n`` pairs with their exact posterior means and samples."""

    problem: PatchSR
    n: int = 2048
    seed: int = 777
    hq: Tensor = field(init=False)
    lq: Tensor = field(init=False)
    post_mean: Tensor = field(init=False)
    post_samples: Tensor = field(init=False)
    post_var: float = field(init=False)

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.hq, self.lq = self.problem.sample(self.n, g)
        post = self.problem.posterior
        self.post_mean = post.mean(self.lq.double())
        # Two independent draws: one the SWD reference, one the ceiling row.
        self.post_samples = torch.stack([post.sample(self.lq.double(), g) for _ in range(2)])
        self.post_var = float(post.expected_sq_dev(self.lq.double()).mean())

    @torch.no_grad()
    def __call__(self, out: Tensor) -> dict[str, float]:
        """The metrics of outputs (n, D) produced from ``self.lq``."""
        out = out.double()
        post, dim = self.problem.posterior, self.problem.dim
        lq = self.lq.double()
        g = torch.Generator().manual_seed(self.seed + 1)  # same projections for every row
        return {
            "post_nll": float(-post.log_prob(out, lq).mean()) / dim,
            "prior_nll": float(-self.problem.prior.log_prob(out).mean()) / dim,
            "swd": float(sliced_wasserstein(out - self.post_mean,
                                            self.post_samples[0] - self.post_mean, generator=g)),
            "detail": float((out - self.post_mean).square().sum(1).mean()) / self.post_var,
            "mse_hq": float((out - self.hq.double()).square().mean()),
            "mse_pmean": float((out - self.post_mean).square().mean()),
        }

    def reference_rows(self) -> dict[str, dict[str, float]]:
        """The exact posterior's own scores: a sample (the ceiling) and the mean (MSE optimum)."""
        return {"exact posterior sample (ceiling)": self(self.post_samples[1]),
                "exact posterior mean (MSE optimum)": self(self.post_mean)}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_bars(rows: list[dict[str, Any]], refs: dict[str, dict[str, float]], path: Path,
              title: str) -> Path:
    """Bars (mean ± std over seeds) of every metric per run, the reference rows as lines; all
    from a results JSON's content, so a committed run can be redrawn."""
    plt = _pyplot()
    # constrained layout keeps the figure title clear of the panels' titles (tight_layout
    # ignores the suptitle and let it overlap the middle panel's).
    fig, axes = plt.subplots(2, 3, figsize=(20, 9.5), layout="constrained")
    labels = [f"{r['teacher'][0]}: {r['loss']}" for r in rows]
    colors = ["tab:blue" if r["teacher"] == "exact" else "tab:orange" for r in rows]
    for ax, (metric, label) in zip(axes.flat, METRIC_LABELS.items(), strict=True):
        ax.bar(range(len(rows)), [r[f"{metric}_mean"] for r in rows],
               yerr=[r[f"{metric}_std"] for r in rows], color=colors, capsize=2)
        for (name, ref), style in zip(refs.items(), ("--", ":"), strict=True):
            ax.axhline(ref[metric], color="k", ls=style, lw=1, label=name)
        ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("symlog", linthresh=0.01)  # a diverged run must not flatten the rest
        # symlog's autoscale can stop at 0 and hide the negative bars (NLLs below 0).
        low = min([r[f"{metric}_mean"] - r[f"{metric}_std"] for r in rows]
                  + [ref[metric] for ref in refs.values()])
        if low < 0:
            ax.set_ylim(bottom=1.5 * low)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{title} (blue: exact teacher, orange: learned; e: / l: in the labels)")
    return _save(fig, path)


def save_patches(images: dict[str, Tensor], path: Path, title: str) -> Path:
    """A grid of patches: one row per entry of ``images`` (12 patches (C, 8, 8) each: HQ, LQ,
    posterior mean and sample, the students' outputs)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(images) + 0.8), layout="constrained")
    tiles = torch.cat([torch.cat(list(v), dim=2) for v in images.values()], dim=1)  # C H W
    ax.imshow(tiles.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_yticks([8 * i + 3.5 for i in range(len(images))], list(images), fontsize=8)
    ax.set_xticks([])
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    _pyplot().close(fig)
    return path
