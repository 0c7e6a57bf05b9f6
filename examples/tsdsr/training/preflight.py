"""What train.py checks before any model loads: every path it was given, the output folder (and
that no other run writes into it) and the experiment tracker. Each problem is a UserError naming
the flag."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from examples.tsdsr.training.config import TrainConfig
from examples.tsdsr.training.preemption import any_process
from scoredistill.cli import UserError, writable_dir
from scoredistill.sr.loading import PROMPTS_FILE, check_sd3_folder

LOCK_FILE = ".train.lock"  # in --output-dir; holds the pid of the run that has it locked
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_paths(config: TrainConfig) -> None:
    """Folders and files named by ``config`` exist and have what the run reads from them."""
    for name in ("hq_dir", "lq_dir", "val_hq_dir", "val_lq_dir", "embeds_dir", "pretrained"):
        value = getattr(config, name)
        if value is not None and not Path(value).is_dir():
            what = "is a file, not a folder" if Path(value).exists() else "does not exist"
            raise UserError(f"{_flag(name)} {value} {what}")
    for name in ("teacher_lora", "lpips_backbone"):
        value = getattr(config, name)
        if value is not None and not Path(value).is_file():
            raise UserError(f"{_flag(name)} {value}: no such file")
    if config.pretrained is not None:
        try:
            check_sd3_folder(config.pretrained)
        except FileNotFoundError as exc:
            raise UserError(str(exc)) from None
    if config.embeds_dir is not None and not (Path(config.embeds_dir) / PROMPTS_FILE).is_file():
        raise UserError(f"--embeds-dir {config.embeds_dir} has no {PROMPTS_FILE}: run "
                        f"python -m examples.tsdsr.precompute --hq-dir {config.hq_dir} "
                        f"--out {config.embeds_dir} first")
    writable_dir(config.output_dir, "--output-dir")


def check_tracker(report_to: str) -> None:
    """The ``--report-to`` tracker's package imports (else training would log nowhere)."""
    modules = TRACKER_MODULES.get(report_to, ())
    if modules and not any(importlib.util.find_spec(m) for m in modules):
        raise UserError(f"--report-to {report_to}: {modules[0]} is not installed; pip install "
                        f"{modules[0]}, or pass --report-to none (or another tracker)")


def _running(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _holder_pid(fd: int, wait_s: float = 1.0) -> str:
    """The pid of the run holding the lock on ``fd``'s file, or "" if none shows in ``wait_s``.

    The holder writes its pid just after it takes the lock, so a run refused at that instant
    finds the file empty, or still holding the pid of an earlier run that has ended: it waits a
    moment for a running process's pid rather than name no one, or the wrong process.
    """
    deadline = time.monotonic() + wait_s
    while True:
        pid = os.pread(fd, 32, 0).decode("ascii", "replace")
        if pid.endswith("\n") and pid.strip().isdigit() and _running(pid):
            return pid.strip()
        if time.monotonic() > deadline:
            return ""
        time.sleep(0.005)


def lock_output_dir(output_dir: str | Path) -> int:
    """Take ``output_dir``'s run lock (``flock`` on its ``.train.lock``, checked and taken in one
    system call, so two runs started together cannot both get it); return the file descriptor
    that holds it until closed. A UserError naming the folder if another run holds it.

    flock rather than an ``O_EXCL`` marker file: the kernel drops the lock when its process ends,
    however it ends, so a run killed with ``kill -9`` leaves no stale lock and resumes as is.
    """
    fd = os.open(Path(output_dir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_pid(fd)
        os.close(fd)
        raise UserError(f"--output-dir {output_dir} is in use by another training run"
                        f"{f' (pid {holder})' if holder else ''}: wait for it to end, "
                        "or give another --output-dir") from None
    # The file stays after the run: unlinking it while another run opens it would let the two
    # lock two different files.
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


@contextmanager
def one_run(output_dir: str | Path, accelerator: Any) -> Iterator[None]:
    """Hold ``output_dir``'s run lock for the ``with`` block: the main process takes it (the
    others share its run), and every process stops with the same UserError if it cannot."""
    fd, refused = None, None
    if accelerator.is_main_process:
        try:
            fd = lock_output_dir(output_dir)
        except UserError as exc:
            refused = exc
    try:
        if any_process(accelerator, refused is not None):  # a collective: no rank waits alone
            raise refused or UserError(f"--output-dir {output_dir} is in use by another "
                                       "training run (see process 0's message)")
        yield
    finally:
        if fd is not None:
            os.close(fd)
