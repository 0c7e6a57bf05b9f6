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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from examples.tsdsr.colorfix import COLOR_FIXES, color_fix
from examples.tsdsr.imageio import list_images, load_image, save_png
from examples.tsdsr.latents import decode, encode, one_step
from examples.tsdsr.tiling import (
    TileConfig,
    tiled_decode,
    tiled_encode,
    tiled_one_step,
    vae_factor,
)
from examples.tsdsr.tiny import load_backbone
from scoredistill.adapters import RELEASED_FILES, SD3ScoreModel, load_lora

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
EMBED_FILES = {"prompt_embeds": "prompt_embeds.pt", "pooled_projections": "pool_embeds.pt"}
MIN_SIDE = 8
"""Inputs with a side below this many pixels are refused: too little content to upsample."""
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, PIL's "L" conversion
DEFAULT_TILES = TileConfig()


@dataclass(frozen=True)
class SRModel:
    """The student (LoRA merged), the VAE and the default prompt (1, L, D) / (1, P)."""

    student: SD3ScoreModel
    vae: nn.Module
    cond: dict[str, Tensor]

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this: VAE factor x transformer patch size."""
        return vae_factor(self.vae) * self.student.module.config.patch_size


def read_embeds(directory: str | Path) -> dict[str, Tensor] | None:
    """The default prompt (1, L, D) / (1, P) from precompute.py's ``prompts.safetensors`` or the
    release's ``prompt_embeds.pt`` / ``pool_embeds.pt`` (in the folder or its ``default/``,
    read as tensors only); None if absent."""
    from examples.tsdsr.precompute import PROMPTS_FILE, load_prompts

    if (Path(directory) / PROMPTS_FILE).is_file():
        return load_prompts(directory)["default"]
    for folder in (Path(directory), Path(directory) / "default"):
        paths = {k: folder / name for k, name in EMBED_FILES.items()}
        if all(p.is_file() for p in paths.values()):
            out = {k: torch.load(p, map_location="cpu", weights_only=True)
                   for k, p in paths.items()}
            if not all(isinstance(v, Tensor) for v in out.values()):
                raise ValueError(f"{folder}: prompt embedding files must hold tensors")
            # A leading batch of several prompts: the first is the default one.
            return {"prompt_embeds": out["prompt_embeds"].reshape(
                        -1, *out["prompt_embeds"].shape[-2:])[:1],
                    "pooled_projections": out["pooled_projections"].reshape(
                        -1, out["pooled_projections"].shape[-1])[:1]}
    return None


def _prefix(path: Path) -> str:
    # save_lora and the release write "transformer."; a VAE file may carry "vae." instead.
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return next(iter(f.keys())).split(".", 1)[0]


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA adapter into its base weights (W + s B A) and remove the peft layers."""
    if getattr(model, "peft_config", None):
        model.fuse_lora()
        model.unload_lora()


def load_model(pretrained: str | None = None, *, lora: str | Path | None = None,
               release: str | Path | None = None, embeds: str | Path | None = None,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               fuse_qkv: bool = True) -> SRModel:
    """Backbone (SD3 folder or tiny default) + student/VAE-encoder LoRA, merged and QKV-fused.

    ``lora``: our checkpoint folder (``transformer.safetensors``, optional ``vae.safetensors``);
    ``release``: the authors' folder (both files and the prompt ``.pt`` files, all required).
    The default prompt comes from ``embeds``, else the checkpoint folder, else the tiny default.
    """
    if lora is not None and release is not None:
        raise ValueError("give --lora or --tsdsr-release, not both")
    parts = load_backbone(pretrained, dtype, device)
    checkpoint = Path(release or lora) if (release or lora) else None
    if release is not None:
        needed = [*RELEASED_FILES.values(), *EMBED_FILES.values()]
        missing = [n for n in needed if not (checkpoint / n).is_file()
                   and not (checkpoint / "default" / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{release} lacks {missing} (the TSD-SR release's layout)")
    if checkpoint is not None:
        for module, name, adapter in ((parts.transformer, "transformer", "student"),
                                      (parts.vae, "vae", "default")):
            path = checkpoint / RELEASED_FILES[name]
            if path.is_file():
                load_lora(path, module, adapter, prefix=_prefix(path))
            elif name == "transformer":
                raise FileNotFoundError(f"{path} not found")
    cond = None
    for source in (embeds, checkpoint):
        if source is not None and cond is None:
            cond = read_embeds(source)
    if embeds is not None and cond is None:
        raise FileNotFoundError(f"{embeds} has no {' / '.join(EMBED_FILES.values())}")
    cond = cond or parts.cond
    if cond is None:
        raise ValueError("an SD3 folder needs the default prompt embeddings: pass --embeds DIR")
    for module in (parts.transformer, parts.vae):
        merge_lora(module)
        module.requires_grad_(False)
        if fuse_qkv:  # one (3D x D) matmul instead of three; exact up to rounding
            module.fuse_qkv_projections()
    return SRModel(SD3ScoreModel(parts.transformer), parts.vae,
                   {k: v.to(device, dtype) for k, v in cond.items()})


@torch.no_grad()
def sr_forward(model: SRModel, lq: Tensor, tiles: TileConfig | None = None) -> Tensor:
    """TSD-SR's one-step forward: (B, 3, H, W) in [-1, 1] -> (B, 3, H, W) in [-1, 1].

    ``D(z_L - v(z_L, 1000, c))`` with ``z_L = E(lq)`` (posterior mode: deterministic output);
    ``tiles`` tiles each stage whose input exceeds its tile (None: never).
    """
    cond = {k: v.expand(lq.shape[0], *v.shape[1:]) for k, v in model.cond.items()}
    if tiles is None:
        return decode(model.vae, one_step(model.student, encode(model.vae, lq, posterior="mode"),
                                          cond))
    z = tiled_encode(model.vae, lq, tile=tiles.encoder, overlap=tiles.encoder_overlap)
    z_hat = tiled_one_step(model.student, z, cond, tile=tiles.latent,
                           overlap=tiles.latent_overlap,
                           align=model.student.module.config.patch_size)
    return tiled_decode(model.vae, z_hat, tile=tiles.decoder, overlap=tiles.decoder_overlap)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)


@torch.no_grad()
def super_resolve(model: SRModel, image: Tensor, *, upscale: float = 4.0,
                  process_size: int = 512, tiles: TileConfig | None = DEFAULT_TILES,
                  color: str = "wavelet") -> Tensor:
    """Super-resolve (3, h, w) in [0, 1] to (3, round(h*upscale), round(w*upscale)) in [0, 1]."""
    h, w = image.shape[-2:]
    if min(h, w) < MIN_SIDE:
        raise ValueError(f"image is {w}x{h} px; at least {MIN_SIDE} px per side is needed")
    target = (round(h * upscale), round(w * upscale))
    # The model saw >= 512 px crops: raise the short side to process_size (release: LQ 128 px).
    grow = max(1.0, process_size / min(target))
    work = (round(target[0] * grow), round(target[1] * grow))
    dtype = next(model.vae.parameters()).dtype
    lq = _resize(image[None].to(model.cond["prompt_embeds"].device, torch.float32),
                 work).clamp(0, 1)
    m = model.multiple
    pad = (0, -work[1] % m, 0, -work[0] % m)  # replicate-pad, then crop: no resampling
    x = F.pad(lq * 2 - 1, pad, mode="replicate").to(dtype)
    sr = (sr_forward(model, x, tiles)[..., :work[0], :work[1]] + 1) / 2
    sr = color_fix(sr, lq, color)
    return _resize(sr, target).clamp(0, 1)[0]


def upscale_file(model: SRModel, src: Path, dst: Path, **options: object) -> None:
    """Read ``src`` (RGB/RGBA/grey, 8/16 bit), super-resolve, write ``dst`` atomically (PNG at
    the input's bit depth)."""
    loaded = load_image(src)
    sr = super_resolve(model, loaded.rgb, **options)  # type: ignore[arg-type]
    if loaded.grey:
        sr = torch.einsum("chw,c->hw", sr, sr.new_tensor(_LUMA))[None]
    if loaded.alpha is not None:
        alpha = _resize(loaded.alpha[None].to(sr), tuple(sr.shape[-2:]))[0].clamp(0, 1)
        # save_png writes 1, 3 or 4 channels: grey + alpha goes out as RGBA with equal channels.
        sr = torch.cat([sr.expand(3, -1, -1), alpha])
    save_png(sr.cpu(), dst, bits=loaded.bits)


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
    model = load_model(args.pretrained, lora=args.lora, release=args.tsdsr_release,
                       embeds=args.embeds, dtype=dtype, device=args.device,
                       fuse_qkv=args.fuse_qkv)
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
