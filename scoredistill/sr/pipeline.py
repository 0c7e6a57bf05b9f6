"""TSD-SR's one-step super-resolution (Dong et al., CVPR 2025) of a batch of images of any sizes.

Each LQ image is bicubic-upsampled by ``upscale`` (its short side raised to ``process_size``
first, then the result resized back), padded to a multiple of VAE factor x patch size (16 for
SD3), encoded, moved by one transformer call at t = 1000 (``z_hat = z_L - v(z_L, 1000, c)``),
decoded and colour-aligned to the upsampled LQ. The transformer's latent tiles of all images go
through it ``batch_size`` at a time; the VAE runs whole images of equal size batched, and larger
ones by tiles with the whole image's GroupNorm statistics, ``vae_batch_size`` tiles per call.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from scoredistill.adapters import SD3ScoreModel
from scoredistill.conditioning import expand_cond
from scoredistill.sr import fast
from scoredistill.sr.colorfix import color_fix
from scoredistill.sr.latents import decode, encode, one_step
from scoredistill.sr.loading import Backbone, SRModel, load_model
from scoredistill.sr.tiling import TileConfig, tile_starts, tiled_decode, tiled_encode, tiled_map
from scoredistill.sr.timing import StageTimer

DEFAULT_TILES = TileConfig()
MIN_SIDE = 8
"""Inputs with a side below this many pixels are refused: too little content to upsample."""


@dataclass(frozen=True)
class SROptions:
    """What to make of each image: the scale, the short side the model works at, colour fix."""

    upscale: float = 4.0
    process_size: int = 512
    color: str = "wavelet"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.upscale) and self.upscale > 0):
            raise ValueError(f"upscale must be a positive number, got {self.upscale}")
        if self.process_size < 1:
            raise ValueError(f"process_size must be positive, got {self.process_size}")


DEFAULT_OPTIONS = SROptions()


@dataclass(frozen=True)
class _Prepared:
    lq: Tensor  # (1, 3, h, w) float32 in [0, 1] on the device: the upsampled LQ
    x: Tensor  # (1, 3, H, W) in [-1, 1], the model's dtype, padded to the multiple
    target: tuple[int, int]


class TSDSRPipeline:
    """Load once, super-resolve many images: ``pipe(images) -> outputs``.

    Args:
        model: the merged, QKV-fused model (:func:`~scoredistill.sr.loading.load_model`).
        tiles: tile sides and overlaps of the three stages; None runs every stage whole.
        batch_size: transformer tiles per call, from one image or several.
        vae_batch_size: VAE inputs (whole images of one size, or tiles) per call (default
            ``batch_size``).
        compile: torch.compile the transformer and both VAE halves (static shapes; each new
            shape compiles once on first use); the tiled VAE's norms with dynamic shapes.
        cuda_graphs: with ``compile``, capture the transformer in CUDA graphs (None: on CUDA
            when ``batch_size`` <= :data:`~scoredistill.sr.fast.CUDA_GRAPH_MAX_BATCH`).
        channels_last: run the VAE's convolutions in channels-last memory order.
        fp8: FP8 linears in the transformer blocks (torchao; a CUDA GPU of capability >= 8.9).
        timer: per-stage timing (:class:`~scoredistill.sr.timing.StageTimer`, off by default).

    Example:
        >>> pipe = TSDSRPipeline.from_pretrained("sd3", lora="ckpt", device="cuda",
        ...                                      dtype=torch.bfloat16)  # doctest: +SKIP
        >>> outputs = pipe([image_a, image_b])  # (3, h, w) in [0, 1] each  # doctest: +SKIP
    """

    def __init__(self, model: SRModel, *, tiles: TileConfig | None = DEFAULT_TILES,
                 batch_size: int = 8, vae_batch_size: int | None = None, compile: bool = False,
                 cuda_graphs: bool | None = None, channels_last: bool = False, fp8: bool = False,
                 timer: StageTimer | None = None) -> None:
        if batch_size < 1 or (vae_batch_size is not None and vae_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size}, {vae_batch_size}")
        self.model, self.tiles, self.batch_size = model, tiles, batch_size
        self.vae_batch_size = vae_batch_size or batch_size
        self.timer = timer or StageTimer()
        self.device = model.cond["prompt_embeds"].device
        self.dtype = next(model.vae.parameters()).dtype
        self.channels_last = channels_last
        if fp8:
            fast.quantize_fp8(model.student.module)
        if channels_last:
            fast.to_channels_last(model.vae)
        if cuda_graphs is None:
            cuda_graphs = (compile and self.device.type == "cuda"
                           and batch_size <= fast.CUDA_GRAPH_MAX_BATCH)
        if cuda_graphs and not compile:
            raise ValueError("cuda_graphs needs compile=True")
        self.compiled, self.cuda_graphs = compile, cuda_graphs
        student: Callable = model.student.module
        encoder: Callable = lambda x: encode(model.vae, x, posterior="mode")  # noqa: E731
        decoder: Callable = lambda z: decode(model.vae, z)  # noqa: E731
        if compile:
            student = fast.compiled(student, cuda_graphs=cuda_graphs)
            encoder, decoder = fast.compiled(encoder), fast.compiled(decoder)
        self._student = SD3ScoreModel(student)  # type: ignore[arg-type]
        self._encoder, self._decoder = encoder, decoder

    @classmethod
    def from_pretrained(cls, backbone: Backbone | str | os.PathLike, *,
                        lora: str | Path | None = None, release: str | Path | None = None,
                        embeds: str | Path | None = None, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", fuse_qkv: bool = True,
                        **options: object) -> TSDSRPipeline:
        """Load an SD3 folder (or loaded parts) and our LoRA checkpoint or the release's files
        (:func:`~scoredistill.sr.loading.load_model`), then build the pipeline with ``options``."""
        model = load_model(backbone, lora=lora, release=release, embeds=embeds, dtype=dtype,
                           device=device, fuse_qkv=fuse_qkv)
        return cls(model, **options)  # type: ignore[arg-type]

    # --- images in [0, 1] -------------------------------------------------------------------

    def check(self, image: Tensor) -> None:
        """ValueError unless ``image`` is a (3, h, w) image of at least MIN_SIDE px a side."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, h, w) image, got shape {tuple(image.shape)}")
        h, w = image.shape[-2:]
        if min(h, w) < MIN_SIDE:
            raise ValueError(f"image is {w}x{h} px; at least {MIN_SIDE} px per side is needed")

    @torch.no_grad()
    def __call__(self, images: Sequence[Tensor], options: SROptions = DEFAULT_OPTIONS
                 ) -> list[Tensor]:
        """Super-resolve (3, h, w) images in [0, 1] (any device, any sizes) to
        (3, round(h * upscale), round(w * upscale)) in [0, 1] on the pipeline's device."""
        for image in images:
            self.check(image)
        prepared = [self._prepare(image, options) for image in images]
        decoded = self.forward([p.x for p in prepared])
        with self.timer.stage("colour fix + resize", self.device):
            return [self._finish(p, sr, options) for p, sr in zip(prepared, decoded, strict=True)]

    def work_size(self, height: int, width: int, options: SROptions = DEFAULT_OPTIONS
                  ) -> tuple[tuple[int, int], tuple[int, int]]:
        """The output size of an ``height`` x ``width`` image and the size the model runs at."""
        target = (round(height * options.upscale), round(width * options.upscale))
        # The model saw >= 512 px crops: raise the short side to process_size (release: LQ 128).
        grow = max(1.0, options.process_size / min(target))
        return target, (round(target[0] * grow), round(target[1] * grow))

    def latent_tiles(self, height: int, width: int, options: SROptions = DEFAULT_OPTIONS) -> int:
        """How many transformer tiles an ``height`` x ``width`` input makes (for batching)."""
        if self.tiles is None:
            return 1
        _, work = self.work_size(height, width, options)
        m, factor = self.model.multiple, self.model.multiple // self._patch
        sides = [-(-s // m) * m // factor for s in work]
        count = 1
        for side in sides:
            count *= len(tile_starts(side, self.tiles.latent, self.tiles.latent_overlap,
                                     self._patch)) if side > self.tiles.latent else 1
        return count

    def _prepare(self, image: Tensor, options: SROptions) -> _Prepared:
        with self.timer.stage("upload + resize", self.device):
            target, work = self.work_size(*image.shape[-2:], options)
            lq = image[None].to(self.device, torch.float32, non_blocking=True)
            lq = resize(lq, work).clamp(0, 1)
            m = self.model.multiple
            pad = (0, -work[1] % m, 0, -work[0] % m)  # replicate-pad, then crop: no resampling
            x = F.pad(lq * 2 - 1, pad, mode="replicate").to(self.dtype)
        return _Prepared(lq, x, target)

    def _finish(self, p: _Prepared, sr: Tensor, options: SROptions) -> Tensor:
        h, w = p.lq.shape[-2:]
        out = color_fix((sr[..., :h, :w] + 1) / 2, p.lq, options.color)
        return resize(out, p.target).clamp(0, 1)[0]

    # --- model inputs in [-1, 1] ------------------------------------------------------------

    @torch.no_grad()
    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        """``D(z_L - v(z_L, 1000, c))``, ``z_L = E(x)`` (posterior mode) of each (B, 3, H, W) in
        [-1, 1] (sides multiples of ``model.multiple``), float32 in [-1, 1]."""
        with self.timer.stage("VAE encode", self.device):
            latents = self._vae(xs, self._encode, "encoder")
        with self.timer.stage("transformer", self.device):
            tiles = self.tiles
            tile = max(max(z.shape[-2:]) for z in latents) if tiles is None else tiles.latent
            latents = tiled_map(self._step, latents, tile=tile,
                                overlap=0 if tiles is None else tiles.latent_overlap,
                                align=self._patch, batch_size=self.batch_size)
        with self.timer.stage("VAE decode", self.device):
            return self._vae(latents, self._decode, "decoder")

    @property
    def _patch(self) -> int:
        return self.model.student.module.config.patch_size

    def _step(self, z: Tensor) -> Tensor:
        """The student's one step on a batch of latent tiles; with compile, a short batch is
        padded to ``batch_size`` so that the transformer sees one shape."""
        n = z.shape[0]
        if self.compiled and n < self.batch_size:
            z = torch.cat([z, z[-1:].expand(self.batch_size - n, *z.shape[1:])])
        if self.cuda_graphs:  # the previous call's output buffers may be reused from here on
            torch.compiler.cudagraph_mark_step_begin()
        cond = expand_cond(self.model.cond, z.shape[0])
        return one_step(self._student, z, cond)[:n]

    def _encode(self, x: Tensor) -> Tensor:
        tiles = self.tiles
        if tiles is None or max(x.shape[-2:]) <= tiles.encoder:
            return self._encoder(self._memory_format(x))
        return tiled_encode(self.model.vae, x, tile=tiles.encoder, overlap=tiles.encoder_overlap,
                            posterior="mode", batch_size=self.vae_batch_size,
                            compile=self.compiled)

    def _decode(self, z: Tensor) -> Tensor:
        tiles = self.tiles
        if tiles is None or max(z.shape[-2:]) <= tiles.decoder:
            return self._decoder(self._memory_format(z))
        return tiled_decode(self.model.vae, z, tile=tiles.decoder, overlap=tiles.decoder_overlap,
                            batch_size=self.vae_batch_size, compile=self.compiled)

    def _memory_format(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _vae(self, xs: Sequence[Tensor], fn: Callable[[Tensor], Tensor], half: str
             ) -> list[Tensor]:
        """``fn`` on each input: inputs of one shape within one tile batched (``vae_batch_size``
        per call), larger ones alone (``fn`` tiles them)."""
        tiles = self.tiles
        limit = None if tiles is None else (tiles.encoder if half == "encoder" else tiles.decoder)
        out: list[Tensor | None] = [None] * len(xs)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, x in enumerate(xs):
            if limit is not None and max(x.shape[-2:]) > limit:
                out[i] = fn(x)
            else:
                groups.setdefault(tuple(x.shape[1:]), []).append(i)
        for members in groups.values():
            for start in range(0, len(members), self.vae_batch_size):
                chunk = members[start:start + self.vae_batch_size]
                results = fn(torch.cat([xs[i] for i in chunk]))
                for i, r in zip(chunk, results.split([xs[i].shape[0] for i in chunk]),
                                strict=True):
                    out[i] = r
        return out  # type: ignore[return-value]


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic, antialiased resize of (B, C, H, W) to ``size`` (unchanged if already so)."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)

