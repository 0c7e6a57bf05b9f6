"""AdamW for the trained LoRA weights: PyTorch's, or bitsandbytes' 8-bit AdamW (Dettmers et al.
2022, "8-bit Optimizers via Block-wise Quantization"), whose two moments take 1 byte per weight
each (blockwise absmax scales beside them) instead of 4: a quarter of the optimiser state."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

OPTIMIZERS = ("adamw", "adamw8bit")
"""The names :func:`adamw` takes (the recipe's ``optimizer`` field, the planner's knob)."""


def adamw(kind: str, params: Iterable[torch.nn.Parameter], **kwargs: Any) -> torch.optim.Optimizer:
    """AdamW of the ``kind`` named in OPTIMIZERS over ``params``; kwargs as torch.optim.AdamW's
    (lr, betas, eps, weight_decay). ValueError naming the fix if bitsandbytes is missing."""
    if kind == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    require(kind)
    import bitsandbytes

    # Tensors under 4096 elements (biases, small LoRA factors) keep fp32 moments: bitsandbytes'
    # min_8bit_size default, where the blockwise scales would outweigh the saving.
    return bitsandbytes.optim.AdamW8bit(params, **kwargs)


def require(kind: str) -> None:
    """ValueError (one line naming the fix) unless :func:`adamw` can build ``kind`` here."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")
    if kind == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError("optimizer adamw8bit needs bitsandbytes: pip install "
                             "'scoredistill[adam8bit]' (or use optimizer adamw)") from None


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in ``optimizer``'s state, each once (bitsandbytes shares one
    quantisation map among all its weights)."""
    tensors = {id(v): v for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor)}
    return sum(v.numel() * v.element_size() for v in tensors.values())


def warm(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimiser's state (one step on zero gradients; the weights move by weight decay
    only): steps after the first hold it all along, so a memory plan of a step must too."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
