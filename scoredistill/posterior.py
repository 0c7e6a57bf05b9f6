"""The exact posterior of a Gaussian-mixture prior observed through a linear map plus noise.

With ``x ~ sum_k pi_k N(mu_k, Sigma_k)`` and ``y = A x + s n``, ``n ~ N(0, I)``, the posterior
``p(x | y)`` is again a mixture (Bishop, PRML Sec. 2.3.3): component k has weight
``pi_k N(y; A mu_k, S_k) / p(y)`` with ``S_k = A Sigma_k A^T + s^2 I``, mean
``mu_k + G_k (y - A mu_k)`` with gain ``G_k = Sigma_k A^T S_k^{-1}``, and covariance
``P_k = Sigma_k - G_k A Sigma_k``, which does not depend on ``y``: everything but the weights
and means is computed once. The exact denoiser is the case ``A = alpha I``, ``s = sigma``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .analytic import LOG_2PI, FullGaussianMixture, mixture_log_prob


@dataclass(frozen=True, eq=False)
class LinearGaussianPosterior:
    """Exact ``p(x | y)`` for ``prior`` and ``y = operator @ x + noise_std * n``.

    ``operator`` (d, D); inputs ``y`` (B, d), ``x`` (B, D). Computed in the prior's dtype; the
    constant parts (gains, posterior covariances and their eigendecompositions) in float64.
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
        scaled = noise * self.post_evals[comp].clamp_min(0).sqrt()
        return mean + torch.einsum("nde,ne->nd", self.post_evecs[comp], scaled)
