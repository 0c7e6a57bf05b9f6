"""The written contract every backbone satisfies: ``ScoreModel`` and ``NoiseSchedule``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Protocol, TypeAlias, runtime_checkable

from torch import Tensor

Prediction = Literal["epsilon", "v", "x0", "flow"]
"""What a network outputs: noise ``epsilon``, ``v = alpha*eps - sigma*x0``, clean ``x0``, or the
rectified-flow velocity ``flow = eps - x0`` (SD3)."""

PREDICTIONS: tuple[Prediction, ...] = ("epsilon", "v", "x0", "flow")

Cond: TypeAlias = "Tensor | Sequence[Cond] | Mapping[str, Cond] | None"
"""A conditioning pytree (a tensor, tuples/lists/dicts of them, or None); every tensor leaf has the
batch as its first dimension."""


@runtime_checkable
class NoiseSchedule(Protocol):
    """A stateless noise schedule ``x_t = alpha(t) x0 + sigma(t) eps`` with a discrete table.

    The table is in sampling order: index 0 is the noisiest level and the index grows toward clean
    data, as in SD3's ``FlowMatchEulerDiscreteScheduler.timesteps``. ``t`` is the timestep in the
    units the network was trained with (SD3: ``sigma * 1000``; DDPM: the integer step).

    Attributes:
        num_steps: The table's length N; indices run 0..N-1.
    """

    num_steps: int

    def timesteps(self, index: Tensor) -> Tensor:
        """Network timestep ``t`` (float32, shape of ``index``) at schedule indices."""
        ...

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, sigma)`` as float32 tensors of ``t``'s shape."""
        ...


@runtime_checkable
class ScoreModel(Protocol):
    """A denoiser ``model(x_t, t, cond) -> prediction`` with the meaning of its output attached.

    Shapes: ``x_t`` (B, ...), ``t`` (B,) in the schedule's units, ``cond`` a pytree of (B, ...)
    tensors or None; the output has ``x_t``'s shape.

    Attributes:
        prediction: What the output means: "epsilon", "v", "x0" or "flow".
        schedule: The noise schedule whose timesteps ``t`` the model takes.
    """

    prediction: Prediction
    schedule: NoiseSchedule

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor: ...


Call: TypeAlias = "tuple[ScoreModel, Tensor, Tensor, Cond]"
"""``(model, x_t, t, cond)``: one requested evaluation."""
