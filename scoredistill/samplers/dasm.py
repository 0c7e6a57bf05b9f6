"""The Distribution-Aware Sampling Module: where on the trajectory TSD-SR evaluates its loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..messages import brief
from .timesteps import check_number


@dataclass(frozen=True)
class DASMSampler:
    """DASM point indices, per sample (TSD-SR Sec. 3.4, Alg. 1 lines 15-23).

    From a start index ``i`` (per sample), the ``N + 1`` indices are
    ``floor(linspace(i, min(i + N*s + b, last), N + 1))`` with a random bias ``b ~ U[bias)``;
    the loss is evaluated at the first ``N`` of them with ``weights`` and the trajectory moves
    from point ``k`` to point ``k + 1`` toward lower noise (Eq. 6). Even clamped, ``N`` points
    need ``N`` distinct indices: a start within about ``N`` of the last index raises, so keep the
    index sampler's upper end well below it (the paper draws 50..949; mind the tails of
    ``LogitNormalIndex``). Every field is checked at construction.

    Attributes:
        num_points: ``N``, the number of evaluated points, an integer >= 1 (paper: 4).
        step: ``s``, the index spacing of the points, an integer >= 1 (paper: 50).
        weights: The ``N`` per-point loss weights, finite and >= 0 (paper:
            ``(1, 0.3, 0.3, 0.3)``).
        bias: The integer range ``[low, high)`` of the random bias ``b`` (paper: ``[-25, 25)``).
        clamp: With False a trajectory that would run past the last index is an error instead of
            being squeezed into the remaining range.
    """

    num_points: int = 4
    step: int = 50
    weights: tuple[float, ...] = (1.0, 0.3, 0.3, 0.3)
    bias: tuple[int, int] = (-25, 25)
    clamp: bool = True

    def __post_init__(self) -> None:
        check_number(self.num_points, "DASM num_points", integer=True)
        check_number(self.step, "DASM step", integer=True)
        if self.num_points < 1 or self.step < 1:
            raise ValueError(f"DASM needs num_points >= 1 and step >= 1, got "
                             f"{self.num_points} and {self.step}")
        if len(self.weights) != self.num_points:
            raise ValueError(f"DASM has {self.num_points} points but {len(self.weights)} weights: "
                             f"{brief(self.weights)}")
        for k, w in enumerate(self.weights):
            check_number(w, f"DASM weight {k}")
            if w < 0:
                raise ValueError(f"DASM weight {k} is {w!r}: point weights must be >= 0 (a "
                                 "negative one ascends the loss at that point)")
        if len(self.bias) != 2:
            raise ValueError(f"DASM bias must be a range (low, high), got {brief(self.bias)}")
        for end, b in zip(("low", "high"), self.bias, strict=True):
            check_number(b, f"DASM bias {end}", integer=True)
        if self.bias[0] >= self.bias[1]:
            raise ValueError(f"DASM bias range {brief(self.bias)} is empty (half-open "
                             "[low, high))")
        if not isinstance(self.clamp, bool):
            raise ValueError(f"DASM clamp must be True or False, got {brief(self.clamp)}")

    def point_weights(self, device: torch.device | str | None = None) -> Tensor:
        """Per-point weights (N,) float32."""
        return torch.tensor(self.weights, dtype=torch.float32, device=device)

    def draw_bias(self, batch: int, *, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> Tensor:
        """Random per-sample bias (B,) int64 in the half-open ``bias`` range.

        Args:
            batch: The batch size B.
            generator: The random generator.
            device: Where the result lives.
        """
        where = generator.device if generator is not None else device
        return torch.randint(*self.bias, (batch,), generator=generator, device=where).to(device)

    def indices(self, start: Tensor, num_steps: int, bias: Tensor) -> Tensor:
        """The ``N`` evaluated trajectory indices (B, N) int64 from start indices and biases (B,).

        The ``(N + 1)``-th linspace point only sets the spacing: no step is taken after the last
        evaluated point.

        Args:
            start: Start indices (B,) int64.
            num_steps: The schedule's number of steps.
            bias: Per-sample biases (B,) int64 (`draw_bias`).

        Raises:
            ValueError: Naming the sample when a trajectory leaves the schedule or does not
                strictly move toward lower noise.
        """
        if start.ndim != 1 or bias.shape != start.shape:
            raise ValueError(f"start {tuple(start.shape)} and bias {tuple(bias.shape)} must both "
                             "be (B,)")
        last = num_steps - 1
        end = start + self.num_points * self.step + bias
        if not self.clamp and bool((end > last).any()):
            b = int((end > last).nonzero()[0])
            raise ValueError(f"DASM runs past the end of the schedule for sample {b}: index "
                             f"{int(start[b])} + {self.num_points}*{self.step} + bias "
                             f"{int(bias[b])} = {int(end[b])} > {last}")
        end = end.clamp(max=last)
        k = torch.arange(self.num_points, device=start.device)
        # Exact integer floor of linspace, so no float rounding can shift a point.
        points = start[:, None] + ((end - start)[:, None] * k) // self.num_points
        bad = (points.diff(dim=1) <= 0).any(dim=1) | (start < 0) | (start > last)
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise ValueError(f"DASM trajectory for sample {b} from index {int(start[b])} is "
                             f"{brief(points[b].tolist())}: it must stay in [0, {last}] and "
                             "strictly increase toward lower noise")
        return points
