"""Any ``nn.Module`` or callable ``fn(x_t, t, cond)`` as a ScoreModel."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..conditioning import tree_map
from ..parametrization import check_prediction
from ..protocols import Cond, NoiseSchedule, Prediction


def weights_dtype(module: object, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of ``module``'s first floating-point parameter (``default`` for callables)."""
    if isinstance(module, nn.Module):
        for p in module.parameters():
            if p.is_floating_point():
                return p.dtype
    return default


def cast_cond(cond: Cond, dtype: torch.dtype) -> Cond:
    """Cast the floating-point leaves of a conditioning pytree to ``dtype`` (integer ids kept)."""
    return tree_map(lambda x: x.to(dtype) if x.is_floating_point() else x, cond)


@dataclass(frozen=True, eq=False)
class ModuleScoreModel:
    """A callable ``module(x_t, t, cond) -> prediction`` with its ``prediction`` and ``schedule``.

    ``x_t`` (B, ...) and the floating leaves of ``cond`` are cast to the weights' dtype, ``t`` (B,)
    stays float32 (bf16 would quantise it), and the output is returned as float32.

    Attributes:
        module: The network, called as ``module(x_t, t, cond)``.
        prediction: The parametrisation it outputs.
        schedule: The noise schedule its ``t`` belongs to.

    Example:
        >>> model = ModuleScoreModel(net, "epsilon", VariancePreserving())
    """

    module: Callable[[Tensor, Tensor, Cond], Tensor]
    prediction: Prediction
    schedule: NoiseSchedule

    def __post_init__(self) -> None:
        check_prediction(self.prediction)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Prediction (B, ...) float32 for ``x_t`` (B, ...) at ``t`` (B,)."""
        dtype = weights_dtype(self.module, x_t.dtype)
        return self.module(x_t.to(dtype), t.float(), cast_cond(cond, dtype)).float()
