"""``scoredistill-sr IN -o OUT``: one-step TSD-SR super-resolution of an image file or a folder.

    scoredistill-sr LQ_DIR -o SR_DIR --pretrained SD3_DIR --tsdsr-release REL_DIR
    scoredistill-sr LQ_DIR -o SR_DIR --pretrained SD3_DIR --lora CKPT --embeds DIR
    scoredistill-sr LQ_DIR -o SR_DIR --model MODEL_DIR  # a save_pretrained folder, alone
    scoredistill-sr LQ_DIR -o SR_DIR ... --compile --dtype bf16 --batch-size 8  # fast GPU run
    torchrun --nproc-per-node 8 -m scoredistill.sr.cli LQ_DIR -o SR_DIR ...  # or accelerate launch

    scoredistill-sr LQ_DIR -o SR_DIR ... --skip-existing  # resume: only the missing outputs

``--model`` loads a model folder (:meth:`TSDSRPipeline.save_pretrained`'s; ``make demo``
writes one) alone: its saved options (upscale, process size, colour fix, strength) are the
defaults, and ``--upscale``, ``--process-size``, ``--color-fix`` and ``--strength`` given on the
command line replace their own field. ``--strength S`` in [0, 1] trades realism for fidelity:
``z_hat = z_L - S * v``, 0 the input's own VAE reconstruction, 1 the model. ``--compare`` also
writes ``<out>/compare/<stem>.png``: the input's bicubic upsampling beside the output, with
their centres zoomed 2x below (guarded like the outputs).

Output: ``<out>/<stem>.png`` (16 bit for 16-bit inputs, else 8 bit; alpha re-attached, grey
stays grey), written to a hidden temp file and renamed, so an output name never holds a part
of a file (Ctrl-C included). A file already at an output name is never replaced unless
``--overwrite`` is given: by default the run does nothing, exits 2 and names the count, the
first such file and both flags, before the model loads; ``--skip-existing`` does only the
missing outputs (the way to resume a folder after Ctrl-C). Launched as several processes
(RANK / WORLD_SIZE set by torchrun or accelerate launch), each process takes every
WORLD_SIZE-th file of the sorted list on its own GPU (LOCAL_RANK) and checks the outputs of its
own share only, before it writes anything: a file written by another process of the same run
never counts as existing.

Unreadable or too-small inputs, an ``--upscale`` that makes an image less than 1 px, and any
other failure of one image are reported (``FAILED <file>: <type>: <reason>``; the first
internal error of each type with its traceback) and the others go on; the exit status is then
1. Inputs that share an output name (``photo.jpg``, ``photo.png``) are read at planning time:
an unusable one is reported and the usable one goes through (of two usable ones, the first by
name). User and environment errors (a value out of range, a missing path, --device cuda
without a GPU, --fp8 without an FP8 GPU or torchao, an unwritable --out, damaged --pretrained
weights, pickled or wrong-width --embeds, a LoRA file for another module) are one line naming
the flag and exit status 2, before or while the model loads (the policy of
:mod:`scoredistill.cli`); inputs are read upright and refused above --max-pixels. Ctrl-C stops
once the outputs in flight are written, with exit status 130: rerun with --skip-existing.

On a CUDA device, before anything loads, the memory planner's peak for the largest input (its
header) with these flags and the --model/--pretrained folder's config.json is checked against
the card's free memory (:mod:`scoredistill.sr.memory_check`): a run that will not fit is one
line naming the settings that would, exit status 2; ``--force`` runs it anyway.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
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
    DefaultsHelpFormatter,
    UserError,
    add_version,
    existing_dir,
    existing_path,
    number,
    report,
    writable_dir,
)
from scoredistill.cli import device as device_type
from scoredistill.sr import memory_check
from scoredistill.sr.colorfix import COLOR_FIXES
from scoredistill.sr.fast import check_fp8
from scoredistill.sr.files import plan_outputs, super_resolve_files
from scoredistill.sr.imageio import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, list_images
from scoredistill.sr.loading import DTYPES, Backbone, ModelFileError, check_sd3_folder
from scoredistill.sr.model_folder import CONFIG_FILE, is_model_folder, read_config
from scoredistill.sr.pipeline import DEFAULT_OPTIONS, MIN_SIDE, SROptions, TSDSRPipeline
from scoredistill.sr.tiling import TileConfig
from scoredistill.sr.timing import StageTimer

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
DefaultBackbone = Callable[[torch.dtype, str], Backbone]
"""Builds the backbone used when no --pretrained folder is given (the recipe's tiny model)."""


def build_parser(description: str, *, pretrained_required: bool,
                 prog: str = "scoredistill-sr") -> argparse.ArgumentParser:
    """The CLI's arguments (shared by ``scoredistill-sr`` and the recipe's infer.py)."""
    parser = ArgumentParser(prog=prog, description=description,
                            formatter_class=DefaultsHelpFormatter)
    add_version(parser)
    parser.add_argument("input", type=existing_path, help="an image file or a folder of images")
    parser.add_argument("-o", "--out", type=Path, required=True,
                        help="output folder: <out>/<stem>.png per input")
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--overwrite", action="store_true",
                          help="replace files already at output names (default: refuse, exit 2)")
    existing.add_argument("--skip-existing", action="store_true",
                          help="do only the outputs that do not exist yet: rerun a stopped run "
                               "with it to resume")
    # None: the model folder's saved option, else SROptions' default (named in the help).
    parser.add_argument("--upscale", type=number(float, low=0, low_open=True),
                        help="output size / input size (default: "
                             f"{DEFAULT_OPTIONS.upscale:g}, or the --model folder's)")
    parser.add_argument("--process-size", type=number(int, low=MIN_SIDE),
                        help="short side the model works at, smaller outputs are resized "
                             f"(default: {DEFAULT_OPTIONS.process_size}, or the --model "
                             "folder's)")
    parser.add_argument("--color-fix", choices=list(COLOR_FIXES),
                        help="align the output's colours to the upsampled input (default: "
                             f"{DEFAULT_OPTIONS.color}, or the --model folder's)")
    parser.add_argument("--strength", type=number(float, low=0, high=1),
                        help="fidelity / realism: z_hat = z_L - strength * v, 0 gives the "
                             "input's own VAE reconstruction, 1 the model (default: "
                             f"{DEFAULT_OPTIONS.strength:g}, or the --model folder's)")
    parser.add_argument("--compare", action="store_true",
                        help="also write <out>/compare/<stem>.png: the bicubic upsampling | the "
                             "SR output, their centres zoomed 2x below")
    parser.add_argument("--max-pixels", type=number(int, low=1), default=DEFAULT_MAX_PIXELS,
                        help="refuse inputs of more pixels (decompression bombs)")
    speed = parser.add_argument_group("speed and memory")
    speed.add_argument("--batch-size", type=number(int, low=1), default=8,
                       help="transformer tiles per call, from one image or several")
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
                       help="tile stages whose input exceeds the tile")
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
    model.add_argument("--model", type=existing_dir,
                       help="a model folder (TSDSRPipeline.save_pretrained; `make demo` writes "
                            "one): the merged model, its prompt and its default options, alone")
    model.add_argument("--pretrained", type=existing_dir,
                       help="local SD3 diffusers folder"
                            + (" (this or --model is required)" if pretrained_required
                               else " (default: tiny model)"))
    group = model.add_mutually_exclusive_group()
    group.add_argument("--lora", type=existing_dir, help="our checkpoint folder (save_lora files)")
    group.add_argument("--tsdsr-release", type=existing_dir, help="the authors' weights folder")
    model.add_argument("--embeds", type=existing_dir,
                       help="folder with prompt_embeds.pt, pool_embeds.pt (or prompts.safetensors)")
    model.add_argument("--no-fuse-qkv", dest="fuse_qkv", action="store_false",
                       help="keep the attention's Q, K, V projections apart (slower)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--force", action="store_true",
                        help="run even if the memory check refuses: on CUDA devices, before "
                             "loading, the memory planner's peak for the largest input and these "
                             "flags (from the --model/--pretrained folder's config.json) is "
                             "checked against the card's free memory; none on CPU")
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
    """Run the CLI; the exit status is 1 if any input failed, 2 on usage errors (one line), 130
    after Ctrl-C."""
    try:
        return _run(argv, default_backbone, description or __doc__.split("\n\n")[0], prog)
    except UserError as exc:
        return report(prog, exc)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the outputs written are complete: rerun the same command "
              "with --skip-existing to do the rest", file=sys.stderr)
        return EXIT_INTERRUPTED


FLAGS = {"backbone": "--pretrained", "lora": "--lora", "release": "--tsdsr-release",
         "embeds": "--embeds"}
"""The flag of each :class:`~scoredistill.sr.loading.ModelFileError` argument."""


def _check_fp8(device: str) -> None:
    """One line, before the model loads, unless --fp8 can run on ``device``."""
    try:
        check_fp8(torch.device(device))
    except RuntimeError as exc:
        raise UserError(f"--fp8: {exc}") from None
    if importlib.util.find_spec("torchao") is None:
        raise UserError("--fp8 needs torchao: pip install 'scoredistill[fp8]', or drop --fp8")


def _select(jobs: list[tuple[Path, Path]], args: argparse.Namespace, prefix: str
            ) -> list[tuple[Path, Path]]:
    """``jobs`` less those whose output exists (--skip-existing), or all of them
    (--overwrite); without either, an existing output (or --compare picture) is a
    :class:`UserError`."""
    compare = [args.out / "compare" / dst.name for _, dst in jobs] if args.compare else []
    existing = [p for p in [dst for _, dst in jobs] + compare if os.path.lexists(p)]
    if not existing or args.overwrite:
        return jobs
    if not args.skip_existing:
        raise UserError(f"{len(existing)} output file(s) already exist in {args.out} (first: "
                        f"{existing[0].relative_to(args.out)}): pass --skip-existing to do only "
                        "the missing ones (resume) or --overwrite to replace them")
    done = {dst for _, dst in jobs if os.path.lexists(dst)}  # an SR output marks its input done
    print(f"{prefix}skipping {len(done)} existing output(s) in {args.out} (--skip-existing)")
    return [(src, dst) for src, dst in jobs if dst not in done]


def _run(argv: Sequence[str] | None, default_backbone: DefaultBackbone | None,
         description: str, prog: str) -> int:
    parser = build_parser(description, pretrained_required=default_backbone is None, prog=prog)
    args = parser.parse_args(argv)
    _check_model_flags(args, parser, pretrained_required=default_backbone is None)
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
    compare_dir = writable_dir(args.out / "compare", "--compare") if args.compare else None
    rank, world, local_rank = process_share()
    prefix = f"[rank {rank}/{world}] " if world > 1 else ""
    jobs, failed = plan_outputs(inputs, args.out, max_pixels=args.max_pixels)
    # Every process plans the same list: each file goes to one, which alone checks and writes
    # its output (so a file another process of this run wrote never counts as existing).
    jobs = _select(jobs[rank::world], args, prefix)
    if rank != 0:
        failed = {}  # planning failures are reported once
    device = args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("fp16" if device.startswith("cuda") else "fp32")]
    if args.fp8:
        _check_fp8(device)
    if jobs and not args.force:
        _check_memory(args, [src for src, _ in jobs], device, dtype, tiles, prefix)
    timer = StageTimer(enabled=args.profile)
    if jobs:
        pipe = _load(args, default_backbone, dtype, device, tiles, timer)
        start = time.perf_counter()
        failed |= super_resolve_files(
            pipe, jobs, _options(args, pipe.options),
            workers=args.workers, progress=not args.no_progress and rank == 0,
            max_pixels=args.max_pixels, overwrite=args.overwrite, compare_dir=compare_dir)
        seconds = time.perf_counter() - start
    done = len(jobs) - sum(1 for src, _ in jobs if str(src) in failed)
    if done:
        print(f"{prefix}{done} image(s) written to {args.out} in {seconds:.2f} s "
              f"({done / seconds:.2f} images/s, file I/O included)")
    if args.profile:
        for stage, s in timer.totals().items():
            print(f"{prefix}  {stage:<22} {s:8.3f} s")
    for name, reason in failed.items():
        print(f"{prefix}FAILED {name}: {reason}", file=sys.stderr)
    return EXIT_ITEMS_FAILED if failed else EXIT_OK


def _check_model_flags(args: argparse.Namespace, parser: argparse.ArgumentParser, *,
                       pretrained_required: bool) -> None:
    """--model stands alone; without it, scoredistill-sr needs --pretrained."""
    if args.model is not None:
        given = [flag for flag in FLAGS.values() if getattr(args, flag[2:].replace("-", "_"))]
        if given:
            parser.error(f"--model {args.model} holds the merged model and its prompt: drop "
                         f"{', '.join(given)}")
    elif pretrained_required and args.pretrained is None:
        parser.error("give --model MODEL_DIR, or --pretrained SD3_DIR with --lora or "
                     "--tsdsr-release")


def _check_memory(args: argparse.Namespace, inputs: list[Path], device: str,
                  dtype: torch.dtype, tiles: TileConfig | None, prefix: str) -> None:
    """Refuse (one line) a run the memory planner says will not fit in the CUDA card's free
    memory, before anything loads; with a --model or --pretrained folder (the built-in tiny
    default has no config to plan)."""
    folder = args.model if args.model is not None else args.pretrained
    if not memory_check.on_cuda(device) or folder is None or (
            args.model is not None and not is_model_folder(args.model)):
        return  # no card to fill, or no config to plan (loading names a folder that is none)
    flag = "--model" if args.model is not None else "--pretrained"
    size = memory_check.largest_image(inputs, args.max_pixels)
    if size is None:  # no readable header: the file loop reports every file
        return
    try:
        saved = read_config(folder)["options"] if args.model is not None else {}
        options = _options(args, SROptions(**saved))
        run = memory_check.Run(str(folder), *size, files=len(inputs), upscale=options.upscale,
                               process_size=options.process_size, dtype=dtype,
                               channels_last=args.channels_last)
        settings = memory_check.Settings(args.batch_size, args.vae_batch_size or args.batch_size,
                                         tiles)
        memory_check.check(run, settings, device, log=lambda text: print(prefix + text))
    except UserError:
        raise
    except (TypeError, ValueError) as exc:  # an unreadable config.json or saved options
        raise UserError(f"{flag} {folder}: {' '.join(str(exc).split())}") from None


def _options(args: argparse.Namespace, defaults: SROptions) -> SROptions:
    """The pipeline's options (a model folder's saved ones, or SROptions') with the flags given
    replacing their fields."""
    given = dict(upscale=args.upscale, process_size=args.process_size, color=args.color_fix,
                 strength=args.strength)
    return dataclasses.replace(defaults, **{k: v for k, v in given.items() if v is not None})


def _load(args: argparse.Namespace, default_backbone: DefaultBackbone | None,
          dtype: torch.dtype, device: str, tiles: TileConfig | None, timer: StageTimer
          ) -> TSDSRPipeline:
    """The pipeline the flags describe; a missing, damaged or mismatched file is one line
    naming its flag."""
    try:
        if args.model is not None:
            if not is_model_folder(args.model):
                raise ModelFileError("model", f"{args.model} is no model folder: it has no "
                                     f"{CONFIG_FILE} (TSDSRPipeline.save_pretrained writes one)")
            backbone = args.model
        elif args.pretrained is not None:
            check_sd3_folder(args.pretrained)
            backbone = args.pretrained
        else:
            backbone = default_backbone(dtype, device)  # type: ignore[misc]
        return TSDSRPipeline.from_pretrained(
            backbone, lora=args.lora, release=args.tsdsr_release, embeds=args.embeds,
            dtype=dtype, device=device, fuse_qkv=args.fuse_qkv, tiles=tiles,
            batch_size=args.batch_size, vae_batch_size=args.vae_batch_size,
            compile=args.compile, cuda_graphs=args.cuda_graphs,
            channels_last=args.channels_last, fp8=args.fp8, timer=timer)
    except ModelFileError as exc:
        flag = "--model" if args.model is not None else FLAGS.get(exc.argument, "--model")
        value = getattr(args, flag[2:].replace("-", "_"))
        raise UserError(f"{flag} {value}: {' '.join(str(exc).split())}") from None
    except (FileNotFoundError, ValueError) as exc:  # a folder without the files it should hold
        raise UserError(" ".join(str(exc).split())) from None


if __name__ == "__main__":
    sys.exit(main())
