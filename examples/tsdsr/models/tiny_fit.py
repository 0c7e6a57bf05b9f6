"""Pre-fit the embedded tiny backbone so it is a real miniature of SD3: a VAE that reconstructs
and a rectified-flow teacher that denoises those latents, on scikit-image's bundled photos.

Seeded and deterministic for a given number of CPU threads: torch splits float reductions by
thread, so fits on 1 and 2 threads give different weights under the same cache hash.
The result is cached as safetensors under ``$SCOREDISTILL_CACHE`` (default
``~/.cache/scoredistill``) in ``tiny-<hash>/``, the hash covering the architecture, seed and fit
settings. Every file is written atomically and listed with its SHA-256 in ``manifest.json``
(written last): a missing, partial or altered file makes the cache rebuild, never load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from examples.tsdsr.data.tiny_data import TRAIN, photo
from examples.tsdsr.models.tiny import CONFIGS, random_backbone
from scoredistill import DiffusionLoss, UniformIndex
from scoredistill.adapters import SD3ScoreModel
from scoredistill.sr.imageio import write_atomic
from scoredistill.sr.latents import decode, encode

log = logging.getLogger("tsdsr.tiny_fit")
FORMAT = 2  # bump when the fitting code changes what a given hash produces
MANIFEST = "manifest.json"
FILES = ("vae.safetensors", "transformer.safetensors")


@dataclass(frozen=True)
class FitSettings:
    """Adam steps, learning rates and crops of the two fits (all in the cache hash)."""

    # Every student decodes through this VAE: after 200 steps it reconstructed the held-out
    # photos (rocket, motorcycle) at 19.9 / 21.5 dB, no better than their x4 bicubic (21.4 on
    # average), after 800 with a cosine decay at 23.2 / 23.7. (Not a strict bound: a student's
    # latent need not be the encoder's, and on rocket the trained student scores above it.)
    vae_steps: int = 800
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6  # keeps the posterior a posterior; reconstruction dominates
    teacher_steps: int = 200
    teacher_lr: float = 1e-3
    crop: int = 64
    batch: int = 8


def default_cache_dir() -> Path:
    """``$SCOREDISTILL_CACHE`` or ``~/.cache/scoredistill``."""
    return Path(os.environ.get("SCOREDISTILL_CACHE", Path.home() / ".cache" / "scoredistill"))


def photos(names: tuple[str, ...], side: int = 128) -> list[Tensor]:
    """scikit-image's bundled photos ``names`` as (3, H, W) in [0, 1], short side ``side``."""
    return [photo(name, side) for name in names]


def random_crops(images: list[Tensor], count: int, size: int, g: torch.Generator) -> Tensor:
    """``count`` random (3, size, size) crops, half flipped, in [-1, 1]: (count, 3, size, size)."""
    out = []
    for _ in range(count):
        image = images[int(torch.randint(len(images), (1,), generator=g))]
        y = int(torch.randint(image.shape[1] - size + 1, (1,), generator=g))
        x = int(torch.randint(image.shape[2] - size + 1, (1,), generator=g))
        crop = image[:, y:y + size, x:x + size]
        out.append(crop.flip(-1) if torch.rand((), generator=g) < 0.5 else crop)
    return torch.stack(out) * 2 - 1


def fit_vae(vae: nn.Module, images: list[Tensor], settings: FitSettings,
            g: torch.Generator) -> None:
    """L1 + MSE reconstruction (+ tiny KL) of random crops, through SD3's latent shift/scale."""
    opt = torch.optim.Adam(vae.parameters(), lr=settings.vae_lr)
    # Decayed to 0: at a constant rate the held-out reconstruction swings by 3 dB between steps.
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.vae_steps)
    vae.train()
    bar = tqdm(range(settings.vae_steps), desc="fitting the tiny VAE (once per machine)",
               unit="step")
    for step in bar:
        x = random_crops(images, settings.batch, settings.crop, g)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(g)).sample
        loss = (F.l1_loss(rec, x) + F.mse_loss(rec, x)
                + settings.kl_weight * posterior.kl().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()


def fit_teacher(transformer: nn.Module, vae: nn.Module, images: list[Tensor],
                cond: dict[str, Tensor], settings: FitSettings, g: torch.Generator) -> None:
    """SD3's flow-matching loss on the fitted VAE's latents, over the whole schedule.

    The prompt is the default one half of the time and a fresh random embedding otherwise: the
    photos have no captions, so the tiny teacher should not depend on the prompt.
    """
    model = SD3ScoreModel(transformer)
    # Indices 0..999: the student queries t = 1000 (index 0), TSD 50..949.
    loss_fn = DiffusionLoss(space="flow", index_sampler=UniformIndex(0, 1000))
    opt = torch.optim.Adam(transformer.parameters(), lr=settings.teacher_lr)
    transformer.train()
    bar = tqdm(range(settings.teacher_steps), desc="fitting the tiny teacher (once per machine)",
               unit="step")
    for step in bar:
        with torch.no_grad():
            z = encode(vae, random_crops(images, settings.batch, settings.crop, g),
                       posterior="sample", generator=g)
        b = z.shape[0]
        keep = (torch.rand(b, generator=g) < 0.5).float()
        step_cond = {k: v.expand(b, *v.shape[1:]) * _bcast(keep, v)
                     + torch.randn(b, *v.shape[1:], generator=g) * _bcast(1 - keep, v)
                     for k, v in cond.items()}
        loss = loss_fn(z, step_cond, model=model, generator=g).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    transformer.eval()


def _bcast(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def cache_key(config: str, seed: int, settings: FitSettings) -> str:
    """Hash of the architecture, seed, fit settings and data names (16 hex digits)."""
    spec = dataclasses.asdict(CONFIGS[config])
    text = json.dumps({"format": FORMAT, "config": spec, "seed": seed, "data": TRAIN,
                       "fit": dataclasses.asdict(settings)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_cache(folder: Path) -> dict[str, dict[str, Tensor]] | None:
    """The cached state dicts, or None if the cache is absent or any file fails its checksum."""
    from safetensors.torch import load_file

    try:
        manifest = json.loads((folder / MANIFEST).read_text("utf-8"))
        if any(_sha256(folder / name) != manifest[name] for name in FILES):
            log.warning("%s: checksum mismatch, rebuilding the tiny backbone", folder)
            return None
        return {name: load_file(str(folder / name)) for name in FILES}
    except (OSError, ValueError, KeyError) as exc:
        if (folder / MANIFEST).exists():
            log.warning("%s: unreadable cache (%s), rebuilding", folder, exc)
        return None


def write_cache(folder: Path, states: dict[str, dict[str, Tensor]]) -> None:
    """Each file atomically, then the manifest of their checksums (its presence = complete)."""
    from safetensors.torch import save

    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    for name, state in states.items():
        write_atomic(folder / name, save({k: v.contiguous() for k, v in state.items()}))
    manifest = {name: _sha256(folder / name) for name in FILES}
    write_atomic(folder / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def fitted_states(config: str = "tiny-fit", seed: int = 0, settings: FitSettings | None = None,
                  cache_dir: str | Path | None = None) -> dict[str, dict[str, Tensor]]:
    """``{"vae.safetensors": ..., "transformer.safetensors": ...}`` fp32 CPU state dicts, from
    the cache or fitted now (then cached)."""
    settings = settings or FitSettings()
    folder = Path(cache_dir or default_cache_dir()) / f"tiny-{cache_key(config, seed, settings)}"
    cached = read_cache(folder)
    if cached is not None:
        return cached
    start = time.perf_counter()
    parts = random_backbone(config, seed=seed)
    images = photos(TRAIN)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # any global draw inside diffusers/torch stays reproducible
        g = torch.Generator().manual_seed(seed + 2)
        fit_vae(parts.vae, images, settings, g)
        parts.vae.requires_grad_(False)
        fit_teacher(parts.transformer, parts.vae, images, parts.cond, settings, g)
    states = {"vae.safetensors": parts.vae.state_dict(),
              "transformer.safetensors": parts.transformer.state_dict()}
    write_cache(folder, states)
    log.info("fitted the tiny backbone in %.1f s -> %s", time.perf_counter() - start, folder)
    return read_cache(folder) or states


@torch.no_grad()
def reconstruct(vae: nn.Module, image: Tensor) -> Tensor:
    """VAE round trip (posterior mean) of (B, 3, H, W) in [0, 1], sides multiples of the factor."""
    return (decode(vae, encode(vae, image * 2 - 1, posterior="mode")) + 1) / 2
