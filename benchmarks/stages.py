"""Per-stage wall time without host syncs in the loop: CUDA events at stage boundaries, read
once at the end (perf_counter on the CPU, where every op is synchronous anyway)."""

from __future__ import annotations

import time
from collections import defaultdict

import torch

STAGES = ("I/O", "VAE encode", "transformer", "VAE decode", "other")
"""The breakdown's stages, in the order a table shows them."""


class StageClock:
    """``mark(stage)`` closes the interval since the previous mark and books it to ``stage``.

    On CUDA only events are recorded (no synchronisation); :meth:`seconds` synchronises once.
    Time a stage spends on the host while the GPU is busy is booked to the stage whose events
    enclose it on the GPU's stream, so I/O overlapped with GPU work shows as GPU time.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self._marks: list[tuple[str, object]] = []
        self._last = self._now()

    def _now(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark(self, stage: str) -> None:
        """Book the time since the previous mark (or construction) to ``stage``."""
        now = self._now()
        self._marks.append((stage, (self._last, now)))
        self._last = now

    def seconds(self) -> dict[str, float]:
        """Total seconds per stage (one device synchronisation)."""
        if self.cuda:
            torch.cuda.synchronize()
        totals: dict[str, float] = defaultdict(float)
        for stage, (start, end) in self._marks:
            totals[stage] += (start.elapsed_time(end) / 1e3 if self.cuda  # type: ignore[union-attr]
                              else end - start)  # type: ignore[operator]
        return dict(totals)
