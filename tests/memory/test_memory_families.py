"""The planner's FLUX.1, FLUX.2, SDXL and SD 2.x backbones: the published configs, a family read
from a local config.json, and the train step through each family's adapter predicted within 5% of
a real CPU run's peak (issue 24)."""

from __future__ import annotations

import json

import pytest
import torch

from scoredistill.memory import SPECS, BackboneSpec, TrainOptions, measure_train, plan_train
from scoredistill.memory.backbones import build_meta, read_spec
from scoredistill.memory.cli import main
from tests.adapters import tiny_models

TOL = 0.05  # issue 24: predicted peak within 5% of the measured one (kernel scratch aside)

# Parameter counts of the published checkpoints (denoiser, VAE), as their safetensors hold them.
PUBLISHED = {"flux.1-dev": (11_901_408_320, 83_819_683), "sdxl": (2_567_463_684, 83_653_863),
             "sd2.1": (865_910_724, 83_653_863)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_built_in_configs_have_the_published_sizes(name):
    parts = build_meta(SPECS[name])
    counts = tuple(sum(p.numel() for p in m.parameters()) for m in (parts.transformer, parts.vae))
    assert counts == PUBLISHED[name]


def test_flux2_dev_is_the_32b_transformer_with_its_own_vae():
    pytest.importorskip("diffusers.models.transformers.transformer_flux2",
                        reason="FLUX.2 needs diffusers 0.36+")
    parts = build_meta(SPECS["flux.2-dev"])
    assert round(sum(p.numel() for p in parts.transformer.parameters()) / 1e9) == 32
    assert type(parts.vae).__name__ == "AutoencoderKLFlux2"
    assert parts.vae.config.latent_channels == 32


def _as_json(config: dict) -> dict:
    return json.loads(json.dumps(config))  # tuples become lists, as in a config.json


@pytest.mark.parametrize(("name", "denoiser"), [
    ("sd3-medium", "transformer"), ("flux.1-dev", "transformer"), ("flux.2-dev", "transformer"),
    ("sdxl", "unet"), ("sd2.1", "unet")])
def test_a_local_folder_reads_as_its_family(tmp_path, name, denoiser):
    from scoredistill.memory.backbones import FAMILIES

    spec = SPECS[name]
    classes = FAMILIES[spec.family]
    for part, config, cls in ((denoiser, spec.transformer, classes[0]), ("vae", spec.vae,
                                                                          classes[1])):
        (tmp_path / part).mkdir()
        (tmp_path / part / "config.json").write_text(json.dumps(
            {"_class_name": cls, "_diffusers_version": "0.42.1", **config}))
    for got in (read_spec(tmp_path), read_spec(tmp_path / denoiser / "config.json")):
        assert (got.family, got.tokens) == (spec.family, spec.tokens)
        assert _as_json(got.transformer) == _as_json(spec.transformer)
        assert _as_json(got.vae) == _as_json(spec.vae)  # the config alone: the family's VAE


def test_a_config_of_another_class_is_one_line(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    assert main(["train", "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "WanTransformer3DModel" in err and "UNet2DConditionModel" in err


def test_sr_on_a_unet_backbone_is_one_line(capsys):
    assert main(["sr", "--model", "sdxl"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--model sdxl" in err and "SD3" in err


def _kwargs(module: torch.nn.Module) -> dict:
    return {k: v for k, v in dict(module.config).items() if not k.startswith("_")}


def _tiny(family: str) -> BackboneSpec:
    """The adapters' tiny test models (tests/adapters/tiny_models.py) with a 2x VAE."""
    vae = dict(_kwargs(tiny_models.tiny_vae()), latent_channels=4)  # their 4 latent channels
    if family == "flux":
        return BackboneSpec(_kwargs(tiny_models.tiny_flux_transformer()), vae, 5, "flux")
    if family == "sdxl":
        return BackboneSpec(_kwargs(tiny_models.tiny_sdxl_unet()), dict(vae, shift_factor=None),
                            5, "sdxl")
    flux2_vae = dict(down_block_types=("DownEncoderBlock2D",) * 2, layers_per_block=1,
                     up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(4, 8),
                     latent_channels=4, norm_num_groups=1)
    return BackboneSpec(_kwargs(tiny_models.tiny_flux2_transformer()), flux2_vae, 5, "flux2")


@pytest.mark.parametrize("family", ["flux", "sdxl", "flux2"])
def test_train_step_peak_matches_a_real_run(family):
    pytest.importorskip("lpips", reason="the train step needs the train extra (LPIPS)")
    spec = _tiny(family)
    opts = TrainOptions(size=32, dtype=torch.float32, student_rank=4, fake_rank=4, vae_rank=4)
    plan, measured = plan_train(spec, opts), measure_train(spec, opts)
    assert abs(plan.total / measured.without_scratch - 1) <= TOL, (plan.total, measured)
    assert plan.peak["Optstate"] > 0 and plan.flops > 0
