"""The regulariser ``L_reg`` of TSD-SR's generator objective ``LPIPS + MSE + gamma L_reg``: TSD
(the paper, Eq. 5 with DASM) or another score-distillation loss of scoredistill in its place.

Every choice is the library's loss class, built here from the TrainConfig and called one way by
the step (`Regulariser.__call__`); the fake score's training, the LoRA roles on one backbone and
the index range (``--index-low/--index-high``) stay TSD-SR's for all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from scoredistill import (
    CFG,
    DASMSampler,
    DecoupledDMDLoss,
    DistillOutput,
    DMDLoss,
    ScoreModel,
    SiDLoss,
    SIMLoss,
    TSDLoss,
    UniformIndex,
    VSDLoss,
)

if TYPE_CHECKING:
    from examples.tsdsr.training.config import TrainConfig

# The choices of --regulariser, in the order the docs' table lists them.
REGULARISERS = ("tsd", "vsd", "dmd", "sid", "sim", "decoupled-dmd")
# Those with a DASM trajectory (TSD-SR Sec. 3.4): the direction-term losses. SiD and SIM
# differentiate the models at one level; decoupled DMD has two levels of its own.
WITH_DASM = frozenset({"tsd", "vsd", "dmd"})
# The fake score guided like the teacher (TSD-SR's release: CFG on both) or unguided, as the
# other methods' authors call it (DMD/DMD2, SiD, SIM, decoupled DMD: its DM term is
# fake - teacher_cond, so a guided fake would mix the CFG term into it).
GUIDED_FAKE = frozenset({"tsd", "vsd"})
SID_ALPHA = 1.0  # SiD-LSG's, the text-to-image version (the EDM version's is 1.2)
SIM_C = 1.0  # SIM's pseudo-Huber constant in x0 units (the paper leaves it to the user)


def check_regulariser(config: TrainConfig) -> None:
    """ValueError (one line, naming the field and the fix) for settings the chosen
    ``config.regulariser`` cannot honour: DASM, or a TSD-only option given another value."""
    name = config.regulariser
    if config.use_dasm and name not in WITH_DASM:
        raise ValueError(f"regulariser {name} has no DASM trajectory (only "
                         f"{', '.join(sorted(WITH_DASM))} do): pass --no-use-dasm "
                         "(use_dasm: false)")
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for field, users in (("tsd_lambda", {"tsd"}), ("tsd_space", {"tsd", "vsd"})):
        value = getattr(config, field)
        if name not in users and value != defaults[field]:
            raise ValueError(f"{field} {value!r} is read by --regulariser "
                             f"{' or '.join(sorted(users))} only, not {name}: drop it")


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
}


@dataclass(frozen=True)
class Regulariser:
    """A library loss and the roles it is called with: ``name``, ``loss``, ``guided_fake``."""

    name: str
    loss: Any  # one of scoredistill's distillation losses (all return a DistillOutput)
    guided_fake: bool

    @classmethod
    def from_config(cls, config: TrainConfig) -> Regulariser:
        """The loss ``config.regulariser`` names, with the config's index range and DASM."""
        index = UniformIndex(config.index_low, config.index_high)
        name = config.regulariser
        return cls(name, _BUILDERS[name](config, index), name in GUIDED_FAKE)

    def __call__(self, z_hat: Tensor, cond: dict[str, Tensor], z: Tensor, *,
                 teacher: ScoreModel, fake: ScoreModel, cfg_scale: float,
                 null: dict[str, Tensor], generator: torch.Generator) -> DistillOutput:
        """The loss at the student's ``z_hat`` (B, 16, h, w), ``z`` (B, 16, h, w) the HQ latent
        (read by TSD's TSM part only); the teacher is guided with ``cfg_scale``."""
        guided_fake = CFG(fake, cfg_scale, null) if self.guided_fake else fake
        inputs = self.loss.select_inputs(teacher=CFG(teacher, cfg_scale, null),
                                         fake=guided_fake, z=z)
        return self.loss(z_hat, cond, **inputs, generator=generator)
