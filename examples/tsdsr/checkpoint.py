"""Atomic, resumable TSD-SR checkpoints: LoRA files (safetensors) plus optimizer/scheduler state.

A checkpoint is a folder ``step-NNNNNNNN`` written as ``.tmp-step-NNNNNNNN-<pid>`` and renamed
when complete, so a run killed mid-save leaves only a temp folder, which resume ignores and the
next save removes. RNG state is not needed: every draw is seeded from ``(seed, step)``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from examples.tsdsr.training.models import VAE_ADAPTER, TSDSRModels
from scoredistill.adapters import load_lora, save_lora

PATTERN = re.compile(r"step-(\d{8})")
LORA_FILES = {"transformer.safetensors": "student", "fake.safetensors": "fake"}
VAE_FILE = "vae.safetensors"  # the release's names for the student's two LoRA files


def checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and PATTERN.fullmatch(p.name)
             and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve(resume: str | None, root: str | Path) -> Path | None:
    """``"latest"`` -> the newest complete checkpoint (None if there is none); a path -> itself."""
    if resume is None:
        return None
    if resume == "latest":
        found = checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.pt").is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no state.pt)")
    return path


def save_checkpoint(root: str | Path, step: int, models: TSDSRModels, state: dict[str, Any],
                    keep: int) -> Path:
    """Write checkpoint ``step`` atomically, then keep only the newest ``keep`` ones."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    transformer = models.roles.backbone.module
    for name, adapter in LORA_FILES.items():
        save_lora(tmp / name, transformer, adapter)
    save_lora(tmp / VAE_FILE, models.vae, VAE_ADAPTER)
    torch.save({**state, "step": step}, tmp / "state.pt")
    _fsync_dir(tmp)
    if final.exists():  # a re-save of the same step (resumed run): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, models: TSDSRModels) -> dict[str, Any]:
    """Load the LoRA weights into ``models``; return the saved state (optimizers, step, ...)."""
    path = Path(path)
    transformer = models.roles.backbone.module
    for name, adapter in LORA_FILES.items():
        load_lora(path / name, transformer, adapter)
    load_lora(path / VAE_FILE, models.vae, VAE_ADAPTER)
    return torch.load(path / "state.pt", map_location="cpu", weights_only=False)


def _fsync_dir(path: Path) -> None:
    # Make the folder entries (files written, the rename) durable before we rely on them.
    for file in [*path.iterdir(), path] if path.is_dir() else [path]:
        if file.is_file() or file == path:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
