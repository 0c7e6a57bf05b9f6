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


def check_inputs(x: Tensor, z: Tensor | None, noise: Tensor, cond: Cond, index: Tensor,
                 bias: Tensor | None, x_name: str = "z_hat") -> None:
    """Validate a loss's tensors against its samples ``x`` (B, ...), called ``x_name`` in the
    messages (the argument's name in the caller's signature). No host sync."""
    if not x.is_floating_point() or x.ndim < 2:
        raise ValueError(f"{x_name} must be a floating (B, ...) tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{x_name} is an empty batch (shape {tuple(x.shape)}): a loss needs at "
                         "least one sample")
    if z is not None:
        _same_as("z", z, x, x_name)
    _same_as("noise", noise, x, x_name, check_dtype=False)
    b = x.shape[0]
    check_cond(cond, b, x.device)
    _per_sample_int("index", index, b, x.device)
    if bias is not None:
        _per_sample_int("dasm_bias", bias, b, x.device)


def check_all_finite(inputs: dict[str, Tensor | None], outputs: dict[str, Tensor],
                 models: str) -> None:
    """One host sync for all of a loss call's checks: a ValueError naming the non-finite
    ``inputs``, else a FloatingPointError naming the non-finite ``outputs`` (what ``models``
    returned for finite inputs)."""
    named = {k: v for k, v in {**inputs, **outputs}.items() if v is not None}
    finite = torch.stack([torch.isfinite(v).all() for v in named.values()]).tolist()
    bad = [n for n, ok in zip(named, finite, strict=True) if not ok]
    bad_inputs = [n for n in bad if n in inputs]
    if bad_inputs:
        raise ValueError(f"non-finite values in {', '.join(bad_inputs)}")
    if bad:
        raise FloatingPointError(
            f"non-finite values in {', '.join(bad)} although the inputs are finite: the "
            f"{models} returned NaN or inf (check its weights and dtype: fp16 overflows above "
            "65504); pass check_finite=False to skip such steps yourself")
