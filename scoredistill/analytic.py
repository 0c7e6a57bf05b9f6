"""Gaussian-mixture ScoreModels with the exact denoiser, score and density (tests, benchmarks).

Under ``x_t = alpha x0 + sigma eps`` a mixture ``sum_k pi_k N(mu_k, Sigma_k)`` stays a mixture,
``sum_k pi_k N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)``, so ``E[x0 | x_t]`` (the network every
score-distillation loss assumes), the score and the log-density are closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .messages import brief
from .parametrization import check_prediction, expand_like, from_x0_eps
from .protocols import Cond, NoiseSchedule, Prediction
from .schedules import RectifiedFlow

LOG_2PI = math.log(2 * math.pi)


def mixture_log_prob(x: Tensor, means: Tensor, log_weights: Tensor, evals: Tensor,
                     evecs: Tensor) -> Tensor:
    """``log sum_k w_k N(x; m_k, U_k diag(lam_k) U_k^T)`` (B,) of x (B, D).

    Args:
        x: Points (B, D).
        means: Component means (K, D) or per-sample (B, K, D).
        log_weights: Log mixture weights (K,) or (B, K).
        evals: Eigenvalues (K, D) of each covariance.
        evecs: Eigenvectors (K, D, D) of each covariance (columns are vectors).
    """
    resid = x[:, None] - means  # (B, K, D)
    rot = torch.einsum("bkd,kde->bke", resid, evecs)
    log_n = -0.5 * ((rot.square() / evals).sum(-1) + evals.log().sum(-1) + x.shape[1] * LOG_2PI)
    return (log_weights + log_n).logsumexp(dim=-1)


class _MixtureScoreModel:
    """The ScoreModel part shared by both mixtures: ``denoise`` in every parametrisation."""

    schedule: NoiseSchedule
    prediction: Prediction
    means: Tensor

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _flat(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1).to(self.means.dtype)
        if flat.shape[1] != self.dim:
            raise ValueError(f"input has {flat.shape[1]} features; the mixture has {self.dim}")
        return flat

    def denoise(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """Exact ``E[x0 | x_t]`` for per-sample ``alpha``, ``sigma`` (B,). Shape of ``x_t``."""
        raise NotImplementedError

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        """The exact prediction of kind ``self.prediction`` at ``(x_t, t)``."""
        alpha, sigma = self.schedule.alpha_sigma(t)
        x0 = self.denoise(x_t, alpha, sigma)
        a, s = expand_like(alpha, x_t).to(x_t.dtype), expand_like(sigma, x_t).to(x_t.dtype)
        return from_x0_eps(x0, (x_t - a * x0) / s, self.prediction, a, s)

    def score(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        """Exact score ``(alpha E[x0 | x_t] - x_t) / sigma^2`` (Tweedie); needs sigma > 0."""
        x0 = self.denoise(x_t, alpha, sigma)
        a, s = expand_like(alpha, x_t).to(x_t.dtype), expand_like(sigma, x_t).to(x_t.dtype)
        return (a * x0 - x_t) / s**2


@dataclass(frozen=True, eq=False)
class GaussianMixture(_MixtureScoreModel):
    """Data ``x0 ~ sum_k pi_k N(mu_k, s_k^2 I)`` in D dimensions with its exact posterior mean.

    ``E[x0 | x_t]`` is the responsibility-weighted sum of the per-component Wiener estimates.
    Inputs are (B, *event_shape) with ``prod(event_shape) == D``; ``cond`` is ignored.

    Attributes:
        means: Component means ``mu_k`` (K, D).
        stds: Component standard deviations ``s_k`` (K,).
        weights: Mixture weights ``pi_k`` (K,), >= 0 and summing to 1.
        schedule: The noise schedule (default SD3's `RectifiedFlow`).
        prediction: The parametrisation the model outputs (default "flow").
    """

    means: Tensor
    stds: Tensor
    weights: Tensor
    schedule: NoiseSchedule = field(default_factory=RectifiedFlow)
    prediction: Prediction = "flow"

    def __post_init__(self) -> None:
        check_prediction(self.prediction)
        k = self.means.shape[0]
        if self.means.ndim != 2 or self.stds.shape != (k,) or self.weights.shape != (k,):
            raise ValueError("expected means (K, D), stds (K,), weights (K,); got "
                             f"{tuple(self.means.shape)}, {tuple(self.stds.shape)}, "
                             f"{tuple(self.weights.shape)}")
        _check_weights(self.weights)

    def _log_joint(self, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Per-component ``log pi_k N(x; alpha mu_k, var_k I)`` (B, K) and variances (B, K)."""
        var = alpha[:, None] ** 2 * self.stds[None] ** 2 + sigma[:, None] ** 2
        d2 = (x[:, None] - alpha[:, None, None] * self.means[None]).square().sum(-1)
        log_n = -0.5 * (d2 / var + self.dim * torch.log(2 * math.pi * var))
        return self.weights.log()[None] + log_n, var

    def denoise(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        x = self._flat(x_t)
        alpha, sigma = alpha.to(x.dtype), sigma.to(x.dtype)
        log_joint, var = self._log_joint(x, alpha, sigma)
        resp = log_joint.softmax(dim=1)  # (B, K)
        gain = alpha[:, None] * self.stds[None] ** 2 / var  # (B, K)
        resid = x[:, None] - alpha[:, None, None] * self.means[None]  # (B, K, D)
        x0_k = self.means[None] + gain[..., None] * resid
        return (resp[..., None] * x0_k).sum(1).reshape(x_t.shape).to(x_t.dtype)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact ``log p(x0)`` (B,) of clean samples."""
        one = torch.ones(x.shape[0], dtype=self.means.dtype, device=x.device)
        return self._log_joint(self._flat(x), one, 0 * one)[0].logsumexp(dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` clean samples (n, D)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype,
                            device=self.means.device)
        return self.means[comp] + self.stds[comp, None] * noise


@dataclass(frozen=True, eq=False)
class FullGaussianMixture(_MixtureScoreModel):
    """Data ``x0 ~ sum_k pi_k N(mu_k, Sigma_k)`` with full covariances; exact denoiser and density.

    Each ``Sigma_k = U_k diag(lam_k) U_k^T`` is eigendecomposed once (in float64), so at any
    noise level the component ``N(alpha mu_k, U_k diag(alpha^2 lam_k + sigma^2) U_k^T)`` and its
    Wiener estimate ``mu_k + U_k diag(alpha lam_k / (alpha^2 lam_k + sigma^2)) U_k^T (x_t - alpha
    mu_k)`` cost one (B, D) x (D, K D) product. Inputs (B, *event_shape), ``cond`` ignored.

    Attributes:
        means: Component means ``mu_k`` (K, D).
        covs: Covariances ``Sigma_k`` (K, D, D), symmetric positive definite.
        weights: Mixture weights ``pi_k`` (K,), >= 0 and summing to 1.
        schedule: The noise schedule (default SD3's `RectifiedFlow`).
        prediction: The parametrisation the model outputs (default "flow").
        evals: Eigenvalues ``lam_k`` (K, D) of each covariance, computed at construction.
        evecs: Eigenvectors ``U_k`` (K, D, D) of each covariance (columns), computed at
            construction.

    Example:
        >>> gm = FullGaussianMixture(means, covs, weights)       # a ScoreModel (flow prediction)
        >>> out = TSDLoss()(z_hat, teacher=gm, fake=fake, z=z)
    """

    means: Tensor
    covs: Tensor
    weights: Tensor
    schedule: NoiseSchedule = field(default_factory=RectifiedFlow)
    prediction: Prediction = "flow"
    evals: Tensor = field(init=False, repr=False)
    evecs: Tensor = field(init=False, repr=False)
    _evecs_flat: Tensor = field(init=False, repr=False)
    _rot_means: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        check_prediction(self.prediction)
        k, d = self.means.shape if self.means.ndim == 2 else (-1, -1)
        if k < 0 or self.covs.shape != (k, d, d) or self.weights.shape != (k,):
            raise ValueError("expected means (K, D), covs (K, D, D), weights (K,); got "
                             f"{tuple(self.means.shape)}, {tuple(self.covs.shape)}, "
                             f"{tuple(self.weights.shape)}")
        _check_weights(self.weights)
        covs = self.covs.double()
        if not torch.allclose(covs, covs.transpose(1, 2), rtol=1e-6, atol=1e-10):
            raise ValueError("covariances must be symmetric")
        evals, evecs = torch.linalg.eigh(covs)
        if not bool((evals > 0).all()):
            bad = int((evals.min(dim=1).values <= 0).nonzero()[0])
            raise ValueError(f"covariance {bad} is not positive definite "
                             f"(smallest eigenvalue {float(evals[bad].min()):.3g})")
        evals, evecs = evals.to(self.means.dtype), evecs.to(self.means.dtype)
        object.__setattr__(self, "evals", evals)
        object.__setattr__(self, "evecs", evecs)
        object.__setattr__(self, "_evecs_flat", flat_eigenvectors(evecs))
        object.__setattr__(self, "_rot_means", torch.einsum("kd,kde->ke", self.means, evecs))

    def denoise(self, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
        x = self._flat(x_t)
        x0 = rotated_mixture_denoise(x, alpha.to(x.dtype), sigma.to(x.dtype), self.weights.log(),
                                     self.means, self._rot_means, self.evals, self._evecs_flat)
        return x0.reshape(x_t.shape).to(x_t.dtype)

    def component_log_joint(self, x: Tensor, alpha: Tensor | None = None,
                            sigma: Tensor | None = None) -> Tensor:
        """``log pi_k p_t(x | k)`` (B, K); its softmax is EM's responsibility.

        Args:
            x: Samples (B, *event_shape) with D features.
            alpha: Per-sample signal scales (B,) of the noisy marginal; None: clean samples.
            sigma: Per-sample noise scales (B,); None: clean samples.
        """
        flat = self._flat(x)
        one = torch.ones(flat.shape[0], dtype=flat.dtype, device=flat.device)
        alpha = one if alpha is None else alpha.to(flat.dtype)
        sigma = 0 * one if sigma is None else sigma.to(flat.dtype)
        return _rotated_log_joint(flat, alpha, sigma, self.weights.log(), self._rot_means,
                                  self.evals, self._evecs_flat)[0]

    def log_prob(self, x: Tensor, alpha: Tensor | None = None, sigma: Tensor | None = None
                 ) -> Tensor:
        """Exact ``log p_t(x)`` (B,): of clean samples by default, else of the noisy marginal."""
        return self.component_log_joint(x, alpha, sigma).logsumexp(dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` clean samples (n, D)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype,
                            device=self.means.device)
        return component_draws(self.means[comp], comp, self.evals, self.evecs, noise)


def _rotated_log_joint(x: Tensor, alpha: Tensor, sigma: Tensor, log_weights: Tensor,
                       rot_means: Tensor, evals: Tensor, evecs_flat: Tensor
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """``log w_k N(x; alpha m_k, U_k diag(alpha^2 lam_k + sigma^2) U_k^T)`` (B, K), the rotated
    residuals ``U_k^T (x - alpha m_k)`` and the variances (B, K, D).

    ``rot_means`` ``U_k^T m_k`` (K, D) or per-sample (B, K, D); ``log_weights`` (K,) or (B, K);
    ``evecs_flat`` (D, K D) holds every ``U_k`` side by side, so all rotations are one GEMM.
    """
    b, (k, d) = x.shape[0], evals.shape
    rot = (x @ evecs_flat).reshape(b, k, d) - alpha[:, None, None] * rot_means
    var = alpha[:, None, None] ** 2 * evals + sigma[:, None, None] ** 2
    log_n = -0.5 * ((rot.square() / var).sum(-1) + var.log().sum(-1) + d * LOG_2PI)
    return log_weights + log_n, rot, var


def rotated_mixture_denoise(x: Tensor, alpha: Tensor, sigma: Tensor, log_weights: Tensor,
                            means: Tensor, rot_means: Tensor, evals: Tensor, evecs_flat: Tensor
                            ) -> Tensor:
    """Exact ``E[x0 | x_t = x]`` (B, D) for ``x0 ~ sum_k w_k N(m_k, U_k diag(lam_k) U_k^T)``.

    The responsibility-weighted Wiener estimates ``m_k + U_k diag(alpha lam_k / (alpha^2 lam_k
    + sigma^2)) U_k^T (x - alpha m_k)``.

    Args:
        x: Noisy samples ``x_t`` (B, D).
        alpha: Per-sample signal scales (B,).
        sigma: Per-sample noise scales (B,).
        log_weights: Log mixture weights (K,) or (B, K).
        means: Component means (K, D) or per-sample (B, K, D) (a posterior mixture).
        rot_means: Their rotations ``U_k^T m_k`` (K, D) or (B, K, D).
        evals: Eigenvalues (K, D) of each covariance.
        evecs_flat: Every ``U_k`` side by side (D, K D) (`flat_eigenvectors`).
    """
    log_joint, rot, var = _rotated_log_joint(x, alpha, sigma, log_weights, rot_means, evals,
                                             evecs_flat)
    resp = log_joint.softmax(dim=1)  # (B, K)
    coef = resp[..., None] * (alpha[:, None, None] * evals / var) * rot
    mean = resp @ means if means.ndim == 2 else torch.einsum("bk,bkd->bd", resp, means)
    return mean + coef.flatten(1) @ evecs_flat.T


def component_draws(means: Tensor, comp: Tensor, evals: Tensor, evecs: Tensor,
                    noise: Tensor) -> Tensor:
    """``means_n + U_c diag(sqrt(lam_c)) noise_n`` with ``c = comp[n]``: Gaussian draws (n, D).

    Args:
        means: Per-sample means (n, D).
        comp: Each sample's component (n,).
        evals: Eigenvalues (K, D) of each covariance.
        evecs: Eigenvectors (K, D, D) of each covariance (columns).
        noise: Standard normal draws (n, D).
    """
    scaled = noise * evals[comp].sqrt()
    # Component by component: gathering a (D, D) rotation per sample would take n D^2 memory
    # (29 GB for 200k colour patches).
    out = means.clone()
    for k in comp.unique().tolist():
        rows = (comp == k).nonzero().squeeze(1)
        out[rows] += scaled[rows] @ evecs[k].T
    return out


def flat_eigenvectors(evecs: Tensor) -> Tensor:
    """Eigenvector matrices (K, D, D) side by side: (D, K D) with ``[:, k D + e] = U_k[:, e]``."""
    k, d, _ = evecs.shape
    return evecs.permute(1, 0, 2).reshape(d, k * d)


def _check_weights(weights: Tensor) -> None:
    # A negative or NaN weight would give NaN log-weights and a NaN denoiser at every call.
    if not bool(torch.isfinite(weights).all() and (weights >= 0).all()):
        raise ValueError(f"mixture weights must be finite and >= 0, got {brief(weights.tolist())}")
    if not torch.isclose(weights.sum(), torch.tensor(1.0, dtype=weights.dtype)):
        raise ValueError(f"mixture weights must sum to 1, got {float(weights.sum())}")
