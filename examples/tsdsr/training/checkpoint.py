"""Atomic, resumable TSD-SR checkpoints: LoRA files plus optimizer/scheduler state, all safetensors
and JSON (nothing a load could execute).

A checkpoint is a folder ``step-NNNNNNNN`` written as ``.tmp-step-NNNNNNNN-<pid>`` and renamed
when complete, so a run killed mid-save leaves only a temp folder, which resume ignores and the
next save removes. RNG state is not needed: every draw is seeded from ``(seed, step)``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from examples.tsdsr.training.models import VAE_ADAPTER, TSDSRModels
from examples.tsdsr.training.sharding import is_sharded
from scoredistill.adapters import load_lora, lora_state_dict, save_lora

PATTERN = re.compile(r"step-(\d{8})")
LORA_FILES = {"transformer.safetensors": "student", "fake.safetensors": "fake"}
VAE_FILE = "vae.safetensors"  # the release's names for the student's two LoRA files
STATE_FILES = ("state.json", "state.safetensors")  # the state's structure, its tensors


def checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and PATTERN.fullmatch(p.name)
             and (p / STATE_FILES[0]).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve(resume: str | None, root: str | Path) -> Path | None:
    """``"latest"`` -> the newest complete checkpoint (None if there is none); a path -> itself."""
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILES[0]).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILES[0]})")
    return path


def save_checkpoint(root: str | Path, step: int, models: TSDSRModels, state: dict[str, Any],
                    keep: int, lora: dict[str, dict[str, Tensor]] | None = None) -> Path:
    """Write checkpoint ``step`` atomically, then keep only the newest ``keep`` ones.

    ``lora``: per transformer adapter, its tensors to write instead of the module's (whole
    tensors gathered from FSDP shards, see :func:`gather_lora`).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    transformer = models.roles.backbone.module
    for name, adapter in LORA_FILES.items():
        save_lora(tmp / name, transformer, adapter, state=(lora or {}).get(adapter))
    save_lora(tmp / VAE_FILE, models.vae, VAE_ADAPTER)
    write_state({**state, "step": step}, tmp)
    _fsync_dir(tmp)
    if final.exists():  # a re-save of the same step (resumed run): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


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
    for name, adapter in LORA_FILES.items():
        load_lora(path / name, transformer, adapter)
    load_lora(path / VAE_FILE, models.vae, VAE_ADAPTER)
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
