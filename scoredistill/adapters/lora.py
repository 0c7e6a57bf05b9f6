"""LoRA roles (student, teacher, fake score) on one shared backbone, and the VAE encoder's LoRA.

Ranks follow the TSD-SR release: rank 64, alpha 64, Gaussian init, for both adapters; the module
lists are the backbone family's `LoraTargets` (SD3: TSD-SR's; FLUX, UNets: `targets`). The
teacher is the base, optionally with a teacher LoRA fine-tuned beforehand.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from ..protocols import ScoreModel
from .lora_io import add_lora, load_lora, lora_state_dict
from .shared import AdapterRole, SharedBackbone
from .targets import LoraTargets

if TYPE_CHECKING:
    from peft import LoraConfig


def lora_config(targets: Sequence[str], rank: int = 64, alpha: float | None = None, *,
                exclude: str | None = None) -> LoraConfig:
    """A peft ``LoraConfig`` with Gaussian init (B = 0, so the adapter starts as the identity).

    Args:
        targets: Module names or their dotted suffixes.
        rank: The LoRA rank.
        alpha: The LoRA scale's numerator (None: ``rank``, a scale of 1).
        exclude: A regex of full module names to skip (a family's `LoraTargets.exclude`, e.g.
            ``FLUX2_TARGETS.exclude``).
    """
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha,
                      init_lora_weights="gaussian", target_modules=list(targets),
                      exclude_modules=exclude)


@dataclass(frozen=True)
class LoraRoles:
    """The three ScoreModel views on one backbone.

    Attributes:
        student: The student's view (its trainable adapter).
        teacher: The teacher's view (the base weights, or its LoRA file's adapter).
        fake: The fake score's view (its trainable adapter).
        backbone: The shared backbone, which holds the weights once.
    """

    student: AdapterRole
    teacher: AdapterRole
    fake: AdapterRole
    backbone: SharedBackbone


def lora_roles(
    base: ScoreModel, *, student: LoraConfig | None = None, fake: LoraConfig | None = None,
    teacher_lora: str | Path | None = None, student_lora: str | Path | None = None,
) -> LoraRoles:
    """Add the student and fake-score adapters (and a teacher LoRA file) to ``base.module``.

    An adapter of the role's name already on the module is kept. The base weights and the
    teacher LoRA are frozen.

    Args:
        base: The backbone's ScoreModel (e.g. `SD3ScoreModel`).
        student: The student's LoRA config; default rank 64 on the family's
            ``base.lora_targets`` (SD3: TSD-SR's `STUDENT_TARGETS`; `FLUX_TARGETS`;
            `FLUX2_TARGETS`; `UNET_TARGETS`).
        fake: The fake score's LoRA config; default rank 64 on the family's fake targets (SD3:
            `ATTENTION_TARGETS`).
        teacher_lora: A LoRA file fine-tuned into the teacher beforehand (None: base weights).
        student_lora: A LoRA file the student starts from (e.g. the release's
            ``transformer.safetensors``).

    Returns:
        The student, teacher and fake views on the one backbone.

    Example:
        >>> roles = lora_roles(SD3ScoreModel(transformer))
        >>> z_hat = z_lq - roles.student(z_lq, t_1000, c_default)
        >>> teacher = CFG(roles.teacher, 7.5, null)
        >>> fake = CFG(roles.fake, 7.5, null)
        >>> out = TSDLoss(dasm=DASMSampler())(z_hat, cond, teacher=teacher, fake=fake,
        ...                                   z=z)
    """
    module: nn.Module = base.module  # type: ignore[attr-defined]
    module.requires_grad_(False)
    targets: LoraTargets | None = getattr(base, "lora_targets", None)
    if targets is None and (student is None or fake is None):
        raise ValueError(f"{type(base).__name__} has no default LoRA targets: pass student= and "
                         "fake= as lora_config([...module names...])")
    for adapter, config, default in (("student", student, targets and targets.student),
                                     ("fake", fake, targets and targets.fake)):
        if not lora_state_dict(module, adapter):  # kept if already there (e.g. loaded)
            add_lora(module, config or lora_config(default, exclude=targets and targets.exclude),
                     adapter)
    if student_lora is not None:
        load_lora(student_lora, module, "student")
    if teacher_lora is not None:
        load_lora(teacher_lora, module, "teacher")
    backbone = SharedBackbone(base, trainable=("student", "fake"))
    teacher = backbone.role("teacher" if teacher_lora is not None else None)
    return LoraRoles(backbone.role("student"), teacher, backbone.role("fake"), backbone)


def vae_lora_targets(vae: nn.Module) -> list[str]:
    """Every conv and linear layer of the VAE encoder, plus ``quant_conv`` where it exists."""
    return [name for name, m in vae.named_modules()
            if isinstance(m, nn.Conv2d | nn.Linear)
            and (name.startswith("encoder.") or name == "quant_conv")]


def add_vae_lora(vae: nn.Module, rank: int = 64, adapter: str = "default") -> None:
    """TSD-SR's trainable VAE encoder: LoRA rank ``rank`` on `vae_lora_targets`, decoder
    frozen."""
    vae.requires_grad_(False)
    add_lora(vae, lora_config(vae_lora_targets(vae), rank), adapter)
