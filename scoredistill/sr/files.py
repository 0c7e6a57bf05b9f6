"""Super-resolve image files with :class:`~scoredistill.sr.pipeline.TSDSRPipeline`: files are
decoded ahead by reader threads (pinned memory on CUDA) and encoded and written atomically by a
writer thread while the accelerator works on the next batch; bad files are reported, not fatal.
"""

from __future__ import annotations

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
from scoredistill.sr.imageio import DEFAULT_MAX_PIXELS, LoadedImage, load_image, save_png
from scoredistill.sr.pipeline import DEFAULT_OPTIONS, SROptions, TSDSRPipeline, resize

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, PIL's "L" conversion
def _fails_one_file(exc: BaseException) -> bool:
    """Whether ``exc`` fails one file (unreadable, too small or too large, out of GPU or host
    memory) without stopping the others."""
    return isinstance(exc, ValueError | OSError) or out_of_memory(exc)


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    if out_of_memory(exc):
        text += " (out of memory: try a smaller --batch-size, --latent-tile or --decoder-tile)"
    return text


def plan_outputs(inputs: Sequence[Path], out_dir: Path) -> tuple[list[tuple[Path, Path]],
                                                                  dict[str, str]]:
    """``(src, dst)`` pairs, and failures for names that would overwrite an input or each other."""
    taken = {p.resolve() for p in inputs}
    jobs, failed, claimed = [], {}, set()
    for src in inputs:
        dst = out_dir / f"{src.stem}.png"
        if dst.resolve() in taken:
            failed[str(src)] = f"output {dst} would overwrite an input"
        elif dst in claimed:
            failed[str(src)] = f"output {dst} is already the output of another input"
        else:
            claimed.add(dst)
            jobs.append((src, dst))
    return jobs, failed


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


def _write(host: Tensor, event: torch.cuda.Event | None, dst: Path, bits: int) -> None:
    if event is not None:
        event.synchronize()
    save_png(host, dst, bits=bits)


def super_resolve_files(pipe: TSDSRPipeline, jobs: Sequence[tuple[Path, Path]],
                        options: SROptions = DEFAULT_OPTIONS, *, workers: int = 2,
                        progress: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS
                        ) -> dict[str, str]:
    """Super-resolve each ``(src, dst)`` (RGB/RGBA/grey, 8/16 bit) and write ``dst`` as a PNG
    at the input's bit depth, atomically; returns ``{src: reason}`` for the files that failed
    (inputs above ``max_pixels`` among them: see :func:`~scoredistill.sr.imageio.load_image`).

    Images are gathered, in order, until they make ``pipe.batch_size`` transformer tiles (a
    large image alone makes many), and super-resolved together; a batch that runs out of
    memory is retried one image at a time. The pipe's timer gets "read wait" / "write wait":
    the seconds the loop waited for files (not the reading and writing done meanwhile).
    """
    failed: dict[str, str] = {}
    pin = pipe.device.type == "cuda"
    bar = tqdm(total=len(jobs), desc="super-resolving", unit="img", disable=not progress)
    with ThreadPoolExecutor(max(workers, 1), thread_name_prefix="sr-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="sr-write") as writer:
        writes: list[tuple[Path, Future]] = []
        ahead = 2 * pipe.batch_size + workers
        for batch in _batches(pipe, _prefetch(reader, jobs, pin, ahead, pipe, failed, bar,
                                              max_pixels), options):
            for item, sr in _run(pipe, batch, options, failed):
                host, event = _download(_output(sr, item.image))
                writes.append((item.src, writer.submit(_write, host, event, item.dst,
                                                       item.image.bits)))
            bar.update(len(batch))
        start = time.perf_counter()
        for src, future in writes:
            try:
                future.result()
            except Exception as exc:
                if not _fails_one_file(exc):
                    raise
                failed[str(src)] = _reason(exc)
        pipe.timer.add("write wait", time.perf_counter() - start)
    bar.close()
    return failed


def _prefetch(reader: ThreadPoolExecutor, jobs: Sequence[tuple[Path, Path]], pin: bool,
              ahead: int, pipe: TSDSRPipeline, failed: dict[str, str], bar: tqdm,
              max_pixels: int | None) -> Iterator[_Loaded]:
    """The readable, large-enough inputs in order, ``ahead`` files read in advance."""
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
        except Exception as exc:
            if not _fails_one_file(exc):
                raise
            failed[str(src)] = _reason(exc)
            bar.update(1)
            continue
        finally:
            pipe.timer.add("read wait", time.perf_counter() - start)
        yield item


def _batches(pipe: TSDSRPipeline, items: Iterator[_Loaded], options: SROptions
             ) -> Iterator[list[_Loaded]]:
    """Consecutive items making up to ``pipe.batch_size`` transformer tiles (at least one)."""
    batch: list[_Loaded] = []
    tiles = 0
    for item in items:
        n = pipe.latent_tiles(*item.image.rgb.shape[-2:], options)
        if batch and tiles + n > pipe.batch_size:
            yield batch
            batch, tiles = [], 0
        batch.append(item)
        tiles += n
    if batch:
        yield batch


def _run(pipe: TSDSRPipeline, batch: list[_Loaded], options: SROptions,
         failed: dict[str, str]) -> list[tuple[_Loaded, Tensor]]:
    """The batch's outputs; if it fails (e.g. out of memory), each image alone; failures
    recorded."""
    try:
        return list(zip(batch, pipe([item.image.rgb for item in batch], options), strict=True))
    except Exception as exc:
        if not _fails_one_file(exc):
            raise
        if pipe.device.type == "cuda":
            torch.cuda.empty_cache()
        if len(batch) > 1:  # e.g. out of memory: alone, each image may fit
            return [pair for item in batch for pair in _run(pipe, [item], options, failed)]
        failed[str(batch[0].src)] = _reason(exc)
        return []
