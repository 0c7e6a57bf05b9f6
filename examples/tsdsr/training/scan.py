"""Training data checked before the first step: every image decodes and is at least the crop,
every caption is UTF-8 with current embeddings; all bad files are listed at once, not found one
by one when first sampled hours into a run.

Each process checks its share of the images (``rank::world``) with the DataLoader's workers; the
files that passed are remembered in ``<output-dir>/data_check.json`` by size and modification
time, so a resumed run re-checks only what changed. A file changed in place with both kept (or
damaged after the check) is not caught here but when sampled: training skips it with a warning
naming it (:class:`~examples.tsdsr.training.data.CaptionedCrops`). Keying on a content hash
instead would read every file on each resume.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from examples.tsdsr.training.data import CaptionedCrops

CACHE_FILE = "data_check.json"


def _signature(files: Sequence[Path | None]) -> list[Any]:
    # Size and modification time of each file an item reads; None for absent ones.
    out: list[Any] = []
    for f in files:
        try:
            st = os.stat(f) if f is not None else None
        except OSError:
            st = None
        out.append([st.st_size, st.st_mtime_ns] if st is not None else None)
    return out


def _item_files(items: CaptionedCrops, index: int) -> list[Path | None]:
    from examples.tsdsr.precompute import image_file

    ds = items.dataset
    path = ds.paths[index]
    return [path, ds.lq_paths[index] if ds.lq_paths is not None else None,
            path.with_suffix(".txt"), image_file(items.embeds_dir, ds.hq_dir, path)]


class _Checks(Dataset):
    """``(index, problem or None, signature)`` of the items to check."""

    def __init__(self, items: CaptionedCrops, indices: list[int]) -> None:
        self.items, self.indices = items, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, str | None, list[Any]]:
        index = self.indices[i]
        signature = _signature(_item_files(self.items, index))
        try:
            self.items.check(index)
        except (ValueError, OSError) as exc:
            return index, " ".join(str(exc).split()), signature
        return index, None, signature


def scan_items(items: CaptionedCrops, cache: dict[str, Any], workers: int = 0, rank: int = 0,
               world: int = 1, progress: bool = True) -> tuple[dict[Path, str], dict[str, Any]]:
    """Check this process's share of ``items``; return ``{hq path: problem}`` and the cache
    entries of the items that passed (``cache`` holds those of an earlier scan)."""
    todo, passed = [], {}
    for index in range(rank, len(items), world):
        key = str(items.dataset.paths[index])
        if cache.get(key) == _signature(_item_files(items, index)):
            passed[key] = cache[key]
        else:
            todo.append(index)
    loader = DataLoader(_Checks(items, todo), batch_size=None, num_workers=workers)
    problems = {}
    for index, problem, signature in tqdm(loader, desc="checking training data", unit="img",
                                          disable=not progress or not todo):
        path = items.dataset.paths[index]
        if problem is None:
            passed[str(path)] = signature
        else:
            problems[path] = problem
    return problems, passed


def read_cache(output_dir: Path, context: dict[str, Any]) -> dict[str, Any]:
    """The remembered passes, if made under the same ``context`` (crop size, folders)."""
    try:
        saved = json.loads((output_dir / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return saved.get("items", {}) if saved.get("context") == context else {}


def write_cache(output_dir: Path, context: dict[str, Any], passed: dict[str, Any]) -> None:
    from scoredistill.sr.imageio import write_atomic

    output_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"context": context, "items": passed})
    write_atomic(output_dir / CACHE_FILE, text.encode())


def scan_training_data(accelerator: Any, items: CaptionedCrops, val_problems: dict[Path, str],
                       output_dir: Path, context: dict[str, Any], workers: int
                       ) -> dict[Path, str]:
    """Every bad training file of all processes (and ``val_problems``), the same on each."""
    from accelerate.utils import gather_object

    cache = read_cache(output_dir, context)
    problems, passed = scan_items(items, cache, workers, accelerator.process_index,
                                  accelerator.num_processes, accelerator.is_local_main_process)
    if accelerator.num_processes > 1:
        problems = dict(gather_object(list(problems.items())))
        passed = dict(gather_object(list(passed.items())))
    if accelerator.is_main_process:
        write_cache(output_dir, context, passed)
    return {**problems, **val_problems}
