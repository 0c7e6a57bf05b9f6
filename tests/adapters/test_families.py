"""Every family runs VSD, TSD + DASM, DMD and CSD through LoRA roles on ONE shared backbone, with
gradients equal to one copy of the base per role, checkpointing on and off, and one backbone call
per DASM point."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from families import FAMILIES, CallCounter, Family

from scoredistill import CFG, CSDLoss, DASMSampler, DiffusionLoss, DMDLoss, TSDLoss, VSDLoss
from scoredistill.adapters import lora_state_dict

B, SCALE = 2, 7.5

LOSSES = {
    # name: (loss, CFG on the fake score, needs the target latent z)
    "vsd": (VSDLoss, True),
    "tsd+dasm": (lambda: TSDLoss(dasm=DASMSampler()), True),
    "dmd": (DMDLoss, False),  # OSEDiff/DMD2: unguided fake score
    "csd": (CSDLoss, None),  # no fake score
}


def data(family: Family):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(B, *family.shape, generator=g), torch.randn(B, *family.shape, generator=g),
            family.cond(B, 6), family.cond(1, 7))


def train_step(family: Family, loss_name: str, student, teacher, fake):
    """Generator loss (distillation + latent MSE) and the fake-score loss, backward at the end."""
    build, fake_cfg = LOSSES[loss_name]
    z_lq, z, cond, null = data(family)
    t = student.schedule.timesteps(torch.zeros(B, dtype=torch.long))  # the noisiest level
    z_hat = z_lq - student(z_lq, t, cond)
    fake_model = None if fake_cfg is None else CFG(fake, SCALE, null) if fake_cfg else fake
    loss = build()
    out = loss(z_hat, cond, generator=torch.Generator().manual_seed(0), **loss.select_inputs(
        teacher=CFG(teacher, SCALE, null), fake=fake_model, z=z))
    (out.loss + F.mse_loss(z_hat, z)).backward()
    if fake_model is not None:
        # Backward after the other forwards: recomputation must not see their adapter selection.
        gen = torch.Generator().manual_seed(1)
        DiffusionLoss()(z_hat, cond, model=fake, generator=gen).loss.backward()
    return out


def grads(module, adapter):
    return {k: p.grad.clone() for k, p in lora_state_dict(module, adapter).items()
            if p.grad is not None}


TRAINED = ("sd3", "sd35", "flux-dev", "flux2-dev", "flux2-klein", "sdxl", "sd2")
CASES = [(f, loss, False) for f in TRAINED for loss in LOSSES]
CASES += [(f, "tsd+dasm", True) for f in TRAINED]


@pytest.mark.parametrize(("family_name", "loss_name", "checkpointing"), CASES)
def test_shared_gradients_equal_one_copy_per_role(family_name, loss_name, checkpointing):
    family = FAMILIES[family_name]
    roles = family.roles()
    refs = {a: family.single_role_copy(roles, a) for a in ("student", "fake", None)}
    shared_module = roles.backbone.module
    if checkpointing:
        for m in (shared_module, *(r.module for r in refs.values())):
            m.enable_gradient_checkpointing()
    counter = CallCounter(shared_module)
    shared_module.set_adapter("fake")  # peft's global active adapter: the roles must not care
    out = train_step(family, loss_name, roles.student, roles.teacher, roles.fake)
    ref = train_step(family, loss_name, refs["student"], refs[None], refs["fake"])

    # CFG 7.5 amplifies float32 rounding of the differently batched calls: tolerance per scale.
    torch.testing.assert_close(out.grad, ref.grad, rtol=1e-4,
                               atol=1e-4 * ref.grad.abs().max().item())
    uses_fake = LOSSES[loss_name][1] is not None
    for adapter in ("student", "fake") if uses_fake else ("student",):
        got, want = grads(shared_module, adapter), grads(refs[adapter].module, adapter)
        assert got.keys() == want.keys() and any(g.abs().sum() > 0 for g in got.values())
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4,
                                       atol=1e-4 * want[key].abs().max().item())
    # One student call, one fused backbone call per (DASM) point, one fake-score call.
    assert counter.calls == 1 + out.index.shape[1] + uses_fake
    if checkpointing:  # student and fake blocks re-run in backward
        assert counter.block_calls == counter.calls + 1 + uses_fake
