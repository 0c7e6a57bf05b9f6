"""SiD and SIM on LoRA roles of one backbone: one backbone call per step, the gradient into the
student's adapter only (the fake's adapter, trainable for its own step, gets none)."""

from __future__ import annotations

import pytest
import torch
from families import CallCounter
from tiny_models import LATENT, sd3_cond

from scoredistill import CFG, SiDLoss, SIMLoss

B = 2


@pytest.mark.parametrize("loss", [SiDLoss(), SIMLoss(c=1.0)], ids=["sid", "sim"])
def test_one_backbone_call_and_gradient_into_the_student_only(roles, loss):
    g = torch.Generator().manual_seed(5)
    z_lq = torch.randn(B, *LATENT, generator=g)
    cond, null = sd3_cond(B, seed=6), sd3_cond(1, seed=7)
    t = torch.full((B,), 1000.0)
    z_hat = z_lq - roles.student(z_lq, t, cond)
    counter = CallCounter(roles.backbone.module)
    out = loss(z_hat, cond, teacher=CFG(roles.teacher, 4.0, null), fake=roles.fake,
               index=torch.tensor([300, 700]), generator=g)
    assert counter.calls == 1  # teacher's two CFG branches and the fake: one fused call
    out.loss.backward()
    assert counter.calls == 1  # no second forward for the input gradient
    backbone = roles.backbone
    student = backbone.adapter_parameters("student")
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student)
    assert all(p.grad is None for p in backbone.adapter_parameters("fake"))
    base = [p for n, p in backbone.module.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in base)
