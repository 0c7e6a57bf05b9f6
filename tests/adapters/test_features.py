"""Features for discriminator heads on every adapter family: read from the batched call a loss
already makes (one backbone call, counted), split per role, and a head on each."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES, CallCounter

from scoredistill import (
    CFG,
    DiscriminatorHead,
    DMDLoss,
    FDistillLoss,
    GANHeadLoss,
    GANTerm,
    feature_layer,
    predict_features,
)

B = 2


def inputs(family, seed=5):
    g = torch.Generator().manual_seed(seed)
    x, x2 = torch.randn(2, B, *family.shape, generator=g).unbind(0)
    return x, x2, torch.tensor([300.0, 700.0]), family.cond(B, seed)


def alone(model, x, t, cond):
    """The default layer's output for ``model`` called by itself, turned into a map by hand:
    a UNet's mid-block as is; a transformer block's image tokens (the last h * w) on the grid."""
    layer = feature_layer(model)
    seen = []
    handle = layer.module.register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        model(x, t, cond)
    finally:
        handle.remove()
    (out,) = seen
    if isinstance(out, torch.Tensor) and out.ndim == 4:
        return out.float()
    tokens = out[1] if isinstance(out, tuple) else out
    base = model.backbone.base
    # FLUX.1 packs 2x2 latent patches into a token; SD3 patches by its config; FLUX.2: 1 token
    # per position of its (already patchified) latents.
    kind = type(base).__name__
    patch = 2 if kind == "FluxScoreModel" else (
        base.module.config.patch_size if kind == "SD3ScoreModel" else 1)
    h, w = x.shape[-2] // patch, x.shape[-1] // patch
    return tokens[:, -h * w:].reshape(B, h, w, -1).permute(0, 3, 1, 2).float()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_features_split_per_role_in_one_call(name):
    family = FAMILIES[name]
    roles = family.roles()
    x, x2, t, cond = inputs(family)
    counter = CallCounter(roles.backbone.module)
    _, feats = predict_features([(roles.teacher, x, t, cond), (roles.fake, x2, t, cond)],
                                ["teacher", "fake"], {0: None, 1: None})
    assert counter.calls == 1
    with torch.no_grad():
        for i, (role, xi) in enumerate(((roles.teacher, x), (roles.fake, x2))):
            torch.testing.assert_close(feats[i], alone(role, xi, t, cond), rtol=1e-4, atol=1e-5)
    layer = feature_layer(roles.fake)
    assert feats[1].shape[:2] == (B, layer.channels)
    head = DiscriminatorHead.for_model(roles.fake, hidden=8)
    assert head(feats[1]).shape == (B,)


def test_a_cfg_call_gives_its_conditional_branch(roles):
    family = FAMILIES["sd3"]
    x, _, t, cond = inputs(family)
    null = family.cond(1, 9)
    _, feats = predict_features([(CFG(roles.teacher, 4.0, null), x, t, cond),
                                 (roles.teacher, x, t, cond)], taps={0: None, 1: None})
    torch.testing.assert_close(feats[0], feats[1])
    assert feats[0].shape[0] == B


def test_unknown_layers_and_taps_are_refused(roles):
    family = FAMILIES["sd3"]
    x, _, t, cond = inputs(family)
    with pytest.raises(ValueError, match=r"SD3ScoreModel has no layer 'mid_block'"):
        predict_features([(roles.fake, x, t, cond)], taps={0: "mid_block"})
    with pytest.raises(ValueError, match=r"layer 'transformer_blocks.0.norm1' returned"):
        predict_features([(roles.fake, x, t, cond)], taps={0: "transformer_blocks.0.norm1"})
    with pytest.raises(ValueError, match=r"taps name calls \[3\] of 1 calls"):
        predict_features([(roles.fake, x, t, cond)], taps={3: None})


@pytest.mark.parametrize("name", ["sd3", "flux-dev", "sdxl"])
def test_a_dmd2_step_with_features_makes_the_same_backbone_calls(name):
    """DMD2's generator step: DMD's teacher (CFG) and fake calls and the re-noised GAN sample's
    features, one backbone call, as DMD alone; backward adds none. Gradient into the student's
    adapter only; the head and the fake's adapter get none from the generator's loss."""
    family = FAMILIES[name]
    roles = family.roles()
    x, _, _, cond = inputs(family)
    null = family.cond(1, 9)
    head = DiscriminatorHead.for_model(roles.fake, hidden=8)
    counter = CallCounter(roles.backbone.module)
    index, g = torch.tensor([300, 700]), torch.Generator().manual_seed(2)
    z_hat = x - roles.student(x, torch.full((B,), 999.0), cond)
    calls = counter.calls
    DMDLoss()(z_hat, cond, teacher=CFG(roles.teacher, 4.0, null), fake=roles.fake, index=index)
    plain = counter.calls - calls
    calls = counter.calls
    out = DMDLoss(gan=GANTerm(weight=1e-2))(
        z_hat, cond, teacher=CFG(roles.teacher, 4.0, null), fake=roles.fake, head=head,
        index=index, generator=g)
    assert counter.calls - calls == plain == 1
    out.loss.backward()
    assert counter.calls - calls == 1
    student = roles.backbone.adapter_parameters("student")
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student)
    assert all(p.grad is None for p in roles.backbone.adapter_parameters("fake"))
    assert all(p.grad is None for p in head.parameters())
    calls = counter.calls
    DMDLoss(gan=GANTerm(weight=1e-2, fused=False))(
        z_hat, cond, teacher=CFG(roles.teacher, 4.0, null), fake=roles.fake, head=head,
        index=index, generator=g)
    assert counter.calls - calls == 2  # DMD2's layout: the GAN sample in a call of its own


def test_fdistill_with_a_head_makes_one_backbone_call(roles):
    family = FAMILIES["sd3"]
    x, _, _, cond = inputs(family)
    null = family.cond(1, 9)
    head = DiscriminatorHead.for_model(roles.teacher, hidden=8)
    counter = CallCounter(roles.backbone.module)
    z_hat = x.requires_grad_(True)
    loss = FDistillLoss(divergence="js", gan=GANTerm(role="teacher", index_sampler=None))
    out = loss(z_hat, cond, teacher=CFG(roles.teacher, 4.0, null), fake=roles.fake, head=head)
    assert counter.calls == 1
    assert out.ratio_logit.shape == out.gan_logit.shape == (B,)


def test_head_loss_trains_the_head_and_the_fakes_adapter_in_one_call(roles):
    family = FAMILIES["sd3"]
    x, x2, _, cond = inputs(family)
    head = DiscriminatorHead.for_model(roles.fake, hidden=8)
    counter = CallCounter(roles.backbone.module)
    out = GANHeadLoss()(x, x2, cond, model=roles.fake, head=head)
    assert counter.calls == 1
    out.loss.backward()
    assert all(p.grad is not None for p in head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in roles.backbone.adapter_parameters("fake"))
