"""Super-resolve image files with :class:`~scoredistill.sr.pipeline.TSDSRPipeline`: files are
decoded ahead by reader threads (pinned memory on CUDA) and encoded and written atomically by a
writer thread while the accelerator works on the next batch; bad files are reported, not fatal.

One image's failure never stops the others. Expected ones (unreadable, too small, too large, an
output below 1 px, out of memory, an output that appeared meanwhile) are one reason each; any
other exception is a bug: it is reported with its type, and the first of each type is logged
with its traceback.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from scoredistill.cli import out_of_memory
from scoredistill.sr.compare import side_by_side
from scoredistill.sr.imageio import DEFAULT_MAX_PIXELS, LoadedImage, load_image, save_png
from scoredistill.sr.pipeline import DEFAULT_OPTIONS, MIN_SIDE, SROptions, TSDSRPipeline, resize

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, PIL's "L" conversion
log = logging.getLogger("scoredistill.sr.files")


def _expected(exc: BaseException) -> bool:
    """Whether ``exc`` is a known way for one file to fail (unreadable, too small or too large,
    out of GPU or host memory, an output that exists), as opposed to a bug."""
    return isinstance(exc, ValueError | OSError) or out_of_memory(exc)


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    if out_of_memory(exc):
        text += " (out of memory: try a smaller --batch-size, --latent-tile or --decoder-tile)"
    elif not _expected(exc):
        text += " (an internal error: please report it with the traceback logged above)"
    return text


class _Failures(dict[str, str]):
    """``{src: reason}`` of the inputs that failed; the first internal error of each type is
    logged with its traceback (the same bug on every image would bury the output)."""

    def __init__(self) -> None:
        super().__init__()
        self._logged: set[type] = set()

    def add(self, src: Path, exc: Exception) -> None:
        if not _expected(exc) and type(exc) not in self._logged:
            self._logged.add(type(exc))
            log.error("internal error on %s", src, exc_info=exc)
        self[str(src)] = _reason(exc)


def _unusable(src: Path, max_pixels: int | None) -> str | None:
    """Why ``src`` cannot be super-resolved (unreadable, too large or too small), if so."""
    try:
        h, w = load_image(src, max_pixels=max_pixels).rgb.shape[-2:]
    except ValueError as exc:
        return _reason(exc)
    if min(h, w) < MIN_SIDE:
        return f"image is {w}x{h} px; at least {MIN_SIDE} px per side is needed"
    return None


def plan_outputs(inputs: Sequence[Path], out_dir: Path, *,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS
                 ) -> tuple[list[tuple[Path, Path]], dict[str, str]]:
    """``(src, dst)`` pairs, and failures for names that would overwrite an input or each other.

    Inputs that share a stem (``photo.jpg``, ``photo.png`` -> ``photo.png``) are read first: an
    unreadable or too small one is reported, so that a usable sibling goes through; of several
    usable ones the first by name is kept and the others reported. Deterministic, so every
    process of a multi-process run plans the same list.
    """
    taken = {p.resolve() for p in inputs}
    by_dst: dict[Path, list[Path]] = {}
    failed: dict[str, str] = {}
    for src in inputs:
        dst = out_dir / f"{src.stem}.png"
        if dst.resolve() in taken:
            failed[str(src)] = f"output {dst} would overwrite an input"
        else:
            by_dst.setdefault(dst, []).append(src)
    winners = {}
    for dst, sources in by_dst.items():
        if len(sources) > 1:  # a clash: only a usable input may claim the name
            problems = {src: _unusable(src, max_pixels) for src in sources}
            failed |= {str(src): why for src, why in problems.items() if why}
            sources = [src for src in sources if not problems[src]]
            failed |= {str(src): f"output {dst} is already the output of another input, "
                                 f"{sources[0].name}" for src in sources[1:]}
        if sources:
            winners[sources[0]] = dst
    return [(src, winners[src]) for src in inputs if src in winners], failed


@dataclass(frozen=True)
class _Loaded:
    src: Path
    dst: Path
    image: LoadedImage


def _read(src: Path, dst: Path, pin: bool, max_pixels: int | None) -> _Loaded:
    loaded = load_image(src, max_pixels=max_pixels)
    if pin:  # page-locked: the upload is asynchronous and overlaps the GPU's work
        loaded = LoadedImage(loaded.rgb.pin_memory(), loaded.alpha, loaded.grey, loaded.bits)
    return _Loaded(src, dst, loaded)


def _output(sr: Tensor, image: LoadedImage) -> Tensor:
    """(C, H, W) to write: grey stays grey, the alpha plane is upsampled and re-attached."""
    if image.grey:
        sr = torch.einsum("chw,c->hw", sr, sr.new_tensor(_LUMA))[None]
    if image.alpha is not None:
        alpha = image.alpha[None].to(sr.device, sr.dtype, non_blocking=True)
        alpha = resize(alpha, tuple(sr.shape[-2:]))[0].clamp(0, 1)
        # save_png writes 1, 3 or 4 channels: grey + alpha goes out as RGBA with equal channels.
        sr = torch.cat([sr.expand(3, -1, -1), alpha])
    return sr


def _download(sr: Tensor) -> tuple[Tensor, torch.cuda.Event | None]:
    """An asynchronous copy of ``sr`` to (pinned) host memory, and the event marking its end."""
    if sr.device.type != "cuda":
        return sr, None
    host = torch.empty(sr.shape, dtype=sr.dtype, pin_memory=True)
    host.copy_(sr, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _write(host: Tensor, event: torch.cuda.Event | None, dst: Path, bits: int,
           overwrite: bool) -> None:
    if event is not None:
        event.synchronize()
    save_png(host, dst, bits=bits, overwrite=overwrite)


def super_resolve_files(pipe: TSDSRPipeline, jobs: Sequence[tuple[Path, Path]],
                        options: SROptions = DEFAULT_OPTIONS, *, workers: int = 2,
                        progress: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                        overwrite: bool = True, compare_dir: Path | None = None
                        ) -> dict[str, str]:
    """Super-resolve each ``(src, dst)`` (RGB/RGBA/grey, 8/16 bit) and write ``dst`` as a PNG
    at the input's bit depth, atomically; returns ``{src: reason}`` for the files that failed
    (inputs above ``max_pixels`` among them: see :func:`~scoredistill.sr.imageio.load_image`).
    ``overwrite=False``: a ``dst`` that exists when its image is done is kept, and reported.
    ``compare_dir``: also write ``compare_dir / dst.name``, bicubic | SR with a zoomed centre
    (:func:`~scoredistill.sr.compare.side_by_side`), 8 bit.

    Images are gathered, in order, until they make ``pipe.batch_size`` transformer tiles (a
    large image alone makes many), and super-resolved together; a batch that runs out of
    memory is retried one image at a time. The pipe's timer gets "read wait" / "write wait":
    the seconds the loop waited for files (not the reading and writing done meanwhile).
    """
    failed = _Failures()
    pin = pipe.device.type == "cuda"
    bar = tqdm(total=len(jobs), desc="super-resolving", unit="img", disable=not progress)
    with ThreadPoolExecutor(max(workers, 1), thread_name_prefix="sr-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="sr-write") as writer:
        writes: list[tuple[Path, Future]] = []
        ahead = 2 * pipe.batch_size + workers
        for batch in _batches(pipe, _prefetch(reader, jobs, pin, ahead, pipe, failed, bar,
                                              max_pixels, options)):
            for item, sr in _run(pipe, batch, options, failed):
                outputs = [(item.dst, item.image.bits, lambda: _output(sr, item.image))]  # noqa: B023
                if compare_dir is not None:
                    outputs.append((compare_dir / item.dst.name, 8,
                                    lambda: side_by_side(item.image.rgb, sr)))  # noqa: B023
                for dst, bits, make in outputs:
                    try:
                        host, event = _download(make())
                    except Exception as exc:
                        failed.add(item.src, exc)
                        break
                    writes.append((item.src, writer.submit(_write, host, event, dst, bits,
                                                           overwrite)))
            bar.update(len(batch))
        start = time.perf_counter()
        for src, future in writes:
            try:
                future.result()
            except Exception as exc:
                failed.add(src, exc)
        pipe.timer.add("write wait", time.perf_counter() - start)
    bar.close()
    return dict(failed)


def _prefetch(reader: ThreadPoolExecutor, jobs: Sequence[tuple[Path, Path]], pin: bool,
              ahead: int, pipe: TSDSRPipeline, failed: _Failures, bar: tqdm,
              max_pixels: int | None, options: SROptions) -> Iterator[tuple[_Loaded, int]]:
    """The readable, large-enough inputs in order with their transformer tile counts, ``ahead``
    files read in advance."""
    pending: deque[tuple[Path, Future]] = deque()
    queue = iter(jobs)
    while True:
        while len(pending) < ahead and (job := next(queue, None)) is not None:
            pending.append((job[0], reader.submit(_read, *job, pin, max_pixels)))
        if not pending:
            return
        src, future = pending.popleft()
        start = time.perf_counter()
        try:
            item = future.result()
            pipe.check(item.image.rgb)
            tiles = pipe.latent_tiles(*item.image.rgb.shape[-2:], options)
        except Exception as exc:
            failed.add(src, exc)
            bar.update(1)
            continue
        finally:
            pipe.timer.add("read wait", time.perf_counter() - start)
        yield item, tiles


def _batches(pipe: TSDSRPipeline, items: Iterator[tuple[_Loaded, int]]
             ) -> Iterator[list[_Loaded]]:
    """Consecutive items making up to ``pipe.batch_size`` transformer tiles (at least one)."""
    batch: list[_Loaded] = []
    tiles = 0
    for item, n in items:
        if batch and tiles + n > pipe.batch_size:
            yield batch
            batch, tiles = [], 0
        batch.append(item)
        tiles += n
    if batch:
        yield batch


def _run(pipe: TSDSRPipeline, batch: list[_Loaded], options: SROptions,
         failed: _Failures) -> list[tuple[_Loaded, Tensor]]:
    """The batch's outputs; if it fails (e.g. out of memory), each image alone; failures
    recorded."""
    try:
        return list(zip(batch, pipe.run([item.image.rgb for item in batch], options), strict=True))
    except Exception as exc:
        if pipe.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(batch) > 1:  # e.g. out of memory: alone, each image may fit
            return [pair for item in batch for pair in _run(pipe, [item], options, failed)]
        failed.add(batch[0].src, exc)
        return []
