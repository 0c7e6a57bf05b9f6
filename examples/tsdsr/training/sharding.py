"""FSDP2 sharding of the shared SD3 transformer for multi-process TSD-SR training (``--fsdp``).

The student, teacher and fake score are LoRA roles on ONE transformer, so the transformer (base
weights and every adapter) is sharded once, per transformer block, with
``torch.distributed.fsdp.fully_shard``; the VAE (with the student's encoder LoRA) and LPIPS stay
replicated and their gradients are averaged by hand (``step.apply_update``). Sharded parameters
are DTensors: optimizers must be built after :func:`shard_transformer`, and saving or loading the
optimizer state goes through :func:`full_optimizer_state` / :func:`shard_optimizer_state`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn


def _dtensor() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def shard_transformer(transformer: nn.Module) -> list[nn.Module]:
    """Shard each of ``transformer.transformer_blocks`` and then the rest; return the FSDP
    modules (blocks first). Needs an initialised process group."""
    from torch.distributed.fsdp import fully_shard

    blocks = list(getattr(transformer, "transformer_blocks", []))
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} has no transformer_blocks to shard")
    for block in blocks:
        # Resharding after the forward frees each block's gathered weights until its backward:
        # the memory FSDP is for, at the price of a second all-gather.
        fully_shard(block, reshard_after_forward=True)
    fully_shard(transformer)
    return [*blocks, transformer]


def is_sharded(p: Tensor) -> bool:
    """Whether ``p`` (a parameter or gradient) is an FSDP shard (DTensor)."""
    return isinstance(p, _dtensor())


def grad_norm(params: Iterable[nn.Parameter]) -> Tensor:
    """The L2 norm of all gradients, sharded (DTensor) or not, as a plain float32 scalar."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if is_sharded(g)]
    plain = [g for g in grads if not is_sharded(g)]
    squares = []
    if sharded:  # the DTensor norm is partial over the shards: full_tensor() all-reduces it
        squares.append(torch.nn.utils.get_total_norm(sharded).full_tensor().float().square())
    if plain:
        squares.append(torch.nn.utils.get_total_norm(plain).float().square())
    if not squares:
        return torch.zeros(())
    device = squares[0].device
    return torch.stack([s.to(device) for s in squares]).sum().sqrt()


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Scale all gradients so their joint L2 norm is at most ``max_norm`` (as
    ``torch.nn.utils.clip_grad_norm_``, for a mix of sharded and plain gradients); return the
    norm before clipping. No host sync."""
    params = [p for p in params if p.grad is not None]
    norm = grad_norm(params)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in params:
        grad = p.grad.to_local() if is_sharded(p.grad) else p.grad
        grad.mul_(coef.to(grad.device, grad.dtype))
    return norm


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered whole (a collective:
    every process must call it, in the same order)."""
    state = optimizer.state_dict()
    # New dicts: the per-parameter dicts of state_dict() are the optimizer's live ones.
    state["state"] = {index: {k: v.full_tensor() if is_sharded(v) else v for k, v in per.items()}
                      for index, per in state["state"].items()}
    return state


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of a :func:`full_optimizer_state`: cut the whole state tensors
    of sharded parameters back into their shards (each process keeps its own)."""
    from torch.distributed.tensor import distribute_tensor

    for param, per_param in optimizer.state.items():
        if not is_sharded(param):
            continue
        for key, value in per_param.items():
            if isinstance(value, Tensor) and not is_sharded(value) and value.shape == param.shape:
                per_param[key] = distribute_tensor(value.to(param.device_mesh.device_type),
                                                   param.device_mesh, param.placements)
