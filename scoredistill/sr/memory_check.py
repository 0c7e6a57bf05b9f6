"""``scoredistill-sr``'s memory check, made before anything loads: the memory planner's peak for
the run (:func:`scoredistill.memory.plan_sr`: the pipeline traced on fake tensors at the run's
real sizes, from the model folder's config.json, no weights read) against the CUDA card's free
memory, and the host memory the tiled VAE's waiting tiles take against the RAM available. A
run that will not fit is refused, naming the tile and batch flags that would fit on the card.

Plans are cached on disk (``$XDG_CACHE_HOME/scoredistill/sr_plans.json``, by a hash of the
config, the sizes, the flags, the library versions and the planner's
:data:`~scoredistill.memory.trace.REVISION`): a traced plan of SD3-medium at
1024 -> 4096 px takes about a minute of CPU, a cached one nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import torch

from scoredistill.cli import UserError
from scoredistill.sr.imageio import _orientation, _pillow_open
from scoredistill.sr.tiling import TileConfig

GIB = 2**30
MAX_PLANS = 8
"""Plans the search for fitting settings traces at most (each costs seconds to minutes)."""
MIN_TILES = TileConfig(latent=16, encoder=128, decoder=32)
"""Tile sides the search does not go below (the overlaps are the run's own)."""
STAGES = {"AutoencoderKL.encoder": "encoder", "AutoencoderKL.decoder": "decoder"}
"""Module name prefixes of the planner's rows -> stage; any other module is the transformer's."""


class Planned(NamedTuple):
    """A planned run: peak bytes on the card, the stage where it happens ("transformer",
    "encoder", "decoder"), and the bytes of host memory the tiled VAE's waiting tiles take at
    most (:attr:`scoredistill.memory.Plan.host`; 0 untiled)."""

    peak: int
    stage: str
    host: int


@dataclass(frozen=True)
class Settings:
    """The CLI's tile and batch flags: transformer and VAE batch; tiles (None: --no-tile)."""

    batch: int
    vae_batch: int
    tiles: TileConfig | None

    def flags(self) -> str:
        """The command-line flags that give these settings."""
        flags = f"--batch-size {self.batch} --vae-batch-size {self.vae_batch}"
        t = self.tiles
        if t is None:
            return flags + " --no-tile"
        return (f"{flags} --latent-tile {t.latent} {t.latent_overlap} --encoder-tile "
                f"{t.encoder} {t.encoder_overlap} --decoder-tile {t.decoder} {t.decoder_overlap}")


@dataclass(frozen=True)
class Run:
    """What the plan depends on besides :class:`Settings`: the backbone config (the folder's),
    the largest input ``height`` x ``width`` (upright), how many files, and the options."""

    config: str  # the folder holding transformer/ and vae/ config.json
    height: int
    width: int
    files: int
    upscale: float
    process_size: int
    dtype: torch.dtype
    channels_last: bool


def largest_image(paths: Sequence[Path], max_pixels: int | None) -> tuple[int, int] | None:
    """(height, width) upright of the input with the most pixels, from the headers only; files
    whose header cannot be read are left to the file loop (it reports them)."""
    best = None
    for path in paths:
        try:
            with _pillow_open(path, max_pixels) as img:
                w, h = img.size
                if _orientation(img) >= 5:  # EXIF 5-8 turn the image a quarter: sides swap
                    w, h = h, w
        except (OSError, ValueError, SyntaxError):  # unreadable header: the loop names it
            continue
        if best is None or h * w > best[0] * best[1]:
            best = (h, w)
    return best


def on_cuda(device: str) -> bool:
    """Whether the check applies: ``device`` is a CUDA device (a CPU has no card to fill)."""
    return torch.device(device).type == "cuda"


def free_memory(device: str) -> int:
    """Bytes free on the CUDA ``device`` now (the driver's count: other processes included)."""
    return torch.cuda.mem_get_info(torch.device(device))[0]


def available_host_memory() -> int:
    """Bytes of host RAM that can be taken now without swapping (psutil's ``available``)."""
    import psutil

    return psutil.virtual_memory().available


def check(run: Run, settings: Settings, device: str, *, plan: Callable | None = None,
          log: Callable[[str], None] | None = None) -> None:
    """:class:`UserError` (one line) unless the planned peak fits in ``device``'s free memory
    and the tiled VAE's waiting tiles in the host's available RAM; it names what the run needs,
    what is free, and for the card the largest settings found that fit.

    ``plan(run, settings) -> Planned`` defaults to :func:`planned` (cached)."""
    plan = plan or planned
    log = log or print
    free, available = free_memory(device), available_host_memory()
    log(f"scoredistill-sr: checking that the run fits in {device}'s {size(free)} free and the "
        f"host's {size(available)} available (memory plan of the largest input, "
        f"{run.height}x{run.width} px; once per setting, then cached; --force skips it)")
    peak, stage, host = plan(run, settings)
    if host > available:
        # Tiles or batches do not shrink it: the tiles hold the whole image's activations.
        raise UserError(f"this run would need {size(host)} of host memory for the VAE's tiles "
                        f"(planned, largest input {run.height}x{run.width} px, "
                        f"{settings.flags()}) but {size(available)} is available: free host "
                        "memory, or use a smaller --upscale or smaller inputs; or pass --force "
                        "to run anyway")
    if peak <= free:
        return
    log(f"scoredistill-sr: planned {size(peak)}, over the free memory: searching for settings "
        f"that fit (up to {MAX_PLANS} more plans)")
    fit = fitting(run, settings, free, stage, plan, log)
    found = (f"settings that fit: {fit[0].flags()} (planned {size(fit[1])})" if fit else
             f"no setting down to {_smallest(settings).flags()} fits: use --dtype bf16/fp16, "
             "a smaller --upscale, or a card with more free memory")
    raise UserError(f"this run would need {size(peak)} on {device} (planned peak, largest "
                    f"input {run.height}x{run.width} px, {settings.flags()}) but {size(free)} "
                    f"is free: {found}; or pass --force to run anyway")


def size(n: int) -> str:
    """Bytes as GiB to two decimals, or MiB below a tenth of a GiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def fitting(run: Run, settings: Settings, free: int, stage: str, plan: Callable,
            log: Callable[[str], None] = print) -> tuple[Settings, int] | None:
    """The first settings that fit, halving the batch then the tile of the stage that peaks
    (re-planned after each step), or None after :data:`MAX_PLANS` plans or at the floor."""
    for _ in range(MAX_PLANS):
        smaller = _halve(settings, stage)
        if smaller is None:
            # This stage is at its floor: another stage may still shrink (its peak may be next).
            smaller = next((s for s in map(lambda st: _halve(settings, st), _ORDER) if s), None)
            if smaller is None:
                return None
        settings = smaller
        peak, stage, _ = plan(run, settings)
        log(f"  {settings.flags()}: {size(peak)}")
        if peak <= free:
            return settings, peak
    return None


_ORDER = ("transformer", "decoder", "encoder")


def _halve(s: Settings, stage: str) -> Settings | None:
    """``s`` with the batch of ``stage`` halved, else its tile side; None at the floor."""
    if s.tiles is None:  # untiled: tiling with today's defaults comes first
        return dataclasses.replace(s, tiles=TileConfig())
    batch = "batch" if stage == "transformer" else "vae_batch"
    if getattr(s, batch) > 1:
        return dataclasses.replace(s, **{batch: getattr(s, batch) // 2})
    t = s.tiles
    side, overlap, floor = {"transformer": (t.latent, t.latent_overlap, MIN_TILES.latent),
                            "encoder": (t.encoder, 0, MIN_TILES.encoder),
                            "decoder": (t.decoder, 0, MIN_TILES.decoder)}[stage]
    half = side // 2 - (side // 2) % 2 if stage == "transformer" else side // 2
    if half < floor or half <= overlap:
        return None
    field = {"transformer": "latent"}.get(stage, stage)
    return dataclasses.replace(s, tiles=dataclasses.replace(t, **{field: half}))


def _smallest(s: Settings) -> Settings:
    while True:
        smaller = next((x for x in (_halve(s, st) for st in _ORDER) if x), None)
        if smaller is None:
            return s
        s = smaller


def planned(run: Run, settings: Settings) -> Planned:
    """``run`` with ``settings`` planned: from the disk cache, else traced by
    :func:`scoredistill.memory.plan_sr` on fake tensors and cached."""
    from scoredistill.memory import read_spec

    spec = read_spec(run.config)
    key = _key(spec, run, settings)
    cache = _read_cache()
    if not _entry(cache.get(key)):  # missing, or cached in another form (before host memory)
        cache = _read_cache()  # another process may have written it meanwhile
        cache[key] = list(_trace(spec, run, settings))
        _write_cache(cache)
    peak, stage, host = cache[key]
    return Planned(int(peak), str(stage), int(host))


def _entry(value: object) -> bool:
    return isinstance(value, list) and len(value) == len(Planned._fields)


def _trace(spec: object, run: Run, settings: Settings) -> Planned:
    from diffusers.utils import logging

    from scoredistill.memory import SRRun, plan_sr

    logging.set_verbosity_error()  # the "keep modules in float32" notice for built configs
    opts = SRRun(height=run.height, width=run.width, upscale=run.upscale,
                 images=_images_per_call(spec, run, settings), batch=settings.batch,
                 tiles=settings.tiles or False, vae_batch=settings.vae_batch,
                 process_size=run.process_size, dtype=run.dtype, channels_last=run.channels_last)
    plan = plan_sr(spec, opts)  # type: ignore[arg-type]  # CPU kernels, as scoredistill-plan
    name = max(plan.top, key=lambda row: row[1], default=("", 0, 0))[0]
    stage = next((st for prefix, st in STAGES.items() if name.startswith(prefix)), "transformer")
    return Planned(plan.total, stage, plan.host)


def _images_per_call(spec: object, run: Run, settings: Settings) -> int:
    """How many inputs of the largest size the file loop would gather into one call: until they
    make ``batch`` transformer tiles (:func:`scoredistill.sr.files.super_resolve_files`)."""
    from scoredistill.adapters import SD3ScoreModel
    from scoredistill.memory.backbones import build_meta
    from scoredistill.sr.loading import SRModel
    from scoredistill.sr.pipeline import SROptions, TSDSRPipeline

    meta = build_meta(spec)  # type: ignore[arg-type]
    cond = {"prompt_embeds": torch.empty(1, 1, 1, device="meta")}
    pipe = TSDSRPipeline(SRModel(SD3ScoreModel(meta.transformer), meta.vae, cond),
                         tiles=settings.tiles, batch_size=settings.batch)
    tiles = pipe.latent_tiles(run.height, run.width,
                              SROptions(upscale=run.upscale, process_size=run.process_size))
    return min(run.files, max(1, settings.batch // tiles))


def _key(spec: object, run: Run, settings: Settings) -> str:
    from scoredistill.memory.trace import REVISION

    versions = {name: _version(name) for name in ("scoredistill", "torch", "diffusers")}
    versions["planner"] = str(REVISION)
    text = json.dumps([dataclasses.asdict(spec), dataclasses.asdict(run) | {"config": None},  # type: ignore[call-overload]
                       dataclasses.asdict(settings), versions], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def cache_file() -> Path:
    """Where plans are cached: ``$XDG_CACHE_HOME/scoredistill/sr_plans.json``."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "scoredistill" / "sr_plans.json"


def _read_cache() -> dict[str, list]:
    try:
        cache = json.loads(cache_file().read_text())
    except (OSError, ValueError):  # none yet, or damaged: a cache, re-planned and rewritten
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(cache: dict[str, list]) -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home: the check still ran, only the cache is lost
        print(f"scoredistill-sr: could not cache the memory plan in {path} ({exc})",
              file=sys.stderr)
