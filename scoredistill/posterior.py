"""The exact posterior of a Gaussian-mixture prior observed through a linear map plus noise.

With ``x ~ sum_k pi_k N(mu_k, Sigma_k)`` and ``y = A x + s n``, ``n ~ N(0, I)``, the posterior
``p(x | y)`` is again a mixture (Bishop, PRML Sec. 2.3.3): component k has weight
``pi_k N(y; A mu_k, S_k) / p(y)`` with ``S_k = A Sigma_k A^T + s^2 I``, mean
``mu_k + G_k (y - A mu_k)`` with gain ``G_k = Sigma_k A^T S_k^{-1}``, and covariance
``P_k = Sigma_k - G_k A Sigma_k``, which does not depend on ``y``: everything but the weights
and means is computed once. The exact denoiser is the case ``A = alpha I``, ``s = sigma``;
:class:`PosteriorTeacher` is the exact denoiser of the posterior itself, ``E[x0 | x_t, y]``: the
teacher conditioned on the LQ.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .analytic import (
    LOG_2PI,
    FullGaussianMixture,
    component_draws,
    flat_eigenvectors,
    mixture_log_prob,
    rotated_mixture_denoise,
)
from .parametrization import check_prediction, expand_like, from_x0_eps
from .protocols import Cond, NoiseSchedule, Prediction
from .schedules import RectifiedFlow


def lq_condition(lq: Tensor) -> Tensor:
    """The condition ``(lq, 1)`` (B, d + 1) of the exact LQ-conditional teachers
    (:class:`PosteriorTeacher`); zeros are the null condition."""
    return torch.cat([lq, lq.new_ones(lq.shape[0], 1)], dim=1)


@dataclass(frozen=True, eq=False)
class LinearGaussianPosterior:
    """Exact ``p(x | y)`` for ``prior`` and ``y = operator @ x + noise_std * n``.

    Inputs ``y`` (B, d), ``x`` (B, D). Computed in the prior's dtype; the constant parts
    (gains, posterior covariances and their eigendecompositions) in float64.

    Attributes:
        prior: The Gaussian-mixture prior of ``x`` (K components in D dimensions).
        operator: The linear map ``A`` (d, D).
        noise_std: The observation noise's standard deviation ``s``, > 0.
        gains: The gains ``G_k = Sigma_k A^T S_k^{-1}`` (K, D, d), computed at construction.
        post_evals: Eigenvalues (K, D) of the posterior covariances ``P_k``, computed at
            construction.
        post_evecs: Eigenvectors (K, D, D) of the ``P_k`` (columns), computed at construction.
    """

    prior: FullGaussianMixture
    operator: Tensor
    noise_std: float
    gains: Tensor = field(init=False, repr=False)  # (K, D, d)
    post_evals: Tensor = field(init=False, repr=False)  # (K, D)
    post_evecs: Tensor = field(init=False, repr=False)  # (K, D, D)
    _lq_means: Tensor = field(init=False, repr=False)  # (K, d): A mu_k
    _lq_evals: Tensor = field(init=False, repr=False)  # (K, d): eigenvalues of S_k
    _lq_evecs: Tensor = field(init=False, repr=False)  # (K, d, d)

    def __post_init__(self) -> None:
        if self.operator.ndim != 2 or self.operator.shape[1] != self.prior.dim:
            raise ValueError(f"operator must be (d, {self.prior.dim}), got "
                             f"{tuple(self.operator.shape)}")
        if not self.noise_std > 0:
            raise ValueError(f"noise_std must be > 0, got {self.noise_std}")
        a = self.operator.double()
        cov = self.prior.covs.double()
        s_lq = a @ cov @ a.T + self.noise_std**2 * torch.eye(a.shape[0], dtype=torch.float64)
        lq_evals, lq_evecs = torch.linalg.eigh(s_lq)
        cross = cov @ a.T  # (K, D, d)
        gains = cross @ torch.linalg.inv(s_lq)
        post = cov - gains @ cross.transpose(1, 2)
        post_evals, post_evecs = torch.linalg.eigh(0.5 * (post + post.transpose(1, 2)))
        if not bool((post_evals > 0).all()):
            raise ValueError("a posterior covariance is not positive definite (smallest "
                             f"eigenvalue {float(post_evals.min()):.3g}): ill-conditioned prior")
        dtype = self.prior.means.dtype
        for name, value in (("gains", gains), ("post_evals", post_evals),
                            ("post_evecs", post_evecs), ("_lq_evals", lq_evals),
                            ("_lq_evecs", lq_evecs),
                            ("_lq_means", self.prior.means.double() @ a.T)):
            object.__setattr__(self, name, value.to(dtype))

    def _y(self, y: Tensor) -> Tensor:
        y = y.reshape(y.shape[0], -1).to(self.prior.means.dtype)
        if y.shape[1] != self.operator.shape[0]:
            raise ValueError(f"y has {y.shape[1]} features; the operator gives "
                             f"{self.operator.shape[0]}")
        return y

    def log_evidence(self, y: Tensor) -> Tensor:
        """``log pi_k N(y; A mu_k, S_k)`` (B, K)."""
        y = self._y(y)
        rot = torch.einsum("bkd,kde->bke", y[:, None] - self._lq_means, self._lq_evecs)
        log_n = -0.5 * ((rot.square() / self._lq_evals).sum(-1) + self._lq_evals.log().sum(-1)
                        + y.shape[1] * LOG_2PI)
        return self.prior.weights.log() + log_n

    def log_marginal(self, y: Tensor) -> Tensor:
        """``log p(y)`` (B,)."""
        return self.log_evidence(y).logsumexp(dim=1)

    def log_weights(self, y: Tensor) -> Tensor:
        """Posterior component log-weights (B, K)."""
        return self.log_evidence(y).log_softmax(dim=1)

    def component_means(self, y: Tensor) -> Tensor:
        """Posterior component means (B, K, D)."""
        y = self._y(y)
        return self.prior.means + torch.einsum("kDd,bkd->bkD", self.gains,
                                               y[:, None] - self._lq_means)

    def mean(self, y: Tensor) -> Tensor:
        """``E[x | y]`` (B, D), the MSE-optimal estimate."""
        w = self.log_weights(y).exp()
        return (w[..., None] * self.component_means(y)).sum(1)

    def expected_sq_dev(self, y: Tensor) -> Tensor:
        """``E[||x - E[x | y]||^2 | y]`` (B,): the posterior's total variance."""
        w, m = self.log_weights(y).exp(), self.component_means(y)
        spread = (m - (w[..., None] * m).sum(1, keepdim=True)).square().sum(-1)
        return (w * (self.post_evals.sum(-1) + spread)).sum(1)

    def log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        """``log p(x | y)`` (B,) of x (B, D) given its own y (B, d)."""
        x = x.reshape(x.shape[0], -1).to(self.prior.means.dtype)
        return mixture_log_prob(x, self.component_means(y), self.log_weights(y),
                                self.post_evals, self.post_evecs)

    def sample(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One exact posterior sample per row of y: (B, D)."""
        w = self.log_weights(y).exp()
        comp = torch.multinomial(w, 1, generator=generator)[:, 0]
        mean = self.component_means(y)[torch.arange(w.shape[0]), comp]
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return component_draws(mean, comp, self.post_evals, self.post_evecs, noise)


@dataclass(frozen=True, eq=False)
class PosteriorTeacher:
    """The exact LQ-conditional teacher: ``E[x0 | x_t, y]`` for ``x0 ~ p(x | y)`` of ``posterior``.

    ``p(x | y)`` is a mixture with per-sample means and weights and fixed covariances
    ``P_k = V_k diag(p_k) V_k^T`` (see :class:`LinearGaussianPosterior`), so the denoiser is the
    prior's closed form (`scoredistill.analytic.rotated_mixture_denoise`) with those components.
    It plays the prompt-conditional teacher of CSD (Yu et al. 2023) with the LQ as the prompt:
    ``cond`` (B, d + 1) is :func:`lq_condition`; rows whose last entry is 0 (the null condition)
    or ``cond=None`` get the prior's exact teacher, so ``CFG``'s null branch is exact too.
    Inputs (B, *event_shape) with D features; computed in the prior's dtype.

    Attributes:
        posterior: The exact posterior ``p(x | y)`` whose denoiser this is.
        schedule: The noise schedule (default SD3's `RectifiedFlow`).
        prediction: The parametrisation the model outputs (default "flow").
    """

    posterior: LinearGaussianPosterior
    schedule: NoiseSchedule = field(default_factory=RectifiedFlow)
    prediction: Prediction = "flow"
    _evecs_flat: Tensor = field(init=False, repr=False)  # (D, K D): every V_k
    _rot_prior_means: Tensor = field(init=False, repr=False)  # (K, D): V_k^T mu_k
    _rot_gains: Tensor = field(init=False, repr=False)  # (K, D, d): V_k^T G_k

    def __post_init__(self) -> None:
        check_prediction(self.prediction)
        post = self.posterior
        evecs = post.post_evecs
        object.__setattr__(self, "_evecs_flat", flat_eigenvectors(evecs))
        object.__setattr__(self, "_rot_prior_means",
                           torch.einsum("kd,kde->ke", post.prior.means, evecs))
        object.__setattr__(self, "_rot_gains", evecs.transpose(1, 2) @ post.gains)

    def denoise(self, x_t: Tensor, alpha: Tensor, sigma: Tensor, y: Tensor) -> Tensor:
        """Exact ``E[x0 | x_t, y]`` (B, D) for x_t (B, D), y (B, d), ``alpha``, ``sigma`` (B,)."""
        post, dtype = self.posterior, self.posterior.prior.means.dtype
        y = post._y(y)
        resid = y[:, None] - post._lq_means  # (B, K, d)
        means = post.component_means(y)
        rot_means = self._rot_prior_means + torch.einsum("kDd,bkd->bkD", self._rot_gains, resid)
        return rotated_mixture_denoise(x_t.to(dtype), alpha.to(dtype), sigma.to(dtype),
                                       post.log_weights(y), means, rot_means, post.post_evals,
                                       self._evecs_flat)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        """The exact prediction of kind ``self.prediction`` at ``(x_t, t)`` given ``cond``."""
        prior, d = self.posterior.prior, self.posterior.operator.shape[0]
        alpha, sigma = self.schedule.alpha_sigma(t)
        x = prior._flat(x_t)
        if cond is None:
            on = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        elif not isinstance(cond, Tensor) or cond.shape != (x.shape[0], d + 1):
            shape = tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
            raise ValueError(f"cond must be lq_condition(lq), shape ({x.shape[0]}, {d + 1}); "
                             f"got {shape}")
        else:
            on = cond[:, -1] > 0
        x0 = torch.empty_like(x)
        if bool(on.any()):  # a host sync; this teacher is for CPU benchmarks and tests
            x0[on] = self.denoise(x[on], alpha[on], sigma[on], cond[on, :-1]).to(x.dtype)
        if not bool(on.all()):
            x0[~on] = prior.denoise(x[~on], alpha[~on], sigma[~on])
        x0 = x0.reshape(x_t.shape).to(x_t.dtype)
        a, s = expand_like(alpha, x_t).to(x_t.dtype), expand_like(sigma, x_t).to(x_t.dtype)
        return from_x0_eps(x0, (x_t - a * x0) / s, self.prediction, a, s)
