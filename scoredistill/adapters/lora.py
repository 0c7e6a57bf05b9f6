"""TSD-SR's LoRA roles on one shared SD3 transformer, and the VAE encoder's LoRA.

Module lists and ranks follow the TSD-SR release: the student (one-step generator) adapts
attention, the patch embedding, the AdaLN ``linear`` and ``proj_out`` at rank 64 (alpha 64,
Gaussian init); the fake score ("LoRA model") adapts the attention projections at rank 64; the
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

if TYPE_CHECKING:
    from peft import LoraConfig

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")
"""The fake score's LoRA modules (and the release's teacher LoRA)."""

STUDENT_TARGETS = (*ATTENTION_TARGETS, "proj", "linear", "proj_out")
"""The student's LoRA modules: attention, patch embedding, AdaLN modulation, output projection."""


def lora_config(targets: Sequence[str], rank: int = 64, alpha: float | None = None) -> LoraConfig:
    """A peft ``LoraConfig`` with Gaussian init (B = 0, so the adapter starts as the identity)."""
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha,
                      init_lora_weights="gaussian", target_modules=list(targets))


@dataclass(frozen=True)
class LoraRoles:
    """The three ScoreModel views on one backbone; ``backbone`` holds the weights once."""

    student: AdapterRole
    teacher: AdapterRole
    fake: AdapterRole
    backbone: SharedBackbone


def lora_roles(
    base: ScoreModel, *, student: LoraConfig | None = None, fake: LoraConfig | None = None,
    teacher_lora: str | Path | None = None, student_lora: str | Path | None = None,
) -> LoraRoles:
    """Add the student and fake-score adapters (and a teacher LoRA file) to ``base.module``.

    ``student``/``fake`` default to TSD-SR's configs (rank 64 on `STUDENT_TARGETS` /
    `ATTENTION_TARGETS`), an adapter of that name already on the module is kept;
    ``student_lora`` starts the student from a LoRA file (e.g. the
    release's ``transformer.safetensors``). The base weights and the teacher LoRA are frozen.

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
    for adapter, config in (("student", student or lora_config(STUDENT_TARGETS)),
                            ("fake", fake or lora_config(ATTENTION_TARGETS))):
        if not lora_state_dict(module, adapter):  # kept if already there (e.g. loaded)
            add_lora(module, config, adapter)
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
