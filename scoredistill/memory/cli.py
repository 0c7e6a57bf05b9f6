"""``scoredistill-plan``: the peak memory, FLOPs and compute floor of a TSD-SR train step or an
SR run at real backbone sizes, traced on fake tensors (no GPU, no weights, no memory).

    scoredistill-plan train --model sd3-medium --size 512 --batch 1
    scoredistill-plan train --model path/to/sd3-folder --checkpointing
    scoredistill-plan train --model sd3-medium --design release   # the release's two copies
    scoredistill-plan train --model sd3-medium --fit 24GB  # the cheapest setup that fits a card
    scoredistill-plan sr --model sd3-medium --input 1024x1024 --upscale 4
    scoredistill-plan precompute --model sd3-medium --latents --image 1024
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from scoredistill.cli import ArgumentParser, UserError, add_version, entry_point, number
from scoredistill.optim import OPTIMIZERS

from .backbones import SPECS, BackboneSpec, read_spec
from .fit import HEADROOM, fit_command, memory_size
from .precompute import PrecomputeRun, plan_precompute
from .report import render
from .steps import SRRun, TrainOptions, check_sr, plan_sr, plan_train
from .trace import GIB, Plan

PROG = "scoredistill-plan"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    """The subcommands and their flags."""
    parser = ArgumentParser(prog=PROG, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version(parser)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="one TSD-SR training iteration (Alg. 1)")
    sr = commands.add_parser("sr", help="the SR pipeline on a batch of images")
    pre = commands.add_parser("precompute", help="the recipe's precompute: SD3's text encoders "
                              "(and --latents: the VAE encoder)")
    for sub in (train, sr, pre):
        sub.add_argument("--model", default="sd3-medium",
                         help=f"a built-in config ({', '.join(SPECS)}), or a local diffusers "
                              "folder (transformer/ or unet/, and vae/) or a denoiser "
                              "config.json")
        sub.add_argument("--dtype", choices=DTYPES, default="bf16", help="the weights' dtype")
    train.add_argument("--size", type=number(int, 16), default=512, help="crop side, px")
    train.add_argument("--batch", type=number(int, 1), default=1)
    for role in ("student", "fake", "vae"):
        train.add_argument(f"--{role}-rank", type=number(int, 1), default=64)
    train.add_argument("--checkpointing", action="store_true",
                       help="gradient checkpointing in the transformer and the VAE")
    train.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                       help="both roles' AdamW; adamw8bit: bitsandbytes' 8-bit moments")
    train.add_argument("--offload-vae-activations", action="store_true",
                       help="the VAE's saved activations in host memory until the backward "
                            "(the recipe's flag: torch's save_on_cpu)")
    train.add_argument("--fit", type=memory_size, metavar="SIZE",
                       help="search checkpointing, batch and optimizer (and, where nothing fits "
                            "without them, the VAE offload, then LoRA ranks halved down to 8) "
                            "for the fewest FLOPs per sample that fit a card of SIZE (24GB, "
                            "24GiB, 16g; GB read as GiB) less --headroom, and print the "
                            "recipe's command line")
    train.add_argument("--headroom", type=number(float, 0), default=HEADROOM / GIB,
                       help="GiB left free on the card for what the plan does not count")
    train.add_argument("--no-dasm", action="store_true", help="TSD at one point, not DASM")
    train.add_argument("--no-lpips", action="store_true", help="without the LPIPS loss")
    train.add_argument("--design", choices=("ours", "release"), default="ours",
                       help="ours: one shared backbone; release: TSD-SR's two transformer "
                            "copies (benchmarks/train_step_paths.py's release path)")
    pre.add_argument("--batch", type=number(int, 1), default=8, help="captions per call")
    pre.add_argument("--latents", action="store_true", help="also the HQ latents' VAE encoder")
    pre.add_argument("--image", type=number(int, 8), default=512,
                     help="HQ image side for --latents, px")
    sr.add_argument("--input", type=size, default=(256, 256), metavar="HxW",
                    help="input image size, px")
    sr.add_argument("--upscale", type=number(float, 0, low_open=True), default=4.0)
    sr.add_argument("--images", type=number(int, 1), default=1, help="images per call")
    sr.add_argument("--batch", type=number(int, 1), default=8,
                    help="transformer tiles per call")
    sr.add_argument("--no-tiles", action="store_true", help="every stage on the whole image")
    sr.add_argument("--channels-last", action="store_true", help="the VAE in channels-last")
    return parser


def size(text: str) -> tuple[int, int]:
    """An argparse ``type``: ``HxW`` in pixels."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or min(int(match[1]), int(match[2])) < 8:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH in px (each >= 8), e.g. "
                                         f"512x768, got {text!r}")
    return int(match[1]), int(match[2])


DESIGNS = {"ours": "shared backbone", "release": "the release's two copies"}


def _release(spec: BackboneSpec, opts: TrainOptions) -> Plan:
    from .release import plan_release

    try:
        return _source(plan_release, spec, opts)
    except ValueError as exc:  # a setting the release's step does not run
        raise UserError(f"--design release: {exc}") from None


def _source(plan: Callable[..., Plan], *args: Any) -> Plan:
    """``plan(*args)``, which traces code of the source checkout; UserError without one."""
    try:
        return plan(*args)
    except ImportError as exc:
        raise UserError(str(exc)) from None


def spec_of(model: str) -> BackboneSpec:
    """A built-in config by name, else a local folder or config.json (UserError if neither)."""
    if model in SPECS:
        return SPECS[model]
    try:
        return read_spec(model)
    except ValueError as exc:
        raise UserError(f"--model {model}: not a built-in config ({', '.join(SPECS)}) and "
                        f"{exc}") from None


@entry_point(PROG)
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec, dtype = spec_of(args.model), DTYPES[args.dtype]
    from diffusers.utils import logging

    logging.set_verbosity_error()  # the "keep modules in float32" notice for built configs
    if args.command == "train":
        opts = TrainOptions(size=args.size, batch=args.batch, dtype=dtype,
                            student_rank=args.student_rank, fake_rank=args.fake_rank,
                            vae_rank=args.vae_rank, dasm=not args.no_dasm,
                            lpips=not args.no_lpips, checkpointing=args.checkpointing,
                            optimizer=args.optimizer,
                            offload_vae_activations=args.offload_vae_activations)
        if args.fit is not None:
            if args.design != "ours":
                raise UserError(f"--fit searches the shared backbone's settings, not --design "
                                f"{args.design}'s: drop one of the two")
            return fit_command(args, spec, opts)
        plan = (plan_train if args.design == "ours" else _release)(spec, opts)
        title = (f"Train step ({DESIGNS[args.design]}), {args.model}, {args.dtype} weights, "
                 f"fp32 LoRA (ranks "
                 f"{opts.student_rank}/{opts.fake_rank}/{opts.vae_rank}), {opts.size} px, "
                 f"batch {opts.batch}, DASM {'on' if opts.dasm else 'off'}, LPIPS "
                 f"{'on' if opts.lpips else 'off'}, checkpointing "
                 f"{'on' if opts.checkpointing else 'off'}; {opts.optimizer} for both roles"
                 + ("; the VAE's activations offloaded" if opts.offload_vae_activations else ""))
    elif args.command == "precompute":
        run = PrecomputeRun(batch=args.batch, dtype=dtype, latents=args.latents,
                            image=args.image)
        plan = _source(plan_precompute, spec, run)
        title = (f"Precompute, SD3's text encoders, {args.dtype}, {args.batch} captions per call"
                 + (f", {args.model}'s VAE on {args.image} px images" if args.latents else ""))
    else:
        sr_opts = SRRun(height=args.input[0], width=args.input[1], upscale=args.upscale,
                            images=args.images, batch=args.batch, tiles=not args.no_tiles,
                            dtype=dtype, channels_last=args.channels_last)
        try:
            check_sr(spec)
        except ValueError as exc:
            raise UserError(f"--model {args.model}: {exc}") from None
        plan = plan_sr(spec, sr_opts)
        title = (f"SR, {args.model}, {args.dtype}, {args.images} x {args.input[0]}x"
                 f"{args.input[1]} px, upscale {args.upscale:g}, transformer batch "
                 f"{args.batch}, tiles {'off' if args.no_tiles else 'default'}")
    print(render(title + " (traced on fake tensors with CPU kernels)", plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
