"""Fitting a full-covariance Gaussian mixture by expectation-maximisation (Dempster et al. 1977)."""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .analytic import FullGaussianMixture


def kmeans_pp(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): k rows of x (N, D), spread apart."""
    centres = [x[torch.randint(len(x), (1,), generator=generator)][0]]
    d2 = (x - centres[0]).square().sum(1)
    for _ in range(k - 1):
        centres.append(x[torch.multinomial(d2 / d2.sum(), 1, generator=generator)][0])
        d2 = torch.minimum(d2, (x - centres[-1]).square().sum(1))
    return torch.stack(centres)


def _moments(x: Tensor, resp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Soft counts (K,), first (K, D) and second (K, D, D) moments of a chunk x (n, D), in
    x's dtype, returned in float64 (the sums over chunks are taken in float64)."""
    n, k, d = len(x), resp.shape[1], x.shape[1]
    second = (resp[:, :, None] * x[:, None]).reshape(n, k * d).T @ x
    return resp.sum(0).double(), (resp.T @ x).double(), second.reshape(k, d, d).double()


def _m_step(nk: Tensor, sx: Tensor, sxx: Tensor, reg: float) -> FullGaussianMixture:
    nk = nk + 1e-10
    means = sx / nk[:, None]
    covs = sxx / nk[:, None, None] - means[:, :, None] * means[:, None]
    covs = 0.5 * (covs + covs.transpose(1, 2)) + reg * torch.eye(means.shape[1], dtype=nk.dtype)
    return FullGaussianMixture(means, covs, nk / nk.sum())


def fit_full_mixture(x: Tensor, components: int, *, iters: int = 40, reg: float = 1e-3,
                     seed: int = 0, chunk: int = 1024, progress: bool = True
                     ) -> FullGaussianMixture:
    """Maximum-likelihood ``FullGaussianMixture`` (float64) of x (N, D) by EM.

    Initialised by k-means++ centres with hard assignments; ``reg * I`` is added to every
    covariance (keeps them positive definite, and sets the smallest variance the model allows).
    The data are streamed in chunks of ``chunk`` rows, so memory stays ``O(chunk K D)``; the
    per-chunk products run in x's dtype (float32 is twice as fast), their sums in float64.
    """
    if x.ndim != 2 or len(x) < components:
        raise ValueError(f"need x (N, D) with N >= components={components}, got "
                         f"{tuple(x.shape)}")
    g = torch.Generator().manual_seed(seed)
    centres = kmeans_pp(x, components, g)
    stats = [torch.stack(s).sum(0) for s in zip(*(
        _moments(c, torch.nn.functional.one_hot(torch.cdist(c, centres).argmin(1),
                                                components).to(x.dtype))
        for c in x.split(chunk)), strict=True)]
    bar = tqdm(range(iters), desc=f"EM (K={components}, D={x.shape[1]})", disable=not progress)
    for _ in bar:
        fit = _m_step(*stats, reg)
        gm = FullGaussianMixture(fit.means.to(x.dtype), fit.covs.to(x.dtype),
                                 fit.weights.to(x.dtype))
        loglik, parts = 0.0, []
        for c in x.split(chunk):
            log_joint = gm.component_log_joint(c)
            loglik += float(log_joint.logsumexp(1).sum())
            parts.append(_moments(c, log_joint.softmax(dim=1)))
        stats = [torch.stack(s).sum(0) for s in zip(*parts, strict=True)]
        bar.set_postfix(loglik_per_dim=f"{loglik / x.numel():.4f}")
    return _m_step(*stats, reg)
