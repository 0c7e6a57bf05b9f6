"""Preemption: SIGTERM and SIGINT (what SLURM, Kubernetes and Ctrl-C send) end training after
the current step, with a checkpoint, instead of killing it mid-step.

The first signal sets a flag that the loop reads after each step (agreed by all processes, so
they stop at the same step); the previous handlers are then restored, so a second signal stops
the process at once (checkpoints are written atomically either way). DataLoader workers started
after the handler is installed inherit it (fork), so they keep feeding the last step.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

import torch

log = logging.getLogger("tsdsr.train")
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped by a signal after ``step``, with ``checkpoint`` written."""

    def __init__(self, signal_name: str, step: int, checkpoint: Any) -> None:
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {checkpoint} "
                         "written: run again with --resume latest to continue")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


class StopOnSignal:
    """Context manager: while active, SIGTERM/SIGINT only request a stop (:meth:`requested`)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # else signals cannot be set
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        self._restore()
        log.warning("received %s: finishing this step, then writing a checkpoint (send it again "
                    "to stop at once)", signal.Signals(signum).name)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "signal"

    def requested(self, accelerator: Any) -> bool:
        """Whether any process received a signal (a collective: every process calls it)."""
        return any_process(accelerator, self.received is not None)


def any_process(accelerator: Any, flag: bool) -> bool:
    """Whether ``flag`` is true on any process (a collective: every process calls it, so all
    take the same branch after it)."""
    if accelerator.num_processes == 1:
        return flag
    gathered = accelerator.gather(torch.tensor([float(flag)], device=accelerator.device))
    return bool(gathered.max() > 0)
