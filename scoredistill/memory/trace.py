"""Trace one step on fake tensors: PyTorch's MemTracker (peak by category and module) and
FlopCounterMode (FLOPs). Nothing is allocated, so any backbone size traces on any machine."""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

GIB = 2**30
REVISION = 2
"""Raised whenever a plan of the same inputs changes, so that plans cached under the old one
(the SR CLI's memory check) are traced again. 2: the tiled VAE's waiting tiles are host
memory, no longer the device's."""
Phase = Callable[[], "Callable[[], None] | None"]
"""A step's forward part; it returns what to run after it (backward, optimiser step), or None."""


@dataclass(frozen=True)
class Plan:
    """A traced step: bytes at the peak by MemTracker category ("Parameter", "Gradient",
    "Optstate", "Activation", "Temp", "Buffer", "Other") with "Total"; the ``top`` modules as
    (name, peak bytes while it ran, bytes it added over its start); FLOPs; the bytes every
    step must at least read (parameters and buffers once); ``host``: the peak bytes held on
    the stand-in for host memory ("meta": the tiled VAE's waiting tiles, activations offloaded
    for the backward; 0 for a step that holds everything on one device); ``offloaded``: the
    bytes an activation offload copies to the host and back (each way) per step."""

    peak: dict[str, int]
    top: list[tuple[str, int, int]]
    flops: int
    min_bytes: int
    host: int = 0
    offloaded: int = 0

    @property
    def total(self) -> int:
        """Peak bytes allocated."""
        return self.peak["Total"]


class _Step(nn.Module):
    # MemTracker refuses a root module called twice ("multiple iterative calls"): each phase's
    # forward runs as the call of its own parent module. Its input is a scalar that requires
    # grad but feeds no graph, so that ModTracker ends the parent when its forward returns.
    # ModTracker resets its module stack when a backward ends, so backward runs outside.
    def __init__(self, step: Phase, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        self.step = step
        for module in modules:
            self.add_module(type(module).__name__, module)

    def forward(self, anchor: torch.Tensor) -> Callable[[], None] | None:
        return self.step()


class Placeholders(TorchDispatchMode):
    """Python reads of a fake tensor's value (``bool(t)``, ``t.item()``) give ``False`` for
    booleans and 1 otherwise, instead of failing: in the traced steps these are validity checks
    (False: nothing bad) and AdamW's step counter, values that change no tensor's size;
    ``torch.equal`` gives True (the losses' check that the roles share one VP schedule)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            return False if args[0].dtype == torch.bool else 1
        if func is torch.ops.aten.equal.default:
            return True
        return func(*args, **(kwargs or {}))


class _NoHook:
    def remove(self) -> None:
        pass


def _frozen_params_without_hooks(tracker: Any, modules: Sequence[nn.Module]) -> None:
    # MemTracker hooks every parameter's gradient, and registering a hook on a frozen one
    # raises: mark the frozen (base) weights as hooked already; they never get a gradient.
    for module in modules:
        for p in module.parameters():
            if not p.requires_grad:
                tracker._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())


def _tracker() -> Any:
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class Tracker(MemTracker):
        """MemTracker with one change: its per-op update of the active modules' peaks does
        only the work that can change one; the same result, checked against upstream's.

        Upstream walks every module seen so far on every op and keeps those whose name is
        active: O(ops x modules), 80 s for the tiny preset's step and, with an index rebuilt
        as modules appear, still 45% of an SDXL step's trace. Here the modules are indexed by
        name as they are first seen, the active ones are listed again only when a module hook
        has fired (the only place where the active set, a module's peak start or its snapshot
        lists change), and a device is skipped while its total stays at or under the lowest
        peak among the active modules (none of them can rise)."""

        def __init__(self) -> None:
            super().__init__()
            self._by_name: dict[str, list[Any]] = {}
            self._named: dict[int, str] = {}  # id(stats) -> the name it is indexed under
            self._active: list[Any] = []
            self._parents: Any = None  # the ModTracker's parents set _active was listed from
            self._state: Any = None
            self._floor: dict[Any, int | None] = {}

        def _hooked(self) -> None:
            self._parents = None  # list the active modules again at the next op

        def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
            super()._pre_fw_hook(module, inputs)
            stats = self.memory_tracking[module]
            name = self._named.get(id(stats))
            if name != stats.mod_fqn:  # first seen, or renamed under a new parent
                if name is not None:
                    self._by_name[name].remove(stats)
                self._by_name.setdefault(stats.mod_fqn, []).append(stats)
                self._named[id(stats)] = stats.mod_fqn
            self._hooked()

        def _post_fw_hook(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
            super()._post_fw_hook(module, inputs, outputs)
            self._hooked()

        def _pre_bw_hook(self, module: nn.Module, args: Any) -> None:
            super()._pre_bw_hook(module, args)
            self._hooked()

        def _post_bw_hook(self, module: nn.Module, args: Any) -> None:
            super()._post_bw_hook(module, args)
            self._hooked()

        def _update_peak_stats(self, peak_state: Any) -> None:
            parents = self._mod_tracker.parents
            # ModTracker changes its parents next to a user hook, or replaces the set when a
            # backward ends; both are seen here.
            if parents is not self._parents or peak_state is not self._state:
                self._active = [stats for name in parents
                                for stats in self._by_name.get(name, ())
                                if peak_state in stats.snapshots]
                self._parents, self._state, self._floor = parents, peak_state, {}
            curr_snap = self._curr_mem_snap
            for dev, dev_snap in curr_snap.items():
                total = dev_snap[_TOTAL_KEY]
                floor = self._floor.get(dev, -1)
                if floor is None or total <= floor:
                    continue
                low = None
                for stats in self._active:
                    peak = stats.local_peak.get(dev, 0)
                    if peak < total:
                        stats.local_peak[dev] = peak = total
                        stats.snapshots[peak_state][-1][dev] = dict(dev_snap)
                    low = peak if low is None or peak < low else low
                self._floor[dev] = low
            for dev, dev_snap in curr_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap[_TOTAL_KEY]:
                    self._peak_mem[dev] = dev_snap[_TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(dev_snap)

    return Tracker()


def trace(phases: Sequence[Phase], modules: Sequence[nn.Module],
          external: Sequence[Any] = (), top: int = 10, device: str = "cpu") -> Plan:
    """Run a step's ``phases`` in order under MemTracker and FlopCounterMode; ``modules`` (and
    ``external``: optimisers, input tensors) exist before it and are counted from the start.
    The peak is ``device``'s; tensors the step holds on another device (the stand-in for host
    memory) are :attr:`Plan.host`."""
    from torch.distributed._tools.mem_tracker import _ModState

    tracker = _tracker()
    tracker.track_external(*modules, *external)
    _frozen_params_without_hooks(tracker, modules)
    roots = [_Step(phase, modules) for phase in phases]
    # Tensors a reference cycle holds are freed when the cyclic collector runs, which depends on
    # every Python object the process made before: the collector is held off for the step, so
    # a plan is the same in any order (and an upper bound if the step makes such cycles).
    collecting = gc.isenabled()
    gc.disable()
    try:
        with tracker, _total_flops() as flops:
            for root in roots:
                after = root(torch.zeros((), requires_grad=True))
                if after is not None:
                    after()
    finally:
        if collecting:
            gc.enable()
    compute = _device(device)
    peaks = {_device(dev): snap for dev, snap in tracker.get_tracker_snapshot("peak").items()}
    peak = peaks.pop(compute, {"Total": 0})
    host = max((snap["Total"] for snap in peaks.values()), default=0)
    rows = []
    for module, stats in tracker.memory_tracking.items():
        name = stats.mod_fqn.partition(".")[2]  # without the phase's parent module
        calls = [(_at(start, compute), _at(high, compute))
                 for pre, peak in ((_ModState.PRE_FW, _ModState.PEAK_FW),
                                   (_ModState.PRE_BW, _ModState.PEAK_BW))
                 for start, high in zip(stats.snapshots.get(pre, []),
                                        stats.snapshots.get(peak, []), strict=False)]
        if isinstance(module, nn.Module) and name and calls:
            rows.append((name, max(high for _, high in calls),
                         max(high - start for start, high in calls)))
    # What one call of a module (forward or backward) adds over that call's own start
    # (activations, temporaries) ranks it: measured from the first call's start instead, a
    # module called early and again in the backward at the step's peak (the VAE encoder's
    # conv_in) took the whole step's growth. Deeper modules first on ties, as they name the
    # place more precisely.
    rows.sort(key=lambda r: (-r[2], -r[0].count(".")))
    weights = {id(t): t for m in modules for t in (*m.parameters(), *m.buffers())}
    min_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    return Plan({getattr(k, "value", k): int(v) for k, v in peak.items()}, rows[:top],
                int(flops.get_total_flops()), min_bytes, int(host))


class _Global:
    """A module tracker that is always in the "Global" scope only (see :func:`_total_flops`)."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _Global:
        return self

    def __exit__(self, *args: Any) -> None:
        pass


def _total_flops() -> Any:
    """``FlopCounterMode`` counting the step's total only, without its per-module tracker.

    That tracker registers a multi-grad hook on every module call's outputs, whose closure
    holds the outputs' autograd nodes: a reference cycle through each node. A checkpointed
    block's recomputation builds a graph that no backward runs through, and its nodes hold the
    recomputed activations; the cycle kept them past their use, until the collector ran. The
    traced step (and a real one under the tracker) held 24.5 MiB at its peak on the tiny preset
    against 20.75 MiB without it, which was the planner's "checkpointing is over-predicted".
    """
    from torch.utils.flop_counter import FlopCounterMode

    flops = FlopCounterMode(display=False)
    flops.mod_tracker = _Global()  # read as .parents, entered and exited: all it is used for
    return flops


def _device(device: str | torch.device) -> torch.device:
    # Fake CUDA tensors made on "cuda" are on "cuda:0".
    device = torch.device(device)
    return torch.device(device.type, 0) if device.type == "cuda" and device.index is None \
        else device


def _at(snapshot: dict[Any, dict[str, int]], device: torch.device) -> int:
    """The total bytes of ``device`` in a MemTracker snapshot (keyed by torch.device)."""
    return next((v["Total"] for k, v in snapshot.items() if _device(k) == device), 0)


def run_phases(phases: Sequence[Phase]) -> None:
    """Run a step's phases as :func:`trace` does, untraced."""
    for phase in phases:
        after = phase()
        if after is not None:
            after()


@dataclass(frozen=True)
class Allocated:
    """A real run's peak bytes, with and without kernel scratch (memory an operator allocates
    and frees before it returns: oneDNN's reordered inputs, im2col buffers; the trace sees
    tensors between operators only, so ``without_scratch`` is what it predicts)."""

    peak: int
    without_scratch: int


def allocated_peak(setup: Callable[[], Callable[[], None]]) -> Allocated:
    """Peak bytes the CPU allocator held while the step ``setup()`` returns ran (what setup
    allocated and still holds included).

    Read from ``torch.profiler``'s allocator records (``profile_memory=True``): every
    allocation and free, in order, with its address and the operator it happened in;
    independent of MemTracker.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    gc.collect()  # what earlier work left to the cyclic collector is freed now, not in the step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run = setup()
        with record_function(_MARK):
            run()
    nodes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node.children)
    mark, = (n for n in nodes if n.name == _MARK)
    records = _own(sorted((n.start_time_ns, n.typed[1].alloc_size, n.typed[1].ptr,
                           id(n.parent)) for n in nodes if n.typed[0] == _EventType.Allocation))
    scratch = _scratch(records)
    current = clean_current = peak = clean = 0
    for time, size, ptr, _ in records:
        current += size
        if (time, ptr) not in scratch:
            clean_current += size
        if mark.start_time_ns <= time <= mark.end_time_ns:
            peak, clean = max(peak, current), max(clean, clean_current)
    return Allocated(peak, clean)


def _own(records: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int, int]]:
    """The records without frees of blocks allocated before the profile began. The profiler
    reports the free of any block it saw allocated, in an earlier profile too: memory the step
    did not allocate (an earlier check's model, collected mid-step) would otherwise be
    subtracted from what it did, down to a negative total."""
    live, out = set(), []
    for record in records:
        _, size, ptr, _ = record
        if size > 0:
            live.add(ptr)
        elif ptr in live:
            live.remove(ptr)
        else:
            continue
        out.append(record)
    return out


def _scratch(records: list[tuple[int, int, int, int]]) -> set[tuple[int, int]]:
    """(time, address) of the allocations and frees of blocks one operator both allocated
    and freed."""
    open_: dict[int, tuple[int, int]] = {}  # address -> (time allocated, operator)
    out = set()
    for time, size, ptr, parent in records:
        if size > 0:
            open_[ptr] = (time, parent)
        elif ptr in open_:
            start, owner = open_.pop(ptr)
            if owner == parent:
                out.update({(start, ptr), (time, ptr)})
    return out


_MARK = "scoredistill.memory.step"
