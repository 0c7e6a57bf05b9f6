"""The recipe's backbone loader: the pre-fitted tiny default and a local diffusers folder."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from examples.tsdsr.models.backbone import load_backbone
from examples.tsdsr.models.tiny import CONFIGS, random_backbone, random_cond
from scoredistill.sr.tiling import vae_factor


@pytest.mark.parametrize(("build", "factor"), [(random_backbone, 8),
                                               (lambda: load_backbone(None), 4)])
def test_tiny_backbones_are_deterministic_and_sd3_shaped(build, factor):
    """The instant random backbone (8x VAE) and the fitted default (4x VAE, see tiny_fit)."""
    a, b = build(), build()
    for x, y in ((a.transformer, b.transformer), (a.vae, b.vae)):
        assert all(torch.equal(p, q) for p, q in zip(x.parameters(), y.parameters(), strict=True))
    assert all(torch.equal(a.cond[k], b.cond[k]) for k in a.cond)
    assert vae_factor(a.vae) == factor and a.vae.config.latent_channels == 16
    assert (a.vae.config.shift_factor, a.vae.config.scaling_factor) == (0.0609, 1.5305)
    assert a.transformer.config.patch_size == 2
    assert a.cond["prompt_embeds"].shape == (1, CONFIGS["tiny"].tokens, 32)
    assert random_cond("sd3-medium")["pooled_projections"].shape == (1, 2048)



def test_load_backbone_reads_a_local_diffusers_folder(tmp_path, parts):
    parts.transformer.save_pretrained(tmp_path / "transformer")
    parts.vae.save_pretrained(tmp_path / "vae")
    loaded = load_backbone(str(tmp_path), torch.float32, "cpu")
    assert loaded.cond is None  # the default prompt comes from a file for real SD3
    for x, y in ((parts.transformer, loaded.transformer), (parts.vae, loaded.vae)):
        assert all(torch.equal(p, q) for p, q in zip(x.parameters(), y.parameters(), strict=True))
