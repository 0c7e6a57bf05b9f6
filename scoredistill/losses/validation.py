"""Input checks shared by the losses: clear ``ValueError``s instead of silent broadcasting."""

from __future__ import annotations

import torch
from torch import Tensor

from ..conditioning import check_cond
from ..protocols import Cond


def _same_as(name: str, x: Tensor, ref: Tensor, ref_name: str, check_dtype: bool = True) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but {ref_name} has "
                         f"{tuple(ref.shape)}")
    if check_dtype and x.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def _per_sample_int(name: str, x: Tensor, batch: int, device: torch.device) -> None:
    if x.shape != (batch,) or x.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an integer tensor of shape ({batch},), got "
                         f"{x.dtype} {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the latents are on {device}")


def check_inputs(z_hat: Tensor, z: Tensor | None, noise: Tensor, cond: Cond, index: Tensor,
                 bias: Tensor | None, check_finite: bool) -> None:
    """Validate a distillation step's tensors against ``z_hat`` (B, ...)."""
    if not z_hat.is_floating_point() or z_hat.ndim < 2:
        raise ValueError(f"z_hat must be a floating (B, ...) tensor, got {z_hat.dtype} "
                         f"{tuple(z_hat.shape)}")
    if z is not None:
        _same_as("z", z, z_hat, "z_hat")
    _same_as("noise", noise, z_hat, "z_hat", check_dtype=False)
    b = z_hat.shape[0]
    check_cond(cond, b, z_hat.device)
    _per_sample_int("index", index, b, z_hat.device)
    if bias is not None:
        _per_sample_int("dasm_bias", bias, b, z_hat.device)
    if check_finite:
        named = {"z_hat": z_hat, "noise": noise, **({"z": z} if z is not None else {})}
        finite = torch.stack([torch.isfinite(v).all() for v in named.values()]).tolist()
        bad = [n for n, ok in zip(named, finite, strict=True) if not ok]
        if bad:
            raise ValueError(f"non-finite values in {', '.join(bad)}")
