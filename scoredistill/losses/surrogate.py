"""The gradient-to-scalar surrogate used by every score-distillation loss."""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

Surrogate = Literal["half_mse", "mse"]
"""``"half_mse"``: ``0.5 * F.mse_loss`` (DreamFusion, ProlificDreamer, DMD2); ``"mse"``:
``F.mse_loss`` (OSEDiff's ``distribution_matching_loss``, PiSA-SR's ``cal_csd``)."""

SURROGATES: dict[str, float] = {"half_mse": 0.5, "mse": 1.0}


def check_surrogate(form: str) -> Surrogate:
    """Return ``form`` if it names a surrogate, else raise a ``ValueError`` listing them."""
    if form not in SURROGATES:
        raise ValueError(f"unknown surrogate {form!r}; expected one of {sorted(SURROGATES)}")
    return form  # type: ignore[return-value]


def surrogate_loss(x: Tensor, grad: Tensor, form: Surrogate = "half_mse") -> Tensor:
    """``c * mean((x - stopgrad(x - grad))^2)``: value ``c * mean(grad^2)``, gradient w.r.t. ``x``
    ``2 c * grad / numel``, with ``c = 0.5`` ("half_mse") or ``c = 1`` ("mse").

    The idiom of DreamFusion's SDS and ProlificDreamer's VSD implementations ("half_mse", whose
    gradient is ``grad / numel``): it turns a gradient that skips the U-Net Jacobian into an
    ordinary loss. "mse" is the authors' ``F.mse_loss(latents, (latents - grad).detach())`` of
    OSEDiff and PiSA-SR, so its value is the one they log. Computed in float32.

    Args:
        x: The tensor the gradient flows to (B, ...), e.g. the student's output.
        grad: The direction (B, ...), held constant.
        form: "half_mse" (``c = 0.5``) or "mse" (``c = 1``).

    Raises:
        ValueError: For shapes that differ or an unknown ``form``.
    """
    if grad.shape != x.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} != x shape {tuple(x.shape)}")
    x = x.float()
    return SURROGATES[check_surrogate(form)] * F.mse_loss(x, (x - grad.float()).detach())
