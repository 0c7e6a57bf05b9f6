"""The planner's MemTracker (scoredistill.memory.trace) against upstream's: the same plan, peaks by
category and by module, on a step with what the recipe's has (a frozen module called without
grad, a module shared by two phases, gradient checkpointing, backward, AdamW)."""

from __future__ import annotations

import sys
from unittest import mock

import pytest
import torch
from torch import nn
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.checkpoint import checkpoint

import scoredistill.memory.trace  # noqa: F401  (the package's ``trace`` is the function)

trace_module = sys.modules["scoredistill.memory.trace"]


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(width, 4 * width), nn.GELU(), \
            nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self.act(self.up(x)))


class Net(nn.Module):
    def __init__(self, width: int, depth: int, checkpointing: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, width)
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointing else block(x)
        return self.head(x)


def plan(checkpointing: bool) -> trace_module.Plan:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), trace_module.Placeholders():
        torch.manual_seed(0)
        net, frozen = Net(64, 3, checkpointing), Block(64).requires_grad_(False)
        optimiser = torch.optim.AdamW(net.parameters(), lr=1e-3)
        x = torch.randn(32, 64)

        def teacher_and_student():
            with torch.no_grad():
                target = frozen(x)
            loss = (net(x) - target).square().mean()

            def after():
                loss.backward()
                optimiser.step()
                optimiser.zero_grad()
            return after

        def second_call():  # the shared module again, in a second phase (the fake score)
            loss = net(frozen(x)).square().mean()
            return loss.backward

        return trace_module.trace([teacher_and_student, second_call], [net, frozen],
                                  [optimiser, x])


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_the_planners_tracker_plans_what_upstreams_does(checkpointing):
    ours = plan(checkpointing)
    with mock.patch.object(trace_module, "_tracker", MemTracker):
        upstream = plan(checkpointing)
    assert ours == upstream
    # Not a vacuous match: modules and their peaks were found, and activations counted.
    assert len(ours.top) == 10 and ours.peak["Activation"] > 0 and ours.peak["Optstate"] > 0


def test_a_dropped_module_peak_update_is_seen():
    # The plant: the per-op update of the active modules' peaks left out (only the global peak
    # kept). The per-module peaks then stay at each call's start, and the plans differ.
    tracker = trace_module._tracker

    def without_module_peaks():
        t = tracker()
        update = type(t)._update_peak_stats

        def global_only(self, state):
            active, self._by_name = self._by_name, {}
            update(self, state)
            self._by_name = active
        t._update_peak_stats = global_only.__get__(t)
        return t

    with mock.patch.object(trace_module, "_tracker", without_module_peaks):
        broken = plan(False)
    with mock.patch.object(trace_module, "_tracker", MemTracker):
        upstream = plan(False)
    assert broken.total == upstream.total and broken.top != upstream.top
