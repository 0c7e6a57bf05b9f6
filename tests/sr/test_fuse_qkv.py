"""``fast.fuse_qkv``: diffusers' QKV fusion without the separate projections it keeps, on the
tiny SD3 backbone: fewer parameter bytes, the same outputs, and a state dict diffusers loads."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")

from examples.tsdsr.models.tiny import random_backbone
from scoredistill.sr import fast


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@pytest.fixture(scope="module")
def parts():
    return random_backbone()


@pytest.mark.parametrize("name", ["transformer", "vae"])
def test_fused_model_drops_the_separate_projections(parts, name):
    plain = getattr(parts, name)
    theirs, ours = copy.deepcopy(plain), copy.deepcopy(plain)
    theirs.fuse_qkv_projections()
    fast.fuse_qkv(ours)
    separate = sum(_bytes(m) for n, m in plain.named_modules()
                   if n.rsplit(".", 1)[-1] in {p for ps in fast.FUSED.values() for p in ps})
    assert separate > 0
    assert _bytes(theirs) == _bytes(plain) + separate  # diffusers keeps both copies
    assert _bytes(ours) == _bytes(plain)  # the fused copy only
    assert not any(hasattr(m, "to_q") and hasattr(m, "to_qkv") for m in ours.modules())
    # Saved as diffusers' own layout: the unfused model's keys and values.
    want, got = plain.state_dict(), fast.unfused_state_dict(ours)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_fused_outputs_match_the_unfused_model(parts):
    torch.manual_seed(0)
    transformer, vae = copy.deepcopy(parts.transformer), copy.deepcopy(parts.vae)
    fast.fuse_qkv(transformer)
    fast.fuse_qkv(vae)
    config = parts.transformer.config
    z = torch.randn(2, config.in_channels, 16, 16)
    cond = {k: v.expand(2, *v.shape[1:]) for k, v in parts.cond.items()}
    t = torch.full((2,), 999.0)
    def run(model):
        return model(z, encoder_hidden_states=cond["prompt_embeds"],
                     pooled_projections=cond["pooled_projections"], timestep=t).sample

    with torch.no_grad():
        torch.testing.assert_close(run(transformer), run(parts.transformer), atol=1e-5,
                                   rtol=1e-4)
        x = torch.rand(1, 3, 32, 32) * 2 - 1
        torch.testing.assert_close(vae(x).sample, parts.vae(x).sample, atol=1e-5, rtol=1e-4)
