"""Opt-in speed-ups of the SR pipeline's networks: torch.compile with static shapes (CUDA graphs
where they pay), channels-last VAE convolutions and FP8 transformer linears (torchao)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

F = TypeVar("F", bound=Callable)

FP8_CAPABILITY = (8, 9)
"""Compute capability from which CUDA GPUs multiply FP8 (Ada, Hopper and later)."""
CUDA_GRAPH_MAX_BATCH = 2
"""CUDA graphs on by default up to this many tiles per transformer call: capture removes the
launch overhead that dominates small calls; at batch 8 the kernels hide it (see
benchmarks/results/inference.md: graph vs eager, 512 px)."""


def compiled(fn: F, *, cuda_graphs: bool = False) -> F:
    """``fn`` under torch.compile specialised to static shapes (one compile per input shape,
    done by the first call with it); ``cuda_graphs`` also captures it ("reduce-overhead")."""
    return torch.compile(fn, dynamic=False,
                         mode="reduce-overhead" if cuda_graphs else None)  # type: ignore[return-value]


def check_fp8(device: torch.device) -> None:
    """RuntimeError unless ``device`` is a CUDA GPU that multiplies FP8 (capability >= 8.9)."""
    if device.type != "cuda":
        raise RuntimeError(f"FP8 needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper); "
                           f"the model is on {device}. Drop --fp8.")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        raise RuntimeError(f"FP8 needs compute capability >= 8.9 (Ada, Hopper); "
                           f"{torch.cuda.get_device_name(device)} has {capability}. Drop --fp8.")


def quantize_fp8(transformer: nn.Module) -> None:
    """Replace the transformer blocks' linear layers by FP8 ones (dynamic per-row scales of
    activations and weights, torchao), in place. Call after merging LoRA and fusing QKV."""
    device = next(transformer.parameters()).device
    check_fp8(device)
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )
    except ImportError as exc:
        raise ImportError("FP8 needs torchao: pip install 'scoredistill[fp8]'") from exc
    def in_blocks(module: nn.Module, name: str) -> bool:
        # The attention and MLP projections of the joint blocks: the embeddings and the final
        # projection are small and sensitive, so they stay in the model's dtype.
        return isinstance(module, nn.Linear) and name.startswith("transformer_blocks.")

    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
              filter_fn=in_blocks)


def to_channels_last(vae: nn.Module) -> None:
    """The VAE's convolution weights in channels-last memory order (cuDNN's NHWC kernels)."""
    vae.to(memory_format=torch.channels_last)


FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v"),
         "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}
"""diffusers' fused attention projections and the separate ones each concatenates (rows)."""
_SIZES = "_scoredistill_fused_sizes"  # on each fused attention: {fused: its parts' out sizes}


def fuse_qkv(module: nn.Module) -> None:
    """diffusers' ``fuse_qkv_projections`` (one (3D x D) matmul instead of three; exact up to
    rounding), less the separate Q, K, V projections it keeps beside the fused copy (for
    ``unfuse_qkv_projections``, which the pipeline never calls): ~0.6 GiB of SD3-medium's fp16
    weights. :func:`unfused_state_dict` gives them back for saving."""
    module.fuse_qkv_projections()
    for attn in module.modules():
        for fused, parts in FUSED.items():
            if isinstance(getattr(attn, fused, None), nn.Linear) and all(
                    isinstance(getattr(attn, p, None), nn.Linear) for p in parts):
                sizes = getattr(attn, _SIZES, {})
                sizes[fused] = [getattr(attn, p).out_features for p in parts]
                setattr(attn, _SIZES, sizes)
                for name in parts:
                    delattr(attn, name)


def unfused_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` as diffusers saves and loads it: each fused projection split back
    into its separate ones (copies: safetensors refuses tensors sharing memory), and no fused
    weights (where the separate ones were kept, those are saved)."""
    state = module.state_dict()
    for name, attn in module.named_modules():
        prefix = f"{name}." if name else ""
        for fused, parts in FUSED.items():
            for kind in ("weight", "bias"):
                tensor = state.pop(f"{prefix}{fused}.{kind}", None)
                sizes = getattr(attn, _SIZES, {}).get(fused)
                if tensor is None or sizes is None:
                    continue  # not fused, or fused by diffusers alone: its parts are in state
                for part, chunk in zip(parts, tensor.split(sizes), strict=True):
                    state[f"{prefix}{part}.{kind}"] = chunk.clone()
    return state
