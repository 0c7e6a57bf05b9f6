"""One-step TSD-SR super-resolution (Dong et al., CVPR 2025) of an image file or a folder.

    python -m examples.tsdsr.infer INPUT --out DIR                     # tiny embedded model
    python -m examples.tsdsr.infer INPUT --out DIR --pretrained SD3_DIR --tsdsr-release REL_DIR
    python -m examples.tsdsr.infer INPUT --out DIR --pretrained SD3_DIR --lora CKPT --embeds DIR

The LQ image is bicubic-upsampled by --upscale (its short side raised to --process-size first,
then the result resized back), padded to a multiple of VAE factor x patch size (16 for SD3),
encoded, moved by one transformer call at t = 1000, decoded and colour-aligned to the upsampled
LQ. Output: ``<out>/<stem>.png`` (16 bit for 16-bit inputs, else 8 bit; alpha re-attached, grey
stays grey). Unreadable or too-small inputs are reported and skipped; the exit status is then 1.
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
from scoredistill.sr.colorfix import COLOR_FIXES
from scoredistill.sr.imageio import list_images
from scoredistill.sr.loading import DTYPES, load_model
from scoredistill.sr.tiling import TileConfig
from scoredistill.sr.upscale import plan_outputs, upscale_file


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; the exit status is 1 if any input failed, 2 on usage errors."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="an image file or a folder of images")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    parser.add_argument("--upscale", type=float, default=4.0)
    parser.add_argument("--process-size", type=int, default=512)
    parser.add_argument("--tile", action=argparse.BooleanOptionalAction, default=True,
                        help="tile stages whose input exceeds the tile (default on)")
    parser.add_argument("--latent-tile", type=int, nargs=2, default=(64, 8),
                        metavar=("SIDE", "OVERLAP"), help="transformer tile, latent px")
    parser.add_argument("--encoder-tile", type=int, nargs=2, default=(1024, 64),
                        metavar=("SIDE", "OVERLAP"), help="VAE encoder tile, image px")
    parser.add_argument("--decoder-tile", type=int, nargs=2, default=(224, 16),
                        metavar=("SIDE", "OVERLAP"), help="VAE decoder tile, latent px")
    parser.add_argument("--color-fix", choices=list(COLOR_FIXES), default="wavelet")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="default fp16 on CUDA (as the release), fp32 on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pretrained", help="local SD3 diffusers folder (default: tiny model)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--lora", type=Path, help="our checkpoint folder (save_lora files)")
    group.add_argument("--tsdsr-release", type=Path, help="the authors' weights folder")
    parser.add_argument("--embeds", type=Path, help="folder with prompt_embeds.pt, pool_embeds.pt")
    parser.add_argument("--no-fuse-qkv", dest="fuse_qkv", action="store_false")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.input.is_dir():
        inputs, in_dir = list_images(args.input), args.input
    elif args.input.is_file():
        inputs, in_dir = [args.input], args.input.parent
    else:
        parser.error(f"{args.input} does not exist")
    if args.out.resolve() == in_dir.resolve():
        parser.error(f"--out {args.out} is the input folder; refusing to write next to inputs")
    dtype = DTYPES[args.dtype or ("fp16" if args.device.startswith("cuda") else "fp32")]
    model = load_model(load_backbone(args.pretrained, dtype, args.device), lora=args.lora,
                       release=args.tsdsr_release, embeds=args.embeds, dtype=dtype,
                       device=args.device, fuse_qkv=args.fuse_qkv)
    tiles = TileConfig(*args.latent_tile, *args.encoder_tile, *args.decoder_tile)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs, failed = plan_outputs(inputs, args.out)
    seconds = []
    for src, dst in tqdm(jobs, desc="super-resolving", unit="img", disable=args.no_progress):
        start = time.perf_counter()
        try:
            upscale_file(model, src, dst, upscale=args.upscale, process_size=args.process_size,
                         tiles=tiles if args.tile else None, color=args.color_fix)
        except (ValueError, OSError, torch.OutOfMemoryError) as exc:
            failed[str(src)] = f"{type(exc).__name__}: {exc}"
            continue
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    if seconds:
        print(f"{len(seconds)} image(s) written to {args.out}; median "
              f"{sorted(seconds)[len(seconds) // 2]:.3f} s per image including file I/O")
    for name, reason in failed.items():
        print(f"FAILED {name}: {reason}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
