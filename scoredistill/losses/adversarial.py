"""DMD2's adversarial terms: the non-saturating GAN loss of the generator and of its head."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def _check_logits(name: str, logit: Tensor) -> None:
    if not isinstance(logit, Tensor) or not logit.is_floating_point() or logit.ndim == 0 or (
            logit.shape[0] == 0):
        got = f"{logit.dtype} {tuple(logit.shape)}" if isinstance(logit, Tensor) else type(
            logit).__name__
        raise ValueError(f"{name} must be a floating (B, ...) tensor of discriminator logits "
                         f"with B >= 1, got {got}")


def gan_generator_loss(fake_logit: Tensor) -> Tensor:
    """The generator's non-saturating GAN loss ``mean softplus(-logit) = -mean log D(x)``.

    DMD2 (Yin et al., NeurIPS 2024), ``compute_generator_clean_cls_loss`` in tianweiy/DMD2's
    ``main/sd_guidance.py`` and FastGen's ``gan_loss_generator``: ``D = sigmoid(logit)`` the
    head's probability that a (re-noised) student sample is real. Its gradient w.r.t. the logit
    is negative: the generator raises the logit. Shapes: ``fake_logit`` (B, ...) -> scalar.
    """
    _check_logits("fake_logit", fake_logit)
    return F.softplus(-fake_logit.float()).mean()


def gan_discriminator_loss(real_logit: Tensor, fake_logit: Tensor) -> Tensor:
    """The head's loss ``mean softplus(fake) + mean softplus(-real)``: logistic, real = 1.

    DMD2's ``compute_guidance_clean_cls_loss`` (trained with the fake score, on detached
    student samples) and FastGen's ``gan_loss_discriminator``. Shapes: ``real_logit``
    (B_real, ...), ``fake_logit`` (B_fake, ...) -> scalar.
    """
    _check_logits("real_logit", real_logit)
    _check_logits("fake_logit", fake_logit)
    return F.softplus(fake_logit.float()).mean() + F.softplus(-real_logit.float()).mean()
