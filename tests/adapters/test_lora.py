"""LoRA roles on one shared backbone vs one deep copy of the base per role (the reference)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from tiny_models import LATENT, sd3_cond, small_config, tiny_sd3_transformer

from scoredistill import CFG, DASMSampler, DiffusionLoss, TSDLoss, predict_batched
from scoredistill.adapters import SD3ScoreModel, SharedBackbone, add_lora, lora_state_dict

B = 2


class CallCounter:
    """Counts backbone forward calls (and, optionally, calls of its first block)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.block_calls = 0
        module.register_forward_pre_hook(lambda *_: self._count("calls"))
        blocks = getattr(module, "transformer_blocks", None)
        if blocks is not None:
            blocks[0].register_forward_pre_hook(lambda *_: self._count("block_calls"))

    def _count(self, what: str) -> None:
        setattr(self, what, getattr(self, what) + 1)


def single_role_copy(roles, adapter: str | None) -> SD3ScoreModel:
    """A fresh copy of the base transformer carrying only ``adapter`` (the release's layout)."""
    module = tiny_sd3_transformer()
    module.requires_grad_(False)
    if adapter is not None:
        add_lora(module, small_config(adapter), adapter)
        with torch.no_grad():
            shared = lora_state_dict(roles.backbone.module, adapter)
            for key, p in lora_state_dict(module, adapter).items():
                p.copy_(shared[key])
    return SD3ScoreModel(module)


def data():
    g = torch.Generator().manual_seed(5)
    return (torch.randn(B, *LATENT, generator=g), torch.randn(B, *LATENT, generator=g),
            sd3_cond(B, seed=6), sd3_cond(1, seed=7))


def train_step(student, teacher, fake):
    """Generator loss (TSD + DASM + latent MSE) and fake-score loss; both backward at the end."""
    z_lq, z, cond, null = data()
    t = torch.full((B,), 1000.0)
    z_hat = z_lq - student(z_lq, t, cond)  # sigma(1000) = 1
    tsd = TSDLoss(dasm=DASMSampler())(z_hat, cond, teacher=CFG(teacher, 7.5, null),
                                      fake=CFG(fake, 7.5, null), z=z,
                                      generator=torch.Generator().manual_seed(0))
    gen_loss = tsd.loss + F.mse_loss(z_hat, z)
    fake_loss = DiffusionLoss()(z_hat, cond, model=fake,
                                generator=torch.Generator().manual_seed(1)).loss
    # Backward after the other forwards: recomputation must not see their adapter selection.
    gen_loss.backward()
    fake_loss.backward()
    return tsd


def grads(module, adapter):
    return {k: p.grad.clone() for k, p in lora_state_dict(module, adapter).items()}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_gradients_equal_one_copy_per_role(roles, checkpointing):
    refs = {a: single_role_copy(roles, a) for a in ("student", "fake", None)}
    shared_module = roles.backbone.module
    for m in (shared_module, *(r.module for r in refs.values())):
        if checkpointing:
            m.enable_gradient_checkpointing()
    counter = CallCounter(shared_module)
    # peft's global active adapter is left on the fake score: the roles must not care.
    shared_module.set_adapter("fake")
    out = train_step(roles.student, roles.teacher, roles.fake)
    ref = train_step(refs["student"], refs[None], refs["fake"])
    # CFG 7.5 amplifies float32 rounding of the differently batched calls: tolerance per scale.
    torch.testing.assert_close(out.grad, ref.grad, rtol=1e-4,
                               atol=1e-4 * ref.grad.abs().max().item())
    for adapter in ("student", "fake"):
        got, want = grads(shared_module, adapter), grads(refs[adapter].module, adapter)
        assert got.keys() == want.keys() and any(g.abs().sum() > 0 for g in got.values())
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4,
                                       atol=1e-4 * want[key].abs().max().item())
    # One student call, one fused call per DASM point, one fake-score call.
    assert counter.calls == 1 + 4 + 1
    recomputed = 2 if checkpointing else 0  # student and fake blocks re-run in backward
    assert counter.block_calls == counter.calls + recomputed


def test_recomputation_without_pinning_fails(roles, monkeypatch):
    # The pinning is what makes checkpointed backward right: without it the student's blocks are
    # recomputed with peft's active adapter (the fake score's), which torch detects here because
    # the two adapters cover different layers (with equal layers the gradients would be wrong).
    roles.backbone.module.enable_gradient_checkpointing()
    z_lq, z, cond, _ = data()
    t = torch.full((B,), 1000.0)
    monkeypatch.setattr(SharedBackbone, "_pinned_checkpointing",
                        lambda self, names: contextlib.nullcontext())
    roles.backbone.module.set_adapter("fake")
    loss = F.mse_loss(z_lq - roles.student(z_lq, t, cond), z)
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        loss.backward()


def test_dasm_point_is_one_backbone_call_equal_to_sequential_calls(roles):
    x, z, cond, null = data()
    t = roles.teacher.schedule.timesteps(torch.tensor([300, 700]))
    teacher, fake = CFG(roles.teacher, 7.5, null), CFG(roles.fake, 7.5, null)
    counter = CallCounter(roles.backbone.module)
    with torch.no_grad():
        fused = predict_batched([(teacher, x, t, cond), (teacher, z, t, cond), (fake, x, t, cond)])
        assert counter.calls == 1
        sequential = [teacher(x, t, cond), teacher(z, t, cond), fake(x, t, cond)]
    assert counter.calls == 4
    for a, b in zip(fused, sequential, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    assert not torch.allclose(fused[0], fused[2], atol=1e-3)  # the fake adapter does act


def test_roles_hold_the_base_weights_once(roles):
    module = roles.backbone.module
    base = [p for n, p in module.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad for p in base)
    student, fake = roles.student.parameters(), roles.fake.parameters()
    assert roles.teacher.parameters() == [] and student and fake
    assert not {id(p) for p in student} & {id(p) for p in fake}
    assert all(p.requires_grad for p in (*student, *fake))


def test_roles_follow_their_adapter_not_peft_global_state(roles):
    module = roles.backbone.module
    x, _, cond, _ = data()
    t = torch.full((B,), 500.0)
    plain = SD3ScoreModel(module)  # a call outside the roles uses peft's active adapters
    with torch.no_grad():
        module.set_adapter("student")
        want_student = plain(x, t, cond)
        module.disable_adapters()
        want_teacher = plain(x, t, cond)
        module.enable_adapters()
        module.set_adapter("fake")  # also freezes the student's parameters, as peft does
        torch.testing.assert_close(roles.student(x, t, cond), want_student)
        torch.testing.assert_close(roles.teacher(x, t, cond), want_teacher)
    assert all(p.requires_grad for p in roles.student.parameters())


def test_disabled_adapters_are_an_error(roles):
    roles.backbone.module.disable_adapters()
    x, _, cond, _ = data()
    with pytest.raises(RuntimeError, match="disabled"):
        roles.student(x, torch.full((B,), 500.0), cond)


def test_teacher_lora_file_and_unknown_role(roles, tmp_path):
    from scoredistill.adapters import lora_roles, save_lora

    path = save_lora(tmp_path / "teacher.safetensors", roles.backbone.module, "fake")
    fresh = tiny_sd3_transformer()
    with_teacher = lora_roles(SD3ScoreModel(fresh), student=small_config("student"),
                              fake=small_config("fake"), teacher_lora=path)
    assert with_teacher.teacher.adapter == "teacher"
    assert not any(p.requires_grad for p in with_teacher.teacher.parameters())
    x, _, cond, _ = data()
    t = torch.full((B,), 500.0)
    with torch.no_grad():
        torch.testing.assert_close(with_teacher.teacher(x, t, cond), roles.fake(x, t, cond))
    with pytest.raises(ValueError, match="no adapter"):
        roles.backbone.role("nope")


def test_role_parameters_are_the_whole_adapter(roles):
    # What each role's optimiser holds: every lora_A AND lora_B tensor of its adapter (lora_B
    # starts at zero, so an optimiser without it leaves the output unchanged forever).
    module = roles.backbone.module
    for role, adapter in ((roles.student, "student"), (roles.fake, "fake")):
        expected = lora_state_dict(module, adapter)
        assert any(".lora_B." in k for k in expected)
        assert {id(p) for p in role.parameters()} == {id(p) for p in expected.values()}
        assert len(role.parameters()) == len(expected)
    assert roles.teacher.parameters() == []
