"""LoRA files: the TSD-SR release's layout (transformer + VAE encoder), save/load round trips."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from families import FAMILIES
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import LATENT, sd3_cond, small_config, tiny_sd3_transformer, tiny_vae

from scoredistill.adapters import (
    STUDENT_TARGETS,
    UNET_TARGETS,
    LoraMismatchError,
    SD3ScoreModel,
    add_lora,
    add_vae_lora,
    load_lora,
    load_tsdsr_release,
    lora_config,
    lora_roles,
    lora_state_dict,
    save_lora,
    vae_lora_targets,
)


def released_layout(module: torch.nn.Module, config, seed: int) -> dict[str, torch.Tensor]:
    """Random rank-64 weights under the keys ``save_lora_weights`` writes (no metadata)."""
    probe = copy.deepcopy(module)
    add_lora(probe, config, "default")
    g = torch.Generator().manual_seed(seed)
    return {f"transformer.{k}": torch.randn(p.shape, generator=g) * 0.02
            for k, p in lora_state_dict(probe, "default").items()}


def merged_transformer(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The reference: a plain base whose linear weights absorbed ``B @ A`` (alpha = rank)."""
    module = tiny_sd3_transformer()
    with torch.no_grad():
        for key, a in state.items():
            if key.endswith(".lora_A.weight"):
                path = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
                b = state[key.replace("lora_A", "lora_B")]
                layer = module.get_submodule(path)
                layer.weight += (b.flatten(1) @ a.flatten(1)).reshape(layer.weight.shape)
    return module


def sd3_inputs():
    x = torch.randn(2, *LATENT, generator=torch.Generator().manual_seed(0))
    return x, torch.full((2,), 1000.0), sd3_cond(2)


def test_released_transformer_file_gives_the_merged_model(tmp_path):
    base = tiny_sd3_transformer()
    state = released_layout(base, lora_config(STUDENT_TARGETS, rank=64), seed=0)
    assert any(".proj_out." in k for k in state) and any("norm1.linear" in k for k in state)
    save_file(state, str(tmp_path / "transformer.safetensors"))

    load_tsdsr_release(tmp_path, transformer=base)
    roles = lora_roles(SD3ScoreModel(base), student=None, fake=small_config("fake"))
    x, t, cond = sd3_inputs()
    with torch.no_grad():
        got = roles.student(x, t, cond)
        want = SD3ScoreModel(merged_transformer(state))(x, t, cond)
        plain = roles.teacher(x, t, cond)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().max() > 1e-2  # the LoRA does change the prediction


def test_release_file_as_the_students_starting_point(tmp_path):
    base = tiny_sd3_transformer()
    state = released_layout(base, lora_config(STUDENT_TARGETS, rank=64), seed=1)
    save_file(state, str(tmp_path / "transformer.safetensors"))
    roles = lora_roles(SD3ScoreModel(base), fake=small_config("fake"),
                       student_lora=tmp_path / "transformer.safetensors")
    loaded = lora_state_dict(base, "student")
    assert all(torch.equal(p, state[f"transformer.{k}"]) for k, p in loaded.items())
    assert all(p.requires_grad for p in roles.student.parameters())


def test_save_then_load_is_identical_and_atomic(tmp_path):
    source = tiny_sd3_transformer()
    add_lora(source, small_config("student"), "student")
    with torch.no_grad():
        for p in lora_state_dict(source, "student").values():
            p.normal_(std=0.05)
    path = save_lora(tmp_path / "student.safetensors", source, "student")
    save_lora(path, source, "student")  # overwriting in place is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.safetensors"]
    with safe_open(str(path), framework="pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())  # noqa: SIM118
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["transformer.r"] == 4

    target = tiny_sd3_transformer()
    load_lora(path, target, "student")  # created from the file's metadata
    want = lora_state_dict(source, "student")
    assert all(torch.equal(p, want[k]) for k, p in lora_state_dict(target, "student").items())
    x, t, cond = sd3_inputs()
    with torch.no_grad():
        assert torch.equal(SD3ScoreModel(target)(x, t, cond), SD3ScoreModel(source)(x, t, cond))


def test_released_vae_file_covers_the_encoder_and_quant_conv(tmp_path):
    vae = tiny_vae()
    targets = vae_lora_targets(vae)
    assert "quant_conv" in targets and "encoder.conv_in" in targets
    assert "encoder.mid_block.attentions.0.to_q" in targets
    assert not any(t.startswith("decoder") or t == "post_quant_conv" for t in targets)
    state = released_layout(vae, lora_config(targets, rank=64), seed=2)
    save_file(state, str(tmp_path / "vae.safetensors"))

    reference = copy.deepcopy(vae)
    add_vae_lora(vae)
    load_tsdsr_release(tmp_path, vae=vae)
    loaded = lora_state_dict(vae, "default")
    assert loaded.keys() == {k.removeprefix("transformer.") for k in state}
    assert all(torch.equal(p, state[f"transformer.{k}"]) for k, p in loaded.items())
    assert all(p.requires_grad for p in loaded.values())
    image = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(image).latent_dist.mean
        ref_mean = reference.encode(image).latent_dist.mean
        assert (mean - ref_mean).abs().max() > 1e-3
        torch.testing.assert_close(vae.decode(mean).sample, reference.decode(mean).sample)


def test_mismatched_files_are_rejected(tmp_path):
    base = tiny_sd3_transformer()
    add_lora(base, small_config("fake"), "fake")
    state = {k.removeprefix("transformer."): v
             for k, v in released_layout(base, small_config("fake"), 0).items()}
    save_file(state, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="prefix"):
        load_lora(tmp_path / "bare.safetensors", base, "fake")
    student_file = save_lora(tmp_path / "s.safetensors", base, "fake")
    add_lora(base, small_config("student"), "student")
    with pytest.raises(ValueError, match="does not fit"):
        load_lora(student_file, base, "student")


def write_lora(folder, name: str, module: torch.nn.Module, targets) -> str:
    path = folder / name
    save_file(released_layout(module, lora_config(targets, rank=4), seed=0), str(path))
    return path


@pytest.mark.parametrize("student_exists", [False, True])
def test_a_vae_lora_given_as_the_transformers_names_the_file_and_what_it_is(tmp_path,
                                                                            student_exists):
    vae = tiny_vae()
    path = write_lora(tmp_path, "transformer.safetensors", vae, vae_lora_targets(vae))
    transformer = tiny_sd3_transformer()
    if student_exists:  # lora_roles(student_lora=...) loads into the adapter it has just added
        add_lora(transformer, small_config("student"), "student")
    with pytest.raises(LoraMismatchError) as err:
        load_lora(path, transformer, "student")
    message = str(err.value)
    assert message.startswith(f"LoRA file {path} seems to be a VAE LoRA, given as the "
                              "transformer's (SD3Transformer2DModel): none of its ")
    assert err.value.path == path and isinstance(err.value, ValueError)
    assert len(message) < 200 + len(str(path))  # not peft's list of every module


def test_a_transformer_or_unet_lora_given_as_the_vaes_is_named(tmp_path):
    path = write_lora(tmp_path, "vae.safetensors", tiny_sd3_transformer(), STUDENT_TARGETS)
    with pytest.raises(LoraMismatchError, match=r"seems to be a transformer LoRA, given as the "
                                                r"VAE's \(AutoencoderKL\): none of its 13"):
        load_tsdsr_release(tmp_path, vae=tiny_vae())
    unet = FAMILIES["sd2"].module()
    path = write_lora(tmp_path, "unet.safetensors", unet, UNET_TARGETS.student)
    with pytest.raises(LoraMismatchError, match="seems to be a UNet LoRA, given as the VAE's"):
        load_lora(path, tiny_vae(), "default")


def test_a_lora_for_a_deeper_transformer_names_the_modules_it_lacks(tmp_path):
    path = write_lora(tmp_path, "sd35.safetensors", FAMILIES["sd35"].module(), STUDENT_TARGETS)
    with pytest.raises(LoraMismatchError, match=r"a transformer LoRA for another transformer "
                                                r"layout, .*: 15 of its 28 modules are not in "
                                                r"it, e\.g\. 'transformer_blocks\.0\.attn2"):
        load_lora(path, tiny_sd3_transformer(), "student")


def test_diffusers_reads_our_files(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    source = tiny_sd3_transformer()
    add_lora(source, small_config("student"), "student")
    with torch.no_grad():
        for p in lora_state_dict(source, "student").values():
            p.normal_(std=0.05)
    save_lora(tmp_path / "pytorch_lora_weights.safetensors", source, "student")
    state, metadata = StableDiffusion3Pipeline.lora_state_dict(tmp_path, return_lora_metadata=True)
    target = tiny_sd3_transformer()
    target.load_lora_adapter(state, prefix="transformer", metadata=metadata)
    x, t, cond = sd3_inputs()
    with torch.no_grad():
        torch.testing.assert_close(SD3ScoreModel(target)(x, t, cond),
                                   SD3ScoreModel(source)(x, t, cond))


@pytest.mark.parametrize("family_name", sorted(FAMILIES))
@pytest.mark.parametrize("adapter", ["student", "fake"])
def test_each_family_round_trips_its_default_adapters(tmp_path, family_name, adapter):
    # The file's config must rebuild the adapter on a fresh backbone: FLUX.2's needs its exclude.
    family = FAMILIES[family_name]
    roles = family.roles()
    path = save_lora(tmp_path / "lora.safetensors", roles.backbone.module, adapter)
    fresh = family.build().module
    load_lora(path, fresh, adapter)
    want, got = lora_state_dict(roles.backbone.module, adapter), lora_state_dict(fresh, adapter)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
