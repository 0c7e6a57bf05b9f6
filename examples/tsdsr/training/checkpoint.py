"""Atomic, resumable TSD-SR checkpoints: LoRA files plus optimizer/scheduler state, all safetensors
and JSON (nothing a load could execute).

A checkpoint is a folder ``step-NNNNNNNN`` written as ``.tmp-step-NNNNNNNN-<pid>`` and renamed
when complete, so a run killed mid-save leaves only a temp folder, which resume ignores and the
next save removes; a save the file system refuses (a full disk) removes its own. A complete
folder whose files are damaged anyway (a copy cut short) is skipped by ``--resume latest`` with
a warning naming the file; if all are, it refuses. Files get the umask's mode. RNG state is not
needed: every draw is seeded from ``(seed, step)``.

One folder holds one run's line of steps: resuming from an older step sets the newer
checkpoints aside (``superseded-<time>/``) instead of mixing them in, and the cleanup only ever
removes checkpoints older than the one just written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from examples.tsdsr.training.models import VAE_ADAPTER, TSDSRModels
from examples.tsdsr.training.sharding import is_sharded
from scoredistill.adapters import load_lora, lora_state_dict, save_lora
from scoredistill.atomic import new_file_mode
from scoredistill.cli import UserError
from scoredistill.messages import brief

log = logging.getLogger("tsdsr.train")
PATTERN = re.compile(r"step-(\d{8})")
LORA_FILES = {"transformer.safetensors": "student", "fake.safetensors": "fake"}
VAE_FILE = "vae.safetensors"  # the release's names for the student's two LoRA files
HEAD_FILE = "head.safetensors"  # the discriminator head's weights (--regulariser f-*, dmd2-gan)
STATE_FILES = ("state.json", "state.safetensors")  # the state's structure, its tensors


def checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and PATTERN.fullmatch(p.name)
             and (p / STATE_FILES[0]).is_file()]
    return sorted(found, key=lambda p: p.name)


def step_of(checkpoint: Path) -> int:
    """The training step a ``step-NNNNNNNN`` folder holds."""
    return int(PATTERN.fullmatch(checkpoint.name).group(1))  # type: ignore[union-attr]


def damaged_file(checkpoint: str | Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from, naming the file (None if it can): each
    safetensors header must cover its file and ``state.json`` must parse."""
    from safetensors import safe_open

    checkpoint = Path(checkpoint)
    head = [HEAD_FILE] if (checkpoint / HEAD_FILE).exists() else []
    for name in (*LORA_FILES, VAE_FILE, STATE_FILES[1], *head):
        try:
            with safe_open(str(checkpoint / name), framework="pt"):
                pass
        except Exception as exc:  # SafetensorError, OSError: a missing or truncated file
            return f"{checkpoint / name}: {exc}"
    try:
        json.loads((checkpoint / STATE_FILES[0]).read_text())
    except (OSError, ValueError) as exc:
        return f"{checkpoint / STATE_FILES[0]}: {exc}"
    return None


def resolve(resume: str | None, root: str | Path) -> Path | None:
    """``"latest"`` -> the newest checkpoint that loads (None if there is none), skipping damaged
    ones with a warning naming the file, a UserError if every one is damaged; a path -> itself,
    or a UserError if it cannot load."""
    if resume is None:
        return None
    if resume == "latest":
        damaged = []
        for found in reversed(checkpoints(root)):
            problem = damaged_file(found)
            if problem is None:
                return found
            log.warning("skipping damaged checkpoint %s (%s); trying the one before", found.name,
                        problem)
            damaged.append(found.name)
        if damaged:  # starting over would silently throw the run away
            raise UserError(f"--resume latest: every checkpoint in {root} is damaged "
                            f"({brief(', '.join(damaged), 200)}; each listed above): restore one, "
                            "or move them out of the folder to start a new run")
        return None
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"--resume {path}: no such checkpoint folder (or pass --resume latest)")
    if not (path / STATE_FILES[0]).is_file():
        raise UserError(f"--resume {path} is not a complete checkpoint (no {STATE_FILES[0]}): "
                        "give a step-NNNNNNNN folder or --resume latest")
    problem = damaged_file(path)
    if problem is not None:
        raise UserError(f"--resume {path} is damaged: {problem}; give an earlier checkpoint")
    return path


def set_aside_newer(root: str | Path, step: int) -> Path | None:
    """Move the checkpoints after ``step`` (an earlier run's, when resuming from an older step)
    into ``root/superseded-<time>/``, so they are neither resumed nor cleaned up; return it."""
    newer = sorted(c for c in Path(root).glob("step-*")
                   if c.is_dir() and PATTERN.fullmatch(c.name) and step_of(c) > step)
    if not newer:
        return None
    stamp = time.strftime("superseded-%Y%m%d-%H%M%S")
    aside, n = Path(root) / stamp, 0
    while aside.exists():  # two resumes within a second
        n += 1
        aside = Path(root) / f"{stamp}-{n}"
    aside.mkdir()
    for c in newer:
        os.replace(c, aside / c.name)
    log.warning("resuming from step %d: moved the later checkpoints %s of the earlier run to "
                "%s (kept, but never resumed or deleted)", step,
                ", ".join(c.name for c in newer), aside)
    return aside


def save_checkpoint(root: str | Path, step: int, models: TSDSRModels, state: dict[str, Any],
                    keep: int, lora: dict[str, dict[str, Tensor]] | None = None) -> Path:
    """Write checkpoint ``step`` atomically, then keep only the newest ``keep`` ones. A write the
    file system refuses (a full disk) removes the temp folder and is a UserError naming the
    checkpoint and the system's reason.

    ``lora``: per transformer adapter, its tensors to write instead of the module's (whole
    tensors gathered from FSDP shards, see :func:`gather_lora`).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        tmp.mkdir()
        transformer = models.roles.backbone.module
        for name, adapter in LORA_FILES.items():
            save_lora(tmp / name, transformer, adapter, state=(lora or {}).get(adapter))
        save_lora(tmp / VAE_FILE, models.vae, VAE_ADAPTER)
        if models.head is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in
                       models.head.state_dict().items()}, str(tmp / HEAD_FILE))
        write_state({**state, "step": step}, tmp)
        mode = new_file_mode()
        for file in tmp.iterdir():  # safetensors writes through a 0600 temp file
            os.chmod(file, mode)
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (resumed run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        problem = write_error(exc)
        if problem is None:
            raise
        raise UserError(f"cannot write checkpoint {final} ({problem}): make room or fix the "
                        "folder, then rerun with --resume latest (the checkpoints before it are "
                        "intact)") from None
    # Only older steps are removed: never the folder just written, nor anything after it.
    older = [c for c in checkpoints(root) if step_of(c) < step]
    for old in older[:max(len(older) - keep + 1, 0)] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_error(exc: BaseException) -> str | None:
    """What the file system said when a write failed (a full disk or quota, a read-only or lost
    folder), or None when ``exc`` is no such failure (a bug: it keeps its traceback)."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    # safetensors reports its own as SafetensorError("Error while serializing: I/O error: No
    # space left on device (os error 28)").
    found = re.search(r"I/O error: .*\(os error (\d+)\)", str(exc))
    return os.strerror(int(found.group(1))) if found else None


def gather_lora(models: TSDSRModels) -> dict[str, dict[str, Tensor]]:
    """Per transformer adapter, its tensors whole: FSDP shards are all-gathered (a collective:
    every process calls it), other tensors returned as they are."""
    transformer = models.roles.backbone.module
    return {adapter: {k: v.full_tensor() if is_sharded(v) else v
                      for k, v in lora_state_dict(transformer, adapter).items()}
            for adapter in LORA_FILES.values()}


def load_checkpoint(path: str | Path, models: TSDSRModels) -> dict[str, Any]:
    """Load the LoRA weights into ``models`` (before any sharding); return the saved state
    (optimizers, step, ...)."""
    path = Path(path)
    transformer = models.roles.backbone.module
    files = [(name, transformer, adapter) for name, adapter in LORA_FILES.items()]
    for name, module, adapter in [*files, (VAE_FILE, models.vae, VAE_ADAPTER)]:
        try:
            load_lora(path / name, module, adapter)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            # Shapes that differ (another --*-rank) or missing keys: name the file.
            raise UserError(f"cannot load {path / name} into the {adapter} LoRA: "
                            f"{brief(' '.join(str(exc).split()), 400)}") from None
    if models.head is not None:
        try:
            models.head.load_state_dict(load_file(str(path / HEAD_FILE)))
        except (OSError, ValueError, RuntimeError) as exc:  # missing, or another head's shapes
            raise UserError(f"cannot load {path / HEAD_FILE} into the discriminator head: "
                            f"{brief(' '.join(str(exc).split()), 400)}") from None
    return read_state(path)


def write_state(state: dict[str, Any], folder: Path) -> None:
    """``state`` (nested dicts, lists, numbers, strings, tensors: optimizer and scheduler state
    dicts) as ``state.json`` plus its tensors in ``state.safetensors``."""
    tensors: dict[str, Tensor] = {}

    def encode(obj: Any) -> Any:
        if isinstance(obj, Tensor):
            key = str(len(tensors))
            tensors[key] = obj.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj):
                return {k: encode(v) for k, v in obj.items()}
            # Optimizer state is keyed by parameter index: keep the int keys as ints.
            return {"__items__": [[k, encode(v)] for k, v in obj.items()]}
        if isinstance(obj, list | tuple):
            return [encode(v) for v in obj]
        if obj is None or isinstance(obj, bool | int | float | str):
            return obj
        raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")

    text = json.dumps(encode(state), indent=1)
    save_file(tensors, str(folder / STATE_FILES[1]))
    (folder / STATE_FILES[0]).write_text(text)


def read_state(folder: Path) -> dict[str, Any]:
    """The state :func:`write_state` wrote into ``folder`` (tensors on the CPU)."""
    tensors = load_file(str(folder / STATE_FILES[1]))

    def decode(obj: Any) -> Any:
        if isinstance(obj, dict):
            if set(obj) == {"__tensor__"}:
                return tensors[obj["__tensor__"]]
            if set(obj) == {"__items__"}:
                return {k: decode(v) for k, v in obj["__items__"]}
            return {k: decode(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [decode(v) for v in obj]
        return obj

    return decode(json.loads((folder / STATE_FILES[0]).read_text()))


def _fsync_dir(path: Path) -> None:
    # Make the folder entries (files written, the rename) durable before we rely on them.
    for file in [*path.iterdir(), path] if path.is_dir() else [path]:
        if file.is_file() or file == path:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
