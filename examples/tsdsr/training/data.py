"""Training batches keyed by step: (x_L, x_H, c_y) of TSD-SR Alg. 1 line 4, reproducible on resume.

Every random choice (epoch order, crop, flip, degradation) is seeded from ``(seed, step, slot)``,
so step ``k`` sees the same batch whether or not the run was interrupted before it, with any
number of DataLoader workers, and with no RNG state in the checkpoint.

A file that passed the data check but fails when sampled (damaged, removed or re-captioned during
the run, or since a resumed run's cached check) is skipped with a warning naming it: the next
image in the folder's order takes its place, so the batch is still the same on a rerun.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from examples.tsdsr.data import DegradationConfig, PairedSRDataset, degrade_batch, read_caption
from examples.tsdsr.precompute import image_file

log = logging.getLogger("tsdsr.train")
# Images tried in a row before giving up on a sample: more failing at once means the folder
# itself went (an unmounted disk), which no skipping fixes.
MAX_SKIPS = 8


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, well mixed (numpy's SeedSequence)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> np.uint64(1))


class StepBatches(Sampler[list[tuple[int, int]]]):
    """Per step, this process's ``[(image index, sample seed)] * batch_size``.

    The stream of indices is the concatenation of per-epoch permutations (seeded by epoch); step
    ``s`` takes positions ``[s G + r B, s G + (r + 1) B)`` with ``G = world * B``.
    """

    def __init__(self, num_images: int, batch_size: int, seed: int, start_step: int,
                 max_steps: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.b, self.seed = num_images, batch_size, seed
        self.start, self.stop, self.rank, self.world = start_step, max_steps, rank, world
        self._perm: tuple[int, Tensor] = (-1, torch.empty(0, dtype=torch.long))

    def _index(self, position: int) -> int:
        epoch = position // self.n
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return int(self._perm[1][position % self.n])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            slots = range(self.rank * self.b, (self.rank + 1) * self.b)
            yield [(self._index(step * self.world * self.b + j), derive_seed(self.seed, step, j))
                   for j in slots]

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)


class CaptionedCrops(Dataset):
    """PairedSRDataset items plus their precomputed caption embeddings (and HQ latent)."""

    def __init__(self, dataset: PairedSRDataset, embeds_dir: str | Path,
                 default: dict[str, Tensor], latent_factor: int | None = None) -> None:
        """``latent_factor``: read the precomputed HQ latent (the VAE's downsampling factor,
        which its side must be below the crop's); None: the training step encodes the crop."""
        self.dataset, self.embeds_dir = dataset, Path(embeds_dir)
        self.latent_factor = latent_factor
        self.use_latents = latent_factor is not None
        self.default = {k: v[0] for k, v in default.items()}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        problems = []
        for skip in range(min(MAX_SKIPS, len(self))):
            i = (index + skip) % len(self)
            try:
                return self._item(i, seed)
            except (ValueError, OSError) as exc:  # what check() raises, naming the file
                problems.append(" ".join(str(exc).split()))
                log.warning("skipping %s, which passed the data check: %s (fix or remove it)",
                            self.dataset.paths[i], problems[-1])
        raise ValueError(f"{len(problems)} training images in a row failed to load "
                         f"(data folder {self.dataset.hq_dir} gone?), the last: {problems[-1]}")

    def _item(self, index: int, seed: int) -> dict:
        # The dataset crops and flips with the global RNG: pin it to this sample's seed.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            item = self.dataset[index]
        return {**item, **self._embeds(Path(item["path"])), "seed": seed}

    def check(self, index: int) -> None:
        """Raise what sampling item ``index`` could raise (its image files, caption and
        precomputed embeddings), naming the file."""
        self.dataset.check(index)
        self._embeds(self.dataset.paths[index])

    def _embeds(self, image: Path) -> dict[str, Tensor]:
        from safetensors import safe_open

        file = image_file(self.embeds_dir, self.dataset.hq_dir, image)
        has_caption = image.with_suffix(".txt").is_file()
        if not file.is_file():
            if has_caption or self.use_latents:
                needed = "precompute.py --latents" if self.use_latents else "precompute.py"
                raise FileNotFoundError(f"{file} missing for {image}: rerun {needed}")
            return dict(self.default)
        with safe_open(str(file), framework="pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
            caption = (f.metadata() or {}).get("caption", "")
        if has_caption and caption != read_caption(image.with_suffix(".txt")):
            raise ValueError(f"{image}'s caption changed since precompute: rerun precompute.py")
        out = {k: stored[k] for k in ("prompt_embeds", "pooled_projections") if k in stored}
        out = out or dict(self.default)
        if self.use_latents:
            out["latent"] = self._latent(stored, file, image)
        return out

    def _latent(self, stored: dict[str, Tensor], file: Path, image: Path) -> Tensor:
        # The stored latent is of the whole image: it equals the crop's only when the image is
        # the crop (flips are refused by TrainConfig).
        if "latent" not in stored:
            raise ValueError(f"{file} holds no HQ latent for {image}: rerun precompute.py "
                             "--latents")
        latent, side = stored["latent"], self.dataset.crop_size
        if latent.ndim != 3 or tuple(latent.shape[-2:]) != (side // self.latent_factor,) * 2:
            raise ValueError(f"{image}: its precomputed latent is {tuple(latent.shape)}, not of a "
                             f"{side} x {side} image; --use-latents needs HQ images pre-cropped "
                             f"to --resolution {side}")
        return latent


def collate(items: list[dict], degradation: DegradationConfig | None) -> dict:
    """Stack a batch; without stored LQ, degrade the HQ crops (Real-ESRGAN, seeded per batch)."""
    batch = {k: torch.stack([it[k] for it in items]) for k, v in items[0].items()
             if isinstance(v, Tensor)}
    batch["path"] = [it["path"] for it in items]
    if "lq" not in batch:
        g = torch.Generator().manual_seed(derive_seed(items[0]["seed"], 1))
        batch = degrade_batch(batch, g, degradation)
    return batch


def make_loader(items: CaptionedCrops, sampler: StepBatches, workers: int,
                degradation: DegradationConfig | None = None) -> DataLoader:
    """A DataLoader over ``items`` drawing the batches ``sampler`` names."""
    from functools import partial

    return DataLoader(items, batch_sampler=sampler, num_workers=workers,
                      collate_fn=partial(collate, degradation=degradation),
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
