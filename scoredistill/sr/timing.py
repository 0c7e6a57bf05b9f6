"""Per-stage wall time of the SR pipeline (VAE encode, transformer, VAE decode, file I/O) that
costs no host synchronisation until the totals are asked for."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StageTimer:
    """Accumulates the time spent in named stages.

    On CUDA a stage is bracketed by two CUDA events on the current stream (GPU time, no sync);
    elsewhere by ``time.perf_counter`` (the CPU runs the ops synchronously). :meth:`totals`
    synchronises once and sums. Disabled (the default), :meth:`stage` does nothing.

    Example:
        >>> timer = StageTimer(enabled=True)
        >>> with timer.stage("encode"):
        ...     pass
        >>> sorted(timer.totals())
        ['encode']
    """

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled
        self._events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = \
            defaultdict(list)
        self._seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def stage(self, name: str, device: torch.device | None = None) -> Iterator[None]:
        """Time the enclosed work as stage ``name``; ``device``: where it runs (CUDA: events)."""
        if not self.enabled:
            yield
            return
        if device is not None and device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events[name].append((start, end))
            return
        t0 = time.perf_counter()
        yield
        self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        """Add host-measured ``seconds`` to stage ``name`` (e.g. time spent waiting on files)."""
        if self.enabled:
            self._seconds[name] += seconds

    def totals(self) -> dict[str, float]:
        """Seconds per stage so far (synchronises with the GPU once if CUDA stages ran)."""
        out = dict(self._seconds)
        if self._events:
            torch.cuda.synchronize()
        for name, pairs in self._events.items():
            out[name] = out.get(name, 0.0) + sum(s.elapsed_time(e) for s, e in pairs) / 1e3
        return out

    def reset(self) -> None:
        """Forget everything timed so far."""
        self._events.clear()
        self._seconds.clear()
