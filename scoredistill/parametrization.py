"""Pure conversions between the epsilon, v, x0 and flow-velocity parametrisations.

All functions assume ``x_t = alpha * x0 + sigma * eps`` with ``alpha``/``sigma`` broadcastable to
``x_t`` (use `expand_like`). ``v`` is Salimans & Ho's ``alpha*eps - sigma*x0`` (Progressive
Distillation, Sec. 4); ``flow`` is the rectified-flow velocity ``eps - x0`` (Liu et al. 2022; SD3).
"""

from __future__ import annotations

from torch import Tensor

from .protocols import PREDICTIONS, Prediction


def expand_like(coef: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample coefficients (B,) to (B, 1, ..., 1) so they broadcast against ``x``."""
    if coef.ndim != 1 or coef.shape[0] != x.shape[0]:
        raise ValueError(f"expected per-sample coefficients of shape ({x.shape[0]},), "
                         f"got {tuple(coef.shape)}")
    return coef.reshape(-1, *([1] * (x.ndim - 1)))


def check_prediction(kind: str) -> Prediction:
    """Return ``kind`` if it names a parametrisation, else raise a ``ValueError``."""
    if kind not in PREDICTIONS:
        raise ValueError(f"unknown prediction {kind!r}; expected one of {PREDICTIONS}")
    return kind  # type: ignore[return-value]


def check_alpha_nonzero(alpha: Tensor, what: str) -> None:
    """ValueError if any ``alpha`` is 0, where ``x0 = (x_t - sigma eps) / alpha`` is undefined.

    Zero-terminal-SNR VP tables and rectified flow's index 0 have ``alpha = 0``: an epsilon
    prediction there determines no ``x0``. One host sync; callers check only for epsilon models.
    """
    if bool((alpha == 0).any()):
        raise ValueError(f"{what}: an epsilon prediction at alpha = 0 (the pure-noise end of the "
                         "schedule, e.g. zero terminal SNR) determines no x0 = (x_t - sigma eps) "
                         "/ alpha; draw indices >= 1 (index_sampler) or use a v-prediction model")


def to_x0_eps(pred: Tensor, kind: Prediction, x_t: Tensor, alpha: Tensor,
              sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Recover ``(x0, eps)`` from a prediction of the given kind at ``x_t``. Shapes: (B, ...).

    ``epsilon`` divides by ``alpha`` (undefined at ``alpha = 0``: see `check_alpha_nonzero`),
    ``x0`` by ``sigma``; ``v`` and ``flow`` never divide by zero.

    Args:
        pred: The prediction (B, ...).
        kind: Its parametrisation.
        x_t: The noisy input (B, ...) it was made at.
        alpha: Signal scales broadcastable to ``x_t`` (`expand_like`).
        sigma: Noise scales broadcastable to ``x_t``.
    """
    if kind == "epsilon":
        eps = pred
        return (x_t - sigma * eps) / alpha, eps
    if kind == "x0":
        return pred, (x_t - alpha * pred) / sigma
    if kind == "v":
        # Solve [alpha sigma; -sigma alpha] [x0; eps] = [x_t; v]; det = alpha^2 + sigma^2.
        det = alpha**2 + sigma**2
        return (alpha * x_t - sigma * pred) / det, (sigma * x_t + alpha * pred) / det
    if kind == "flow":
        # x_t = (alpha + sigma) x0 + sigma * u with u = eps - x0.
        x0 = (x_t - sigma * pred) / (alpha + sigma)
        return x0, pred + x0
    raise ValueError(f"unknown prediction {kind!r}; expected one of {PREDICTIONS}")


def from_x0_eps(x0: Tensor, eps: Tensor, kind: Prediction, alpha: Tensor,
                sigma: Tensor) -> Tensor:
    """The prediction of the given kind that is exactly right for the pair ``(x0, eps)``."""
    if kind == "epsilon":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return alpha * eps - sigma * x0
    if kind == "flow":
        return eps - x0
    raise ValueError(f"unknown prediction {kind!r}; expected one of {PREDICTIONS}")


def convert(pred: Tensor, src: Prediction, dst: Prediction, x_t: Tensor, alpha: Tensor,
            sigma: Tensor) -> Tensor:
    """Convert a prediction from parametrisation ``src`` to ``dst`` at ``x_t``. Shapes: (B, ...).

    Args:
        pred: The prediction (B, ...) in ``src``.
        src: Its parametrisation.
        dst: The parametrisation returned.
        x_t: The noisy input (B, ...) it was made at.
        alpha: Signal scales broadcastable to ``x_t`` (`expand_like`).
        sigma: Noise scales broadcastable to ``x_t``.
    """
    if src == dst:
        return pred
    return from_x0_eps(*to_x0_eps(pred, src, x_t, alpha, sigma), dst, alpha, sigma)


def ddim_step(x_t: Tensor, pred: Tensor, kind: Prediction, alpha: Tensor, sigma: Tensor,
              alpha_next: Tensor, sigma_next: Tensor) -> Tensor:
    """Move ``x_t`` to another noise level along the prediction (deterministic DDIM step).

    For rectified flow this is exactly the Euler step of TSD-SR Eq. (6):
    ``x_next = x_t + (sigma_next - sigma) * u``. Shapes: (B, ...).

    Args:
        x_t: The noisy sample (B, ...) at ``(alpha, sigma)``.
        pred: The model's prediction (B, ...) at ``x_t``.
        kind: Its parametrisation.
        alpha: Signal scales at ``x_t``, broadcastable to it.
        sigma: Noise scales at ``x_t``.
        alpha_next: Signal scales of the target level.
        sigma_next: Noise scales of the target level.
    """
    x0, eps = to_x0_eps(pred, kind, x_t, alpha, sigma)
    return alpha_next * x0 + sigma_next * eps
