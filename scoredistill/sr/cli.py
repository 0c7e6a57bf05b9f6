"""``scoredistill-sr IN -o OUT``: one-step TSD-SR super-resolution of an image file or a folder.

    scoredistill-sr LQ_DIR -o SR_DIR --pretrained SD3_DIR --tsdsr-release REL_DIR
    scoredistill-sr LQ_DIR -o SR_DIR --pretrained SD3_DIR --lora CKPT --embeds DIR
    scoredistill-sr LQ_DIR -o SR_DIR ... --compile --dtype bf16 --batch-size 8  # fast GPU run
    torchrun --nproc-per-node 8 -m scoredistill.sr.cli LQ_DIR -o SR_DIR ...  # or accelerate launch

Output: ``<out>/<stem>.png`` (16 bit for 16-bit inputs, else 8 bit; alpha re-attached, grey
stays grey), written atomically. Launched as several processes (RANK / WORLD_SIZE set by
torchrun or accelerate launch), each process takes every WORLD_SIZE-th file of the sorted list
on its own GPU (LOCAL_RANK). Unreadable or too-small inputs are reported and skipped; the exit
status is then 1. Usage errors (a value out of range, a missing path, --device cuda without a
GPU, an unwritable --out) are one line and exit status 2, before the model loads (the policy of
:mod:`scoredistill.cli`); inputs are read upright and refused above --max-pixels.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from scoredistill.cli import (
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    ArgumentParser,
    UserError,
    existing_dir,
    existing_path,
    number,
    report,
    writable_dir,
)
from scoredistill.cli import device as device_type
from scoredistill.sr.colorfix import COLOR_FIXES
from scoredistill.sr.files import plan_outputs, super_resolve_files
from scoredistill.sr.imageio import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, list_images
from scoredistill.sr.loading import DTYPES, Backbone, check_sd3_folder
from scoredistill.sr.pipeline import MIN_SIDE, SROptions, TSDSRPipeline
from scoredistill.sr.tiling import TileConfig
from scoredistill.sr.timing import StageTimer

DefaultBackbone = Callable[[torch.dtype, str], Backbone]
"""Builds the backbone used when no --pretrained folder is given (the recipe's tiny model)."""


def build_parser(description: str, *, pretrained_required: bool,
                 prog: str = "scoredistill-sr") -> argparse.ArgumentParser:
    """The CLI's arguments (shared by ``scoredistill-sr`` and the recipe's infer.py)."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("input", type=existing_path, help="an image file or a folder of images")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    parser.add_argument("--upscale", type=number(float, low=0, low_open=True), default=4.0)
    parser.add_argument("--process-size", type=number(int, low=MIN_SIDE), default=512,
                        help="short side the model works at (smaller outputs are resized)")
    parser.add_argument("--color-fix", choices=list(COLOR_FIXES), default="wavelet")
    parser.add_argument("--max-pixels", type=number(int, low=1), default=DEFAULT_MAX_PIXELS,
                        help="refuse inputs of more pixels (decompression bombs); default "
                             f"{DEFAULT_MAX_PIXELS:,}")
    speed = parser.add_argument_group("speed and memory")
    speed.add_argument("--batch-size", type=number(int, low=1), default=8,
                       help="transformer tiles per call, from one image or several (default 8)")
    speed.add_argument("--vae-batch-size", type=number(int, low=1), default=None,
                       help="VAE images or tiles per call (default: --batch-size)")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the transformer and VAE (static shapes; the first "
                            "image of each size compiles, then runs fast; a tiled VAE compiles "
                            "its norms once, for every size)")
    speed.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                       help="with --compile: capture the transformer in CUDA graphs (default: "
                            "on for --batch-size <= 2 on CUDA)")
    speed.add_argument("--channels-last", action="store_true",
                       help="channels-last memory order for the VAE convolutions")
    speed.add_argument("--fp8", action="store_true",
                       help="FP8 transformer linears (torchao; GPUs of compute capability 8.9+)")
    speed.add_argument("--tile", action=argparse.BooleanOptionalAction, default=True,
                       help="tile stages whose input exceeds the tile (default on)")
    speed.add_argument("--latent-tile", type=number(int, low=0), nargs=2, default=(64, 8),
                       metavar=("SIDE", "OVERLAP"), help="transformer tile, latent px")
    speed.add_argument("--encoder-tile", type=number(int, low=0), nargs=2, default=(1024, 64),
                       metavar=("SIDE", "OVERLAP"), help="VAE encoder tile, image px")
    speed.add_argument("--decoder-tile", type=number(int, low=0), nargs=2, default=(224, 16),
                       metavar=("SIDE", "OVERLAP"), help="VAE decoder tile, latent px")
    speed.add_argument("--workers", type=number(int, low=1), default=2, help="file reader threads")
    speed.add_argument("--profile", action="store_true",
                       help="print the seconds spent per stage (encode, transformer, decode, I/O)")
    model = parser.add_argument_group("model")
    model.add_argument("--dtype", choices=list(DTYPES), default=None,
                       help="default fp16 on CUDA (as the release), fp32 on CPU")
    model.add_argument("--device", type=device_type, default=None,
                       help="default cuda (cuda:LOCAL_RANK when launched as several processes) "
                            "if available, else cpu")
    model.add_argument("--pretrained", type=existing_dir, required=pretrained_required,
                       help="local SD3 diffusers folder"
                            + ("" if pretrained_required else " (default: tiny model)"))
    group = model.add_mutually_exclusive_group()
    group.add_argument("--lora", type=existing_dir, help="our checkpoint folder (save_lora files)")
    group.add_argument("--tsdsr-release", type=existing_dir, help="the authors' weights folder")
    model.add_argument("--embeds", type=existing_dir,
                       help="folder with prompt_embeds.pt, pool_embeds.pt (or prompts.safetensors)")
    model.add_argument("--no-fuse-qkv", dest="fuse_qkv", action="store_false")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def process_share() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` of this process as torchrun / accelerate set them."""
    env = os.environ
    return (int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
            int(env.get("LOCAL_RANK", 0)))


def _tiles(args: argparse.Namespace) -> TileConfig | None:
    (latent, lo), (enc, eo), (dec, do) = args.latent_tile, args.encoder_tile, args.decoder_tile
    if latent % 2 or not 0 <= lo < latent:
        raise UserError(f"--latent-tile {latent} {lo}: the side must be even (SD3's 2x2 "
                        "patches) and the overlap in [0, side)")
    for flag, side, margin in (("--encoder-tile", enc, eo), ("--decoder-tile", dec, do)):
        if side < 1 or margin < 0:
            raise UserError(f"{flag} {side} {margin}: need a side >= 1 and a margin >= 0")
    return TileConfig(latent, lo, enc, eo, dec, do) if args.tile else None


def main(argv: Sequence[str] | None = None, *, default_backbone: DefaultBackbone | None = None,
         description: str | None = None, prog: str = "scoredistill-sr") -> int:
    """Run the CLI; the exit status is 1 if any input failed, 2 on usage errors (one line)."""
    try:
        return _run(argv, default_backbone, description or __doc__.split("\n\n")[0], prog)
    except UserError as exc:
        return report(prog, exc)


def _run(argv: Sequence[str] | None, default_backbone: DefaultBackbone | None,
         description: str, prog: str) -> int:
    parser = build_parser(description, pretrained_required=default_backbone is None, prog=prog)
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
    rank, world, local_rank = process_share()
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("fp16" if device.startswith("cuda") else "fp32")]
    timer = StageTimer(enabled=args.profile)
    try:  # a folder without the files it should hold: one line naming it
        if args.pretrained is not None:
            check_sd3_folder(args.pretrained)
        backbone = (args.pretrained if args.pretrained is not None
                    else default_backbone(dtype, device))  # type: ignore[misc]
        pipe = TSDSRPipeline.from_pretrained(
            backbone, lora=args.lora, release=args.tsdsr_release, embeds=args.embeds,
            dtype=dtype, device=device, fuse_qkv=args.fuse_qkv, tiles=tiles,
            batch_size=args.batch_size, vae_batch_size=args.vae_batch_size,
            compile=args.compile, cuda_graphs=args.cuda_graphs,
            channels_last=args.channels_last, fp8=args.fp8, timer=timer)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(" ".join(str(exc).split())) from None
    jobs, failed = plan_outputs(inputs, args.out)
    jobs = jobs[rank::world]  # every process plans the same list: each file goes to one
    if rank != 0:
        failed = {}  # planning failures are reported once
    start = time.perf_counter()
    failed |= super_resolve_files(
        pipe, jobs, SROptions(args.upscale, args.process_size, args.color_fix),
        workers=args.workers, progress=not args.no_progress and rank == 0,
        max_pixels=args.max_pixels)
    seconds = time.perf_counter() - start
    done = len(jobs) - sum(1 for src, _ in jobs if str(src) in failed)
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    if done:
        print(f"{prefix}{done} image(s) written to {args.out} in {seconds:.2f} s "
              f"({done / seconds:.2f} images/s, file I/O included)")
    if args.profile:
        for stage, s in timer.totals().items():
            print(f"{prefix}  {stage:<22} {s:8.3f} s")
    for name, reason in failed.items():
        print(f"{prefix}FAILED {name}: {reason}", file=sys.stderr)
    return EXIT_ITEMS_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
