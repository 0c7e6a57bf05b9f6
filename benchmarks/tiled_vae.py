"""Tiled SD3 VAE: time, peak memory and error against the untiled VAE, encoder and decoder.

Variants, one photo per size (scikit-image's astronaut, resized): the untiled VAE; tiles with
their own GroupNorm statistics blended with Gaussian weights (this project's previous tiling, as
per-tile schemes such as diffusers' ``enable_tiling`` normalise); and tiles with the whole
image's statistics (``scoredistill/sr/tiling.py``, the release's design), with the waiting tiles
on the CPU (``offload``, the default) or kept on the device. Both tiled forms run the same
windows: cores of ``--encoder-tile`` / ``--decoder-tile`` with their margin of context. The
decoder decodes the untiled latent. Errors: max and mean |diff| of the latent (encoder) and of
the image in [-1, 1] (decoder) against untiled.

    python -m benchmarks.tiled_vae --quick                     # CPU, tiny VAE, seconds
    python -m benchmarks.tiled_vae --warmup 1 --repeats 2      # GPU: SD3-medium VAE, 2048, 4096
    python -m benchmarks.tiled_vae --device cpu --config sd3-medium --sizes 512 \
        --encoder-tile 256 64 --decoder-tile 16 8 --warmup 0 --repeats 1   # CPU, ~15 min
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmarks import options
from benchmarks.report import command_line, write_report
from benchmarks.timing import time_ms
from examples.tsdsr.models.tiny import random_backbone
from scoredistill.sr.latents import decode, encode
from scoredistill.sr.loading import DTYPES
from scoredistill.sr.tiling import TileConfig, tiled_apply, tiled_decode, tiled_encode, vae_factor

PROG = "benchmarks.tiled_vae"
COLUMNS = ["stage", "variant", "size", "ms", "peak GiB", "max abs diff", "mean abs diff", "note"]


def photo(size: int, device: str, dtype: torch.dtype) -> Tensor:
    """scikit-image's astronaut (1, 3, size, size) in [-1, 1], bicubic-resized."""
    import skimage.data

    image = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=(size, size), mode="bicubic", antialias=True)
    return (image.clamp(0, 1) * 2 - 1).to(device, dtype)


def variants(vae: Any, tiles: TileConfig) -> dict[str, dict[str, Callable[[Tensor], Tensor]]]:
    """Per stage, the functions compared: untiled first (the reference)."""
    factor = vae_factor(vae)
    enc, enc_margin = tiles.encoder, tiles.encoder_overlap
    dec, dec_margin = tiles.decoder, tiles.decoder_overlap

    def mode(x: Tensor) -> Tensor:
        return encode(vae, x, posterior="mode")

    return {
        "encode": {
            "untiled": mode,
            "per-tile statistics, blended": lambda x: tiled_apply(
                mode, x, tile=enc + 2 * enc_margin, overlap=2 * enc_margin, align=factor),
            "whole-image statistics, offload": lambda x: tiled_encode(
                vae, x, tile=enc, overlap=enc_margin, offload=True),
            "whole-image statistics, on device": lambda x: tiled_encode(
                vae, x, tile=enc, overlap=enc_margin, offload=False),
        },
        "decode": {
            "untiled": lambda z: decode(vae, z),
            "per-tile statistics, blended": lambda z: tiled_apply(
                lambda t: decode(vae, t), z, tile=dec + 2 * dec_margin, overlap=2 * dec_margin),
            "whole-image statistics, offload": lambda z: tiled_decode(
                vae, z, tile=dec, overlap=dec_margin, offload=True),
            "whole-image statistics, on device": lambda z: tiled_decode(
                vae, z, tile=dec, overlap=dec_margin, offload=False),
        },
    }


def measure(fn: Callable[[Tensor], Tensor], x: Tensor, reference: Tensor | None,
            args: argparse.Namespace) -> tuple[dict[str, Any], Tensor | None]:
    """Time ``fn(x)``, its peak memory (CUDA) and error against ``reference``; OOM -> a note."""
    cuda = x.is_cuda
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            out = fn(x).float()
            ms = time_ms(fn, x, args.warmup, args.repeats)
    except torch.OutOfMemoryError:
        return {"note": "out of memory"}, None
    row: dict[str, Any] = {"ms": ms,
                           "peak GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else "n/a"}
    if reference is not None:
        diff = (out - reference).abs()
        row.update({"max abs diff": diff.max().item(), "mean abs diff": diff.mean().item()})
    return row, out


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = options.parser(PROG, __doc__)
    options.add_device(parser, "cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default bf16 on CUDA, fp32 on the CPU")
    parser.add_argument("--config", choices=("tiny", "sd3-medium"), default=None,
                        help="default: sd3-medium on CUDA, tiny on the CPU")
    parser.add_argument("--sizes", type=options.multiple_of(8, "the VAE's factor"), nargs="+",
                        default=None, help="image sides (px)")
    parser.add_argument("--encoder-tile", type=options.multiple_of(8, "the VAE's factor"),
                        nargs=2, default=None, metavar=("SIDE", "MARGIN"),
                        help="image px (default: infer.py's)")
    parser.add_argument("--decoder-tile", type=options.COUNT, nargs=2, default=None,
                        metavar=("SIDE", "MARGIN"), help="latent px (default: infer.py's)")
    options.add_timing(parser, warmup=1, repeats=3)
    options.add_quick(parser, "CPU smoke run: the tiny VAE, 128 px, tiles of 32 / 8 (+ 8 / 2), "
                              "no warm-up, 1 timed call")
    args = options.parse(parser, argv)
    options.refuse_with_quick(args, {"warmup": "--warmup", "repeats": "--repeats"},
                              "no warm-up and 1 timed call")
    args.out = options.out_dir(args)
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    out_dir = args.out
    cuda = args.device.startswith("cuda")
    config = args.config or ("sd3-medium" if cuda and not args.quick else "tiny")
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    tiles = TileConfig(encoder=32, encoder_overlap=8, decoder=8, decoder_overlap=2) \
        if args.quick else TileConfig()
    if args.encoder_tile:
        tiles = dataclasses.replace(tiles, encoder=args.encoder_tile[0],
                                    encoder_overlap=args.encoder_tile[1])
    if args.decoder_tile:
        tiles = dataclasses.replace(tiles, decoder=args.decoder_tile[0],
                                    decoder_overlap=args.decoder_tile[1])
    sizes = args.sizes or ([128] if args.quick else [2048, 4096] if cuda else [256])
    if args.quick:
        args.warmup, args.repeats = 0, 1  # refuse_with_quick: neither was given
        torch.set_num_threads(1)
    vae = random_backbone(config, dtype=dtype, device=args.device).vae
    rows: list[dict[str, Any]] = []

    def report(final: bool) -> Path:
        notes = (f"`{config}` VAE with RANDOM {dtype} weights, batch 1; {args.warmup} warm-up + "
                 f"{args.repeats} timed calls, median. Tiles (core, margin): encoder "
                 f"{tiles.encoder} + {tiles.encoder_overlap} image px, decoder {tiles.decoder} + "
                 f"{tiles.decoder_overlap} latent px; the blended variant runs the same windows "
                 "overlapping by twice the margin. Errors of a random VAE show the method's "
                 "effect, not the size of the trained SD3 VAE's.")
        if not final:
            notes += "\n\nPartial: the run stopped before all variants were timed."
        return write_report("tiled_vae", "Tiled SD3 VAE against untiled", rows,
                            meta={"config": config, "dtype": str(dtype), "complete": final},
                            notes=notes, columns=COLUMNS, out_dir=out_dir,
                            command=command_line("benchmarks.tiled_vae", argv), echo=final)

    for size in sizes:
        x = photo(size, args.device, dtype)
        stages = variants(vae, tiles)
        inputs = {"encode": x}
        for stage, fns in stages.items():
            reference = None
            for name, fn in fns.items():
                row, out = measure(fn, inputs[stage], reference, args)
                if row.get("max abs diff") == 0:  # a window as large as the input: not tiled
                    row["note"] = "not tiled: one window covers the input"
                rows.append({"stage": stage, "variant": name, "size": size, **row})
                if name == "untiled":
                    reference = out
                del out
            report(final=False)
            if stage == "encode":
                if reference is None:
                    break  # the untiled encoder ran out of memory: no latent to decode
                inputs["decode"] = reference
    path = report(final=True)
    for stage in ("encode", "decode"):  # the checks: tiles ran, and offloading changes nothing
        by = {r["variant"]: r for r in rows if r["stage"] == stage and "mean abs diff" in r}
        if len(by) == 3:
            offload, device = (by[f"whole-image statistics, {w}"]["max abs diff"]
                               for w in ("offload", "on device"))
            assert offload == device, (stage, offload, device)
            assert all(0 < r["max abs diff"] < float("inf") for r in by.values()), stage
    return path


if __name__ == "__main__":
    raise SystemExit(options.entry(main, PROG)())
