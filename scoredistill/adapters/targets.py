"""Default LoRA target modules of the student and the fake score, per backbone family.

peft matches a target against a module's full name or its last dotted parts, so ``"linear"``
covers every AdaLN modulation linear (``norm1.linear``, ``norm1_context.linear``, ...).

Sources: SD3, TSD-SR's release (``train/train.py``); FLUX.1 and FLUX.2, diffusers' DreamBooth LoRA
scripts (``train_dreambooth_lora_flux.py``, ``train_dreambooth_lora_flux2.py``) with stated
additions; UNets, OSEDiff's student (``osediff.py``) and diffusers' SDXL script's attention for
the fake score. ``tests/adapters/test_target_sources.py`` compares the modules each list resolves
to with the source's, differences included (the guide's table says why).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoraTargets:
    """The student's and the fake score's LoRA target module names for one backbone family.

    Attributes:
        student: The student's target module names (or dotted suffixes).
        fake: The fake score's target module names (or dotted suffixes).
        exclude: A regex of full module names that a target name would also hit but peft cannot
            wrap (FLUX.2's double-stream ``attn.to_out`` is a ModuleList; its single-stream one
            is the Linear); pass it to `lora_config` with either list.
    """

    student: tuple[str, ...]
    fake: tuple[str, ...]
    exclude: str | None = None


ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj")
"""SD3's attention projections: TSD-SR's fake score (and the release's teacher LoRA)."""

STUDENT_TARGETS = (*ATTENTION_TARGETS, "proj", "linear", "proj_out")
"""TSD-SR's student on SD3: attention, patch embedding, AdaLN modulation, output projection."""

SD3_TARGETS = LoraTargets(STUDENT_TARGETS, ATTENTION_TARGETS)

FLUX_ATTENTION = (*ATTENTION_TARGETS, "to_add_out")
FLUX_TARGETS = LoraTargets(
    student=(*FLUX_ATTENTION,
             # feed-forward of the double-stream (image and text) and single-stream blocks
             "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
             "proj_mlp", "proj_out",
             # AdaLN modulation of both block types and the output norm; patch embedding
             "linear", "x_embedder"),
    fake=FLUX_ATTENTION)
"""FLUX.1: attention, feed-forward and AdaLN linears of both block types for the student;
attention projections (both streams) for the fake score."""

FLUX2_ATTENTION = (*FLUX_ATTENTION, "attn.to_qkv_mlp_proj", "attn.to_out")
FLUX2_TARGETS = LoraTargets(
    student=(*FLUX2_ATTENTION,
             # feed-forward (SwiGLU in, out) of the double-stream blocks' image and text streams;
             # the single-stream blocks' MLP is fused into to_qkv_mlp_proj and to_out
             "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
             # AdaLN modulation shared by all blocks of a type, and the output norm's
             "double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
             "single_stream_modulation.linear", "norm_out.linear",
             "x_embedder", "proj_out"),
    fake=FLUX2_ATTENTION,
    exclude=r"(.*\.)?transformer_blocks\.\d+\.attn\.to_out")
"""FLUX.2: attention, feed-forward and AdaLN modulation linears, patch embedding and output
projection for the student; attention projections of both streams (the single-stream ones fused
with the MLP) for the fake score. ``exclude`` keeps the double-stream ``attn.to_out`` ModuleList
out (its ``.0`` Linear is targeted as ``to_out.0``)."""

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_TARGETS = LoraTargets(
    student=(*UNET_ATTENTION, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
             "conv_shortcut", "conv", "conv_in", "conv_out"),
    fake=UNET_ATTENTION)
"""SD 1.x/2.x and SDXL UNets: OSEDiff's student modules (attention, transformer projections and
feed-forward, every ResNet/sampler conv); attention projections for the fake score (diffusers'
SDXL DreamBooth list; OSEDiff's fake score takes its student's)."""
