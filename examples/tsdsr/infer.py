"""One-step TSD-SR super-resolution (Dong et al., CVPR 2025) of an image file or a folder.

    python -m examples.tsdsr.infer INPUT --out DIR                     # tiny embedded model
    python -m examples.tsdsr.infer INPUT --out DIR --pretrained SD3_DIR --tsdsr-release REL_DIR
    python -m examples.tsdsr.infer INPUT --out DIR --pretrained SD3_DIR --lora CKPT --embeds DIR

The LQ image is bicubic-upsampled by --upscale (its short side raised to --process-size first,
then the result resized back), padded to a multiple of VAE factor x patch size (16 for SD3),
encoded, moved by one transformer call at t = 1000, decoded and colour-aligned to the upsampled
LQ. Output: ``<out>/<stem>.png`` (16 bit for 16-bit inputs, else 8 bit; alpha re-attached, grey
stays grey). Inputs are read upright (EXIF orientation applied). Unreadable, too small or too
large inputs (--max-pixels) and images that run out of memory are reported and skipped; the exit
status is then 1. Usage errors (a bad value, a missing path, --device cuda without a GPU, an
unwritable --out) are one line and exit status 2, before the model loads.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from examples.tsdsr.tiny import load_backbone
from scoredistill.cli import (
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    ArgumentParser,
    UserError,
    entry_point,
    existing_dir,
    existing_path,
    number,
    out_of_memory,
    writable_dir,
)
from scoredistill.cli import device as device_type
from scoredistill.sr.colorfix import COLOR_FIXES
from scoredistill.sr.imageio import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, list_images
from scoredistill.sr.loading import DTYPES, check_sd3_folder, load_model
from scoredistill.sr.tiling import TileConfig
from scoredistill.sr.upscale import MIN_SIDE, plan_outputs, upscale_file


def _tiles(args: argparse.Namespace) -> TileConfig:
    (latent, lo), (enc, eo), (dec, do) = args.latent_tile, args.encoder_tile, args.decoder_tile
    if latent % 2 or not 0 <= lo < latent:
        raise UserError(f"--latent-tile {latent} {lo}: the side must be even (SD3's 2x2 "
                        "patches) and the overlap in [0, side)")
    for flag, side, margin in (("--encoder-tile", enc, eo), ("--decoder-tile", dec, do)):
        if side < 1 or margin < 0:
            raise UserError(f"{flag} {side} {margin}: need a side >= 1 and a margin >= 0")
    return TileConfig(latent, lo, enc, eo, dec, do)


@entry_point("infer")
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; the exit status is 1 if any input failed, 2 on usage errors."""
    parser = ArgumentParser(prog="infer", description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=existing_path, help="an image file or a folder of images")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    parser.add_argument("--upscale", type=number(float, low=0, low_open=True), default=4.0)
    parser.add_argument("--process-size", type=number(int, low=MIN_SIDE), default=512)
    parser.add_argument("--tile", action=argparse.BooleanOptionalAction, default=True,
                        help="tile stages whose input exceeds the tile (default on)")
    parser.add_argument("--latent-tile", type=number(int, low=0), nargs=2, default=(64, 8),
                        metavar=("SIDE", "OVERLAP"), help="transformer tile, latent px")
    parser.add_argument("--encoder-tile", type=number(int, low=0), nargs=2, default=(1024, 64),
                        metavar=("SIDE", "OVERLAP"), help="VAE encoder tile, image px")
    parser.add_argument("--decoder-tile", type=number(int, low=0), nargs=2, default=(224, 16),
                        metavar=("SIDE", "OVERLAP"), help="VAE decoder tile, latent px")
    parser.add_argument("--color-fix", choices=list(COLOR_FIXES), default="wavelet")
    parser.add_argument("--max-pixels", type=number(int, low=1), default=DEFAULT_MAX_PIXELS,
                        help="refuse inputs of more pixels (decompression bombs); default "
                             f"{DEFAULT_MAX_PIXELS:,}")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="default fp16 on CUDA (as the release), fp32 on CPU")
    parser.add_argument("--device", type=device_type,
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pretrained", type=existing_dir,
                        help="local SD3 diffusers folder (default: tiny model)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--lora", type=existing_dir, help="our checkpoint folder (save_lora files)")
    group.add_argument("--tsdsr-release", type=existing_dir, help="the authors' weights folder")
    parser.add_argument("--embeds", type=existing_dir,
                        help="folder with prompt_embeds.pt, pool_embeds.pt")
    parser.add_argument("--no-fuse-qkv", dest="fuse_qkv", action="store_false")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.input.is_dir():
        inputs, in_dir = list_images(args.input), args.input
        if not inputs:
            raise UserError(f"{args.input} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    else:
        inputs, in_dir = [args.input], args.input.parent
    if args.out.resolve() == in_dir.resolve():
        raise UserError(f"--out {args.out} is the input folder; refusing to write next to inputs")
    tiles = _tiles(args)
    writable_dir(args.out, "--out")
    dtype = DTYPES[args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")]
    try:
        if args.pretrained is not None:
            check_sd3_folder(args.pretrained)
        model = load_model(load_backbone(args.pretrained, dtype, args.device), lora=args.lora,
                           release=args.tsdsr_release, embeds=args.embeds, dtype=dtype,
                           device=args.device, fuse_qkv=args.fuse_qkv)
    except (FileNotFoundError, ValueError) as exc:  # a folder without the files it should hold
        raise UserError(str(exc)) from None
    jobs, failed = plan_outputs(inputs, args.out)
    seconds = []
    for src, dst in tqdm(jobs, desc="super-resolving", unit="img", disable=args.no_progress):
        start = time.perf_counter()
        try:
            upscale_file(model, src, dst, upscale=args.upscale, process_size=args.process_size,
                         tiles=tiles if args.tile else None, color=args.color_fix,
                         max_pixels=args.max_pixels)
        except Exception as exc:
            if not (isinstance(exc, ValueError | OSError) or out_of_memory(exc)):
                raise
            failed[str(src)] = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            if out_of_memory(exc):
                failed[str(src)] += (" (out of memory: try smaller --latent-tile/--decoder-tile"
                                     " or --upscale)")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            continue
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    if seconds:
        print(f"{len(seconds)} image(s) written to {args.out}; median "
              f"{sorted(seconds)[len(seconds) // 2]:.3f} s per image including file I/O")
    for name, reason in failed.items():
        print(f"FAILED {name}: {reason}", file=sys.stderr)
    return EXIT_ITEMS_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
