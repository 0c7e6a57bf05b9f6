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
