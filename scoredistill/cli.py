"""The error policy every command-line script shares.

A user's mistake (a value out of range, a missing or unwritable path, a CUDA device on a machine
without one) is reported as one line on stderr naming the argument or file and what to do, with
exit status 2, before any model loads. Internal errors keep their traceback. Batch jobs report
each bad item, go on, and exit 1 if any failed. A training run stopped by SIGTERM/SIGINT writes
its checkpoint and exits 75.

    parser = cli.ArgumentParser(prog="infer")
    parser.add_argument("--upscale", type=cli.number(float, low=0, low_open=True), default=4.0)

    @cli.entry_point("infer")
    def main(argv=None) -> int:
        ...
        raise cli.UserError(f"--out {out} is a file, not a folder")
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_OK = 0
EXIT_ITEMS_FAILED = 1  # a batch job finished, but some items (images, files) failed
EXIT_USER_ERROR = 2  # nothing was done: fix the named argument or file
EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL: stopped by a signal, checkpoint written; resume

Main = Callable[[Sequence[str] | None], int]


class UserError(ValueError):
    """A mistake the user can fix: printed as one line, exit status 2, no traceback.

    A ValueError, so Python callers of the scripts' functions catch it as one."""


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` that shows each option's default, except None and False (an unset value, a
    switch that is off: their help says what happens); sequences print as ``64 8``."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or not action.help or "%(default)" in action.help:
            return action.help
        if isinstance(default, tuple | list):
            return f"{action.help} (default: {' '.join(map(str, default))})"
        return super()._get_help_string(action)


def add_version(parser: argparse.ArgumentParser, distribution: str = "scoredistill") -> None:
    """Give ``parser`` a ``--version`` flag printing the installed ``distribution``'s version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version(distribution)
    except PackageNotFoundError:  # run from a checkout that was never pip-installed
        text = "(not installed: run from a source checkout)"
    parser.add_argument("--version", action="version", version=f"%(prog)s {text}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``prog: error: message (see --help)``, exit status 2,
    instead of a usage block (train.py has sixty flags) followed by the message."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def entry_point(prog: str) -> Callable[[Main], Main]:
    """Decorate a script's ``main(argv) -> int``: a :class:`UserError` becomes one line on stderr
    and exit status 2; any other exception propagates with its traceback."""

    def decorate(main: Main) -> Main:
        @functools.wraps(main)
        def wrapped(argv: Sequence[str] | None = None) -> int:
            try:
                return main(argv)
            except UserError as exc:
                return report(prog, exc)

        return wrapped

    return decorate


def report(prog: str, error: UserError) -> int:
    """Print ``error`` as one line, ``prog: error: ...``, on stderr; return exit status 2."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return EXIT_USER_ERROR


def number(kind: type[int] | type[float], low: float | None = None, high: float | None = None,
           *, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: ``kind`` (int or a finite float) within ``[low, high]`` (ends open
    as asked), else a message naming the range."""
    check = in_range(low, high, low_open=low_open, high_open=high_open)

    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        problem = check(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{problem}, got {text}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its "invalid ..." messages
    return convert


def in_range(low: float | None = None, high: float | None = None, *, low_open: bool = False,
             high_open: bool = False) -> Callable[[float], str | None]:
    """A check ``value -> None or "must be ..."`` for a finite number within the bounds."""
    def describe() -> str:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high:g}")
        return "must be a finite number" + (" " + " and ".join(parts) if parts else "")

    def check(value: float) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return describe()
        if not math.isfinite(value):
            return describe()
        if low is not None and (value < low or (low_open and value == low)):
            return describe()
        if high is not None and (value > high or (high_open and value == high)):
            return describe()
        return None

    return check


def device(text: str) -> str:
    """An argparse ``type`` for ``--device``: a device PyTorch can use on this machine."""
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text}: CUDA is not available here (no GPU, or a CPU-only PyTorch build): "
                "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available here: use --device cpu")
    return text


def existing_dir(text: str) -> Path:
    """An argparse ``type``: a folder that exists."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{path} is a file, not a folder" if path.exists() else f"no folder {path}")
    return path


def existing_file(text: str) -> Path:
    """An argparse ``type``: a file that exists."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(
            f"{path} is a folder, not a file" if path.exists() else f"no file {path}")
    return path


def existing_path(text: str) -> Path:
    """An argparse ``type``: a file or folder that exists."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no file or folder {path}")
    return path


def writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """Create ``path`` (with parents) if needed and check a file can be written in it; else a
    :class:`UserError` naming ``flag``. Run it before loading models."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder: give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(f"{flag} {path} is not writable ({exc.strerror or exc}): give a folder "
                        "you can write to") from None
    return path


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` means the GPU or the host ran out of memory for one item (a batch job
    reports that item and goes on)."""
    import torch

    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)
