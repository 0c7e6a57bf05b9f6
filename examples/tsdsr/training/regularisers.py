"""The regulariser ``L_reg`` of TSD-SR's generator objective ``LPIPS + MSE + gamma L_reg``: TSD
(the paper, Eq. 5 with DASM) or another score-distillation loss of scoredistill in its place.

Every choice is the library's loss class, built here from the TrainConfig and called one way by
the step (`Regulariser.__call__`); the fake score's training, the LoRA roles on one backbone and
the index range (``--index-low/--index-high``) stay TSD-SR's for all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from examples.tsdsr.training.config import TrainConfig
from scoredistill import (
    CFG,
    DASMSampler,
    DecoupledDMDLoss,
    DiscriminatorHead,
    DistillOutput,
    DMDLoss,
    FDistillLoss,
    GANHeadLoss,
    GANTerm,
    ScoreModel,
    SiDLoss,
    SIMLoss,
    TSDLoss,
    UniformIndex,
    VSDLoss,
)
from scoredistill.losses.adversarial import HeadOutput

if TYPE_CHECKING:
    from scoredistill.adapters import LoraRoles

# Whose features the discriminator head reads: DMD2's head is on the fake score's bottleneck
# (trained with it, through its LoRA); f-distill's on the frozen teacher's, as NVlabs FastGen.
HEAD_ROLE: dict[str, Literal["fake", "teacher"]] = {"f-kl": "teacher", "f-js": "teacher",
                                                      "dmd2-gan": "fake"}
GAN_WEIGHT = 1e-3  # the generator's GAN term (DMD2 on SD 1.5, FastGen's default)
HEAD_WEIGHT = 1e-2  # the head's loss beside the fake score's (DMD2's guidance_cls_loss_weight)
# The fake score guided like the teacher (TSD-SR's release: CFG on both) or unguided, as the
# other methods' authors call it (DMD/DMD2, SiD, SIM, decoupled DMD: its DM term is
# fake - teacher_cond, so a guided fake would mix the CFG term into it).
GUIDED_FAKE = frozenset({"tsd", "vsd"})
SID_ALPHA = 1.0  # SiD-LSG's, the text-to-image version (the EDM version's is 1.2)
SIM_C = 1.0  # SIM's pseudo-Huber constant in x0 units (the paper leaves it to the user)


def _dasm(config: TrainConfig) -> DASMSampler | None:
    return (DASMSampler(config.dasm_points, config.dasm_step, tuple(config.dasm_weights),
                        tuple(config.dasm_bias)) if config.use_dasm else None)


# Per choice, its loss from the config; check_finite=False everywhere: the step checks the
# total loss itself and skips the update, not raises.
_BUILDERS: dict[str, Callable[[TrainConfig, UniformIndex], Any]] = {
    "tsd": lambda c, index: TSDLoss(lam=c.tsd_lambda, space=c.tsd_space, dasm=_dasm(c),
                                    index_sampler=index, check_finite=False),
    "vsd": lambda c, index: VSDLoss(space=c.tsd_space, dasm=_dasm(c), index_sampler=index,
                                    check_finite=False),
    "dmd": lambda c, index: DMDLoss(dasm=_dasm(c), index_sampler=index, check_finite=False),
    "sid": lambda c, index: SiDLoss(alpha=SID_ALPHA, index_sampler=index, check_finite=False),
    "sim": lambda c, index: SIMLoss(c=SIM_C, index_sampler=index, check_finite=False),
    # A one-step student's input is pure noise, so any level is "cleaner" for the CA term.
    "decoupled-dmd": lambda c, index: DecoupledDMDLoss(dm_index_sampler=index,
                                                       ca_index_sampler=index,
                                                       check_finite=False),
    # f-distill as FastGen runs it: r from the head on the teacher's features at DMD's noisy
    # sample, plus DMD2's GAN term read there too (index_sampler=None). But h(r) is normalised
    # by its batch mean, not per time bin (FastGen's 10 bins): with TSD-SR's 2 samples per
    # process each sample would mostly sit alone in its bin, where h / mean h = 1 is DMD's.
    **{f"f-{div}": lambda c, index, div=div: FDistillLoss(
        divergence=div, dasm=_dasm(c), index_sampler=index, check_finite=False, time_bins=None,
        gan=GANTerm(weight=GAN_WEIGHT, role="teacher", index_sampler=None))
       for div in ("kl", "js")},
    # DMD2: the GAN term on a sample re-noised at any level, the fake score's features.
    "dmd2-gan": lambda c, index: DMDLoss(dasm=_dasm(c), index_sampler=index, check_finite=False,
                                         gan=GANTerm(weight=GAN_WEIGHT, role="fake")),
}


def discriminator_head(name: str, roles: LoraRoles) -> nn.Module | None:
    """The head regulariser ``name`` trains (`DiscriminatorHead` on its role's default feature
    layer: SD3's middle block), or None if it has none."""
    role = HEAD_ROLE.get(name)
    return None if role is None else DiscriminatorHead.for_model(getattr(roles, role))


@dataclass(frozen=True)
class Regulariser:
    """A library loss and the roles it is called with: ``name``, ``loss``, ``guided_fake``;
    ``head_role``, whose features its discriminator head reads (None: no head)."""

    name: str
    loss: Any  # one of scoredistill's distillation losses (all return a DistillOutput)
    guided_fake: bool
    head_role: Literal["fake", "teacher"] | None = None

    @classmethod
    def from_config(cls, config: TrainConfig) -> Regulariser:
        """The loss ``config.regulariser`` names, with the config's index range and DASM."""
        index = UniformIndex(config.index_low, config.index_high)
        name = config.regulariser
        return cls(name, _BUILDERS[name](config, index), name in GUIDED_FAKE,
                   HEAD_ROLE.get(name))

    def __call__(self, z_hat: Tensor, cond: dict[str, Tensor], z: Tensor, *,
                 teacher: ScoreModel, fake: ScoreModel, cfg_scale: float,
                 null: dict[str, Tensor], generator: torch.Generator,
                 head: nn.Module | None = None) -> DistillOutput:
        """The loss at the student's ``z_hat`` (B, 16, h, w), ``z`` (B, 16, h, w) the HQ latent
        (read by TSD's TSM part only); the teacher is guided with ``cfg_scale``; ``head``: the
        discriminator head, for a regulariser with one."""
        guided_fake = CFG(fake, cfg_scale, null) if self.guided_fake else fake
        inputs = self.loss.select_inputs(teacher=CFG(teacher, cfg_scale, null),
                                         fake=guided_fake, z=z)
        if self.head_role is not None:
            inputs["head"] = head
        return self.loss(z_hat, cond, **inputs, generator=generator)

    def head_loss(self, z: Tensor, z_hat: Tensor, cond: dict[str, Tensor], roles: LoraRoles,
                  head: nn.Module, generator: torch.Generator) -> HeadOutput:
        """The head's logistic loss (`GANHeadLoss`): HQ latents ``z`` real, the student's
        ``z_hat`` fake (B, 16, h, w), both re-noised at any level, on ``head_role``'s
        features; its gradient reaches the head and (DMD2) the fake score's LoRA."""
        model = getattr(roles, self.head_role)  # type: ignore[arg-type]
        return GANHeadLoss()(z, z_hat.detach(), cond, model=model, head=head,
                             generator=generator)
