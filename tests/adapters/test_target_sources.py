"""Each family's LoRA targets, resolved on a tiny model, equal the lists of the sources cited.

A list is resolved to the modules peft wraps with it (`wrapped`). Ours must equal the source's
resolved list plus the deliberate differences written below (`Source.extra`), each of which must
add modules of its own: a layer type dropped from, or added to, our lists changes the set.
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch
from families import FAMILIES
from tiny_models import matches, tiny_vae

from scoredistill.adapters import add_lora, lora_config, vae_lora_targets

# Microtreei/TSD-SR, train/train.py: `transformer_lora_config` (the student; the same list in
# test/test_tsdsr.py), `transformer_lora_config_reg` (the "LoRA model", our fake score) and
# `vae_target_modules` (the VAE encoder, written out for SD3's VAE).
TSDSR_STUDENT = ("to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                 "proj", "linear", "proj_out")
TSDSR_FAKE = ("to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")
TSDSR_VAE = (
    "encoder.conv_in", "encoder.down_blocks.0.resnets.0.conv1",
    "encoder.down_blocks.0.resnets.0.conv2", "encoder.down_blocks.0.resnets.1.conv1",
    "encoder.down_blocks.0.resnets.1.conv2", "encoder.down_blocks.0.downsamplers.0.conv",
    "encoder.down_blocks.1.resnets.0.conv1", "encoder.down_blocks.1.resnets.0.conv2",
    "encoder.down_blocks.1.resnets.0.conv_shortcut", "encoder.down_blocks.1.resnets.1.conv1",
    "encoder.down_blocks.1.resnets.1.conv2", "encoder.down_blocks.1.downsamplers.0.conv",
    "encoder.down_blocks.2.resnets.0.conv1", "encoder.down_blocks.2.resnets.0.conv2",
    "encoder.down_blocks.2.resnets.0.conv_shortcut", "encoder.down_blocks.2.resnets.1.conv1",
    "encoder.down_blocks.2.resnets.1.conv2", "encoder.down_blocks.2.downsamplers.0.conv",
    "encoder.down_blocks.3.resnets.0.conv1", "encoder.down_blocks.3.resnets.0.conv2",
    "encoder.down_blocks.3.resnets.1.conv1", "encoder.down_blocks.3.resnets.1.conv2",
    "encoder.mid_block.attentions.0.to_q", "encoder.mid_block.attentions.0.to_k",
    "encoder.mid_block.attentions.0.to_v", "encoder.mid_block.attentions.0.to_out.0",
    "encoder.mid_block.resnets.0.conv1", "encoder.mid_block.resnets.0.conv2",
    "encoder.mid_block.resnets.1.conv1", "encoder.mid_block.resnets.1.conv2", "encoder.conv_out",
    "quant_conv")

# huggingface/diffusers, examples/dreambooth/train_dreambooth_lora_flux.py: `target_modules`
# when --lora_layers is not given (the same list in advanced_diffusion_training/
# train_dreambooth_lora_flux_advanced.py).
DIFFUSERS_FLUX = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                  "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                  "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
# huggingface/diffusers, examples/dreambooth/train_dreambooth_lora_flux2.py: `target_modules`
# when --lora_layers is not given (FLUX.2-dev's 48 single-stream blocks; the klein script,
# train_dreambooth_lora_flux2_klein.py, the same with 24).
DIFFUSERS_FLUX2 = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
                   *[f"single_transformer_blocks.{i}.attn.to_out" for i in range(48)])
# huggingface/diffusers, examples/dreambooth/train_dreambooth_lora_sdxl.py: `unet_target_modules`.
DIFFUSERS_SDXL = ("to_k", "to_q", "to_v", "to_out.0")
# cswry/OSEDiff, osediff.py, `initialize_unet`: `l_grep`, substrings of parameter names (bias
# and norm parameters skipped); OSEDiff_gen's student and OSEDiff_reg's fake score both use it.
OSEDIFF_GREP = ("to_k", "to_q", "to_v", "to_out.0", "conv", "conv1", "conv2", "conv_in",
                "conv_shortcut", "conv_out", "proj_out", "proj_in", "ff.net.2", "ff.net.0.proj")
# cswry/OSEDiff, osediff.py, `initialize_vae`: the same rule on the VAE encoder, plus quant_conv.
OSEDIFF_VAE_GREP = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k",
                    "to_q", "to_v", "to_out.0")


def osediff_modules(module: torch.nn.Module, grep: Sequence[str],
                    keep: Callable[[str], bool] = lambda name: True) -> list[str]:
    """OSEDiff's rule: weights whose name contains a pattern, without bias or norm parameters."""
    return [name.removesuffix(".weight") for name, _ in module.named_parameters()
            if "bias" not in name and "norm" not in name and keep(name)
            and any(pattern in name for pattern in grep)]


def osediff_vae(vae: torch.nn.Module) -> list[str]:
    return osediff_modules(vae, OSEDIFF_VAE_GREP, lambda name: "encoder" in name) + [
        name.removesuffix(".weight") for name, _ in vae.named_parameters()
        if name == "quant_conv.weight"]


def wrapped(module: torch.nn.Module, targets: Sequence[str], exclude: str | None = None
            ) -> set[str]:
    """The modules peft wraps when ``targets`` go into a LoraConfig on (a copy of) ``module``."""
    from peft.tuners.lora import LoraLayer

    probe = copy.deepcopy(module)
    add_lora(probe, lora_config(targets, rank=1, exclude=exclude), "probe")
    return {name for name, layer in probe.named_modules() if isinstance(layer, LoraLayer)}


@dataclass(frozen=True)
class Source:
    """The source's list for one role (a tuple, or OSEDiff's rule applied to the model), and
    ``extra``: the targets we add on purpose, with the reason in the comment where it is made."""

    reference: Sequence[str] | Callable[[torch.nn.Module], Sequence[str]]
    extra: tuple[str, ...] = ()

    def names(self, module: torch.nn.Module) -> Sequence[str]:
        return self.reference(module) if callable(self.reference) else self.reference


UNET_STUDENT = Source(lambda unet: osediff_modules(unet, OSEDIFF_GREP))
# Differs: OSEDiff's fake score (OSEDiff_reg.unet_update) adapts its student's modules; ours
# adapts the attention projections, diffusers' SDXL list, as TSD-SR's fake score does on SD3.
UNET_FAKE = Source(DIFFUSERS_SDXL)
FLUX_SOURCES = {
    # Differs: beyond diffusers' list, what TSD-SR's SD3 student adds to attention (the patch
    # embedding, the AdaLN modulation linears, the output projection), and the single-stream
    # blocks' MLP (proj_mlp, proj_out), which the list leaves out while it adapts the
    # double-stream blocks' feed-forward.
    "student": Source(DIFFUSERS_FLUX, ("x_embedder", "linear", "proj_mlp", "proj_out")),
    # Differs: the attention part of the list only (no feed-forward), as TSD-SR's fake score.
    "fake": Source(DIFFUSERS_FLUX[:8]),
}
# Differs from diffusers' FLUX.2 list for both roles: the double-stream blocks' text-stream
# attention (add_*_proj, to_add_out), which the list leaves out, so both streams are adapted as
# on FLUX.1 and SD3.
FLUX2_TEXT_ATTENTION = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
FLUX2_SOURCES = {
    # The student also adapts, as on FLUX.1, the double-stream feed-forward and the modulation,
    # embedding and output linears.
    "student": Source(DIFFUSERS_FLUX2, (
        *FLUX2_TEXT_ATTENTION, "ff.linear_in", "ff.linear_out", "ff_context.linear_in",
        "ff_context.linear_out", "double_stream_modulation_img.linear",
        "double_stream_modulation_txt.linear", "single_stream_modulation.linear",
        "norm_out.linear", "x_embedder", "proj_out")),
    "fake": Source(DIFFUSERS_FLUX2, FLUX2_TEXT_ATTENTION),
}
SOURCES = {
    **{(family, role): source for family in ("sd3", "sd35") for role, source in
       (("student", Source(TSDSR_STUDENT)), ("fake", Source(TSDSR_FAKE)))},
    **{(family, role): source for family in ("flux-dev", "flux-schnell")
       for role, source in FLUX_SOURCES.items()},
    **{(family, role): source for family in ("flux2-dev", "flux2-klein")
       for role, source in FLUX2_SOURCES.items()},
    **{(family, role): source for family in ("sdxl", "sd2")
       for role, source in (("student", UNET_STUDENT), ("fake", UNET_FAKE))},
}


def test_every_family_has_a_source():
    assert {family for family, _ in SOURCES} == set(FAMILIES) - {"sdxl-v"}  # sdxl's layout


@pytest.mark.parametrize(("family_name", "role"), sorted(SOURCES),
                         ids=[f"{family}-{role}" for family, role in sorted(SOURCES)])
def test_resolved_targets_equal_the_sources(family_name, role):
    model = FAMILIES[family_name].build()
    source, targets = SOURCES[family_name, role], model.lora_targets
    reference = source.names(model.module)
    # The tiny model has every layer type of the source's list (block-indexed names: one block).
    types = defaultdict(list)
    for name in reference:
        types[re.sub(r"\.\d+\.", ".N.", name)].append(name)
    lacking = [kind for kind, names in types.items()
               if not any(matches(layer, name) for layer, _ in model.module.named_modules()
                          for name in names)]
    assert not lacking, f"the tiny {family_name} model has no {lacking}"
    ours = wrapped(model.module, getattr(targets, role), targets.exclude)
    theirs = wrapped(model.module, reference)
    for name in source.extra:  # each stated difference adds modules of its own
        added = wrapped(model.module, [name], targets.exclude)
        assert added - theirs, f"{name!r} is said to differ but adds nothing to the source's"
        theirs |= added
    assert ours == theirs, (f"{family_name} {role}: missing {sorted(theirs - ours)}, not in the "
                            f"source {sorted(ours - theirs)}")


def sd3_vae() -> torch.nn.Module:
    """SD3's VAE layout (4 blocks of 2 ResNets, no quant_conv) with tiny channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(2, 4, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, latent_channels=16, norm_num_groups=2, use_quant_conv=False,
        use_post_quant_conv=False)


def test_vae_encoder_targets_equal_tsdsr_and_osediff():
    vae = sd3_vae()
    names = {name for name, _ in vae.named_modules()}
    # TSD-SR's list names every layer of SD3's encoder, and quant_conv, which SD3's VAE lacks
    # (use_quant_conv=False): peft skips it there, and vae_lora_targets adds it where it exists.
    assert set(TSDSR_VAE) - names == {"quant_conv"}
    assert wrapped(vae, vae_lora_targets(vae)) == wrapped(vae, TSDSR_VAE) == set(TSDSR_VAE) - {
        "quant_conv"}
    for model in (vae, tiny_vae()):  # with and without quant_conv
        assert wrapped(model, vae_lora_targets(model)) == wrapped(model, osediff_vae(model))
    assert "quant_conv" in wrapped(tiny_vae(), vae_lora_targets(tiny_vae()))
