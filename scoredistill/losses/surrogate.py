"""The gradient-to-scalar surrogate used by every score-distillation loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def surrogate_loss(x: Tensor, grad: Tensor) -> Tensor:
    """``0.5 * mean((x - stopgrad(x - grad))^2)``, whose gradient w.r.t. ``x`` is ``grad / numel``.

    The idiom of DreamFusion's SDS and ProlificDreamer's VSD implementations: it turns a
    gradient that skips the U-Net Jacobian into an ordinary loss. Computed in float32.
    Shapes: ``x`` and ``grad`` (B, ...).
    """
    if grad.shape != x.shape:
        raise ValueError(f"grad shape {tuple(grad.shape)} != x shape {tuple(x.shape)}")
    x = x.float()
    return 0.5 * F.mse_loss(x, (x - grad.float()).detach())
