"""DMD2's adversarial terms: the non-saturating GAN loss of the generator and of its head.

The head reads a role's hidden states (`scoredistill.features`) from the batched call the loss
already makes; `GANTerm` adds the generator's term to DMD / f-distill, `GANHeadLoss` is the
head's own loss on re-noised data and student samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..batching import predict_features
from ..messages import brief
from ..parametrization import expand_like
from ..protocols import Cond, ScoreModel
from ..samplers.timesteps import IndexSampler, UniformIndex, check_number
from ..schedules import index_alpha_sigma
from .validation import check_inputs, check_option, draw_level

_PAIRED = object()
"""`GANHeadLoss`'s default ``real_cond``: the condition of ``z_hat``."""


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


def check_head(head: object, owner: str) -> nn.Module:
    """``head`` if it is an ``nn.Module`` (the user's discriminator head), else one line."""
    if not isinstance(head, nn.Module):
        raise ValueError(f"{owner} needs head=, the discriminator head (an nn.Module such as "
                         f"scoredistill.DiscriminatorHead.for_model(fake)), got {brief(head)}")
    return head


@dataclass(frozen=True, kw_only=True)
class GANTerm:
    """DMD2's adversarial generator term, added to a `DMDLoss` / `FDistillLoss` (``gan=``).

    ``weight * mean softplus(-head(features(x_gan)))`` (`gan_generator_loss`) with ``x_gan``
    the student's output re-noised at a level of its own (DMD2's "diffusion GAN",
    ``diffusion_gan_max_timestep=1000``: any level), its features the hidden states of the
    ``role``'s call (`scoredistill.features`) evaluated in the batched call the distillation
    term already makes (`scoredistill.batching.riding`). The gradient runs through the
    backbone and the head to the student's output, into no model's or head's parameters.

    Attributes:
        weight: The term's weight (DMD2: 1e-3 on SD 1.5, 5e-3 on SDXL; FastGen 1e-3).
        role: Whose features: "fake" (DMD2, the fake score's bottleneck) or "teacher"
            (FastGen).
        layer: The feature layer (None: the adapter's default, `feature_layer`).
        index_sampler: The re-noise level; None: the distillation term's own level and noise
            (FastGen reads the features at that sample).
        fused: True: the GAN sample joins the distillation term's batched call, so the step
            makes no extra backbone call; that call then runs with autograd on and the GAN
            term's backward runs through all its rows (teacher, fake and GAN sample). False:
            the GAN sample in a call of its own, as DMD2 does, whose backward runs through its
            B rows only: faster where the backward dominates (CPU, a 2.4 M-parameter
            SD3-shaped model at 32x32 latents, B = 4, CFG teacher: 3.3 to 3.5 s per generator
            step fused, 2.1 to 3.0 s separate, 1.6 to 1.8 s for DMD alone, a shared machine).

    Example:
        >>> loss_fn = DMDLoss(gan=GANTerm(weight=5e-3))
        >>> out = loss_fn(z_hat, cond, teacher=teacher, fake=roles.fake, head=head)
    """

    weight: float = 1e-3
    role: Literal["fake", "teacher"] = "fake"
    layer: str | None = None
    index_sampler: IndexSampler | None = field(default_factory=lambda: UniformIndex(0, 1000))
    fused: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.fused, bool):
            raise ValueError(f"GANTerm(fused=...): expected True or False, got "
                             f"{brief(self.fused)}")
        check_option("GANTerm", "weight", lambda: check_number(self.weight, "weight"))
        if self.weight < 0:
            raise ValueError(f"GANTerm(weight=...): expected >= 0 (a negative weight turns the "
                             f"generator against the head's 'real'), got {self.weight}")
        if self.role not in ("fake", "teacher"):
            raise ValueError(f"GANTerm(role=...): expected 'fake' or 'teacher', got "
                             f"{brief(self.role)}")
        if self.layer is not None and not isinstance(self.layer, str):
            raise ValueError(f"GANTerm(layer=...): expected a layer name or None, got "
                             f"{brief(self.layer)}")
        if self.index_sampler is not None and not callable(self.index_sampler):
            raise ValueError(f"GANTerm(index_sampler=...): expected an IndexSampler such as "
                             f"UniformIndex(0, 1000) or None, got {brief(self.index_sampler)}")


@dataclass(frozen=True)
class HeadOutput:
    """The head's loss and its logits, for logging.

    Attributes:
        loss: `gan_discriminator_loss` of the logits (scalar).
        real_logit: The head's logits (B_real,) on the re-noised data, detached.
        fake_logit: The head's logits (B,) on the re-noised student samples, detached.
    """

    loss: Tensor
    real_logit: Tensor
    fake_logit: Tensor


@dataclass(frozen=True, kw_only=True)
class GANHeadLoss:
    """The discriminator head's logistic loss on one model's features (DMD2's
    ``compute_guidance_clean_cls_loss``; FastGen's ``gan_loss_discriminator``).

    Data ``real`` and the student's samples ``z_hat`` (both detached) are re-noised at levels
    drawn by ``index_sampler``, the ``model``'s features read at both in ONE batched call, and
    ``softplus(head(fake)) + softplus(-head(real))`` averaged. Gradients reach the head and the
    model's trainable parameters: with the fake score's LoRA role, as in DMD2, where the head
    loss is trained together with the fake score (add it to the fake score's diffusion loss);
    with the frozen teacher only the head learns, as in FastGen.

    Attributes:
        layer: The feature layer (None: the adapter's default); the `GANTerm`'s.
        index_sampler: The re-noise levels (DMD2: any level).

    Example:
        >>> head_loss = GANHeadLoss()(hq_latents, z_hat, cond, model=roles.fake, head=head)
        >>> (fake_loss + 1e-2 * head_loss.loss).backward()  # DMD2's guidance_cls_loss_weight
    """

    layer: str | None = None
    index_sampler: IndexSampler = field(default_factory=lambda: UniformIndex(0, 1000))

    def __post_init__(self) -> None:
        if not callable(self.index_sampler):
            raise ValueError(f"GANHeadLoss(index_sampler=...): expected an IndexSampler such as "
                             f"UniformIndex(0, 1000), got {brief(self.index_sampler)}")

    def __call__(self, real: Tensor, z_hat: Tensor, cond: Cond = None, *, model: ScoreModel,
                 head: nn.Module, real_cond: Cond | object = _PAIRED,
                 generator: torch.Generator | None = None) -> HeadOutput:
        """The head's loss on data ``real`` (B_real, ...) and student samples ``z_hat`` (B, ...).

        Args:
            real: Data latents (B_real, ...), e.g. the HQ latents; detached.
            z_hat: The student's outputs (B, ...); detached.
            cond: ``z_hat``'s condition (batch B).
            model: The model whose features the head reads (the `GANTerm`'s role).
            head: The discriminator head, ``features -> (N,)`` logits.
            real_cond: ``real``'s condition; default ``cond`` (paired data).
            generator: Draws the levels and noise.

        Returns:
            The loss with the detached logits (`HeadOutput`).
        """
        head = check_head(head, "GANHeadLoss")
        real_cond = cond if real_cond is _PAIRED else real_cond
        calls = []
        for x, c, name in ((real, real_cond, "real"), (z_hat, cond, "z_hat")):
            x = x.detach()
            index, noise = draw_level(x, model.schedule.num_steps, self.index_sampler, None,
                                      None, generator)
            check_inputs(x, None, noise, c, index, None, x_name=name)
            t, alpha, sigma = index_alpha_sigma(model.schedule, index)
            x_t = expand_like(alpha, x) * x.float() + expand_like(sigma, x) * noise.float()
            calls.append((model, x_t, t, c))
        _, features = predict_features(calls, ["model at the data", "model at z_hat"],
                                       {0: self.layer, 1: self.layer})
        real_logit, fake_logit = head(features[0]), head(features[1])
        for name, logit, x in (("real", real_logit, real), ("z_hat", fake_logit, z_hat)):
            if logit.shape != (x.shape[0],):
                raise ValueError(f"the head returned logits of shape {tuple(logit.shape)} for "
                                 f"{x.shape[0]} samples of {name}: it must return (N,)")
        return HeadOutput(gan_discriminator_loss(real_logit, fake_logit), real_logit.detach(),
                          fake_logit.detach())
