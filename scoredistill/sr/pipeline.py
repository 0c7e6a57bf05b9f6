"""TSD-SR's one-step super-resolution (Dong et al., CVPR 2025) of a batch of images of any sizes.

Each LQ image is bicubic-upsampled by ``upscale`` (its short side raised to ``process_size``
first, then the result resized back), padded to a multiple of VAE factor x patch size (16 for
SD3), encoded, moved by one transformer call at t = 1000 (``z_hat = z_L - s v(z_L, 1000, c)``,
``s`` the strength; 1 is TSD-SR's step), decoded and colour-aligned to the upsampled LQ. The
transformer's latent tiles of all images go through it ``batch_size`` at a time; the VAE runs
whole images of equal size batched, and larger ones by tiles with the whole image's GroupNorm
statistics, ``vae_batch_size`` tiles per call.

The pipeline follows diffusers' conventions: PIL / numpy / tensor inputs, ``output_type``, an
output dataclass, ``torch_dtype=``, ``.to()``, ``save_pretrained`` / ``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput
from PIL import Image
from torch import Tensor

from scoredistill.adapters import SD3ScoreModel
from scoredistill.conditioning import expand_cond
from scoredistill.sr import fast, model_folder
from scoredistill.sr.colorfix import COLOR_FIXES, color_fix
from scoredistill.sr.images import (
    ImageInput,
    OutputType,
    check_image,
    check_output_type,
    from_tensors,
    to_tensors,
)
from scoredistill.sr.latents import decode, encode, one_step
from scoredistill.sr.loading import Backbone, SRModel, load_model
from scoredistill.sr.tiling import TileConfig, tile_starts, tiled_decode, tiled_encode, tiled_map
from scoredistill.sr.timing import StageTimer

DEFAULT_TILES = TileConfig()
MIN_SIDE = 8
"""Inputs with a side below this many pixels are refused: too little content to upsample."""


@dataclass(frozen=True)
class SROptions:
    """What to make of each image.

    Attributes:
        upscale: output size / input size.
        process_size: the short side the model works at, at least (raised to it, then the
            output resized back).
        color: colour fix against the upsampled input: "wavelet", "adain" or "none".
        strength: ``s`` in ``z_hat = z_L - s v(z_L, 1000, c)``, in [0, 1]: 1 is the model's
            output (TSD-SR), 0 the input's latent decoded (the VAE's reconstruction of the
            bicubic upsample), between them a straight line in latent space. Above 1 the step
            would overshoot the clean estimate the student was trained to give, so it is refused.
    """

    upscale: float = 4.0
    process_size: int = 512
    color: str = "wavelet"
    strength: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.upscale) and self.upscale > 0):
            raise ValueError(f"upscale must be a positive number, got {self.upscale}")
        if not isinstance(self.process_size, int) or self.process_size < 1:
            raise ValueError(f"process_size must be a positive integer, got "
                             f"{self.process_size!r}")
        if self.color not in COLOR_FIXES:
            raise ValueError(f"unknown colour fix {self.color!r}; choose from "
                             f"{', '.join(COLOR_FIXES)}")
        check_strength(self.strength)


def check_strength(strength: float) -> None:
    """ValueError unless ``strength`` is in [0, 1] (see :class:`SROptions`)."""
    if not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise ValueError(f"strength must be in [0, 1] (1: the model's output, 0: the input's "
                         f"latent decoded), got {strength}")


DEFAULT_OPTIONS = SROptions()


@dataclass
class TSDSROutput(BaseOutput):
    """What :class:`TSDSRPipeline` returns (diffusers' ``BaseOutput``: ``out.images`` or
    ``out[0]``).

    Attributes:
        images: one per input image (sizes may differ, so always a list): PIL RGB images,
            (H, W, 3) float32 arrays in [0, 1] ("np") or (3, H, W) float32 tensors in [0, 1] on
            the pipeline's device ("pt").
        timings: seconds per stage of this call when the pipeline's timer is enabled, else None.
    """

    images: list[Image.Image] | list[np.ndarray] | list[Tensor]
    timings: dict[str, float] | None = None


@dataclass(frozen=True)
class _Prepared:
    lq: Tensor  # (1, 3, h, w) float32 in [0, 1] on the device: the upsampled LQ
    x: Tensor  # (1, 3, H, W) in [-1, 1], the model's dtype, padded to the multiple
    target: tuple[int, int]


class TSDSRPipeline:
    """Load once, super-resolve many images: ``pipe(images).images``.

    Args:
        model: the merged, QKV-fused model (:func:`~scoredistill.sr.loading.load_model`).
        options: the defaults of each call (a model folder's, from :meth:`from_pretrained`).
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
        >>> pipe = TSDSRPipeline.from_pretrained("sd3", lora="ckpt", torch_dtype=torch.bfloat16
        ...                                      ).to("cuda")  # doctest: +SKIP
        >>> out = pipe([Image.open("a.png"), Image.open("b.jpg")], upscale=4)  # doctest: +SKIP
        >>> out.images[0].save("a_x4.png")  # doctest: +SKIP
    """

    def __init__(self, model: SRModel, *, options: SROptions = DEFAULT_OPTIONS,
                 tiles: TileConfig | None = DEFAULT_TILES, batch_size: int = 8,
                 vae_batch_size: int | None = None, compile: bool = False,
                 cuda_graphs: bool | None = None, channels_last: bool = False, fp8: bool = False,
                 timer: StageTimer | None = None) -> None:
        if batch_size < 1 or (vae_batch_size is not None and vae_batch_size < 1):
            raise ValueError(f"batch sizes must be >= 1, got {batch_size}, {vae_batch_size}")
        if not isinstance(options, SROptions):
            raise TypeError(f"options must be an SROptions, got {type(options).__name__}")
        self.model, self.options, self.tiles, self.batch_size = model, options, tiles, batch_size
        self.vae_batch_size = vae_batch_size or batch_size
        self.timer = timer or StageTimer()
        self.device = model.cond["prompt_embeds"].device
        self.dtype = next(model.vae.parameters()).dtype
        self.channels_last, self.fp8 = channels_last, fp8
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
                        embeds: str | Path | None = None, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", fuse_qkv: bool = True,
                        dtype: torch.dtype | None = None, **kwargs: Any) -> TSDSRPipeline:
        """Load a model folder (:meth:`save_pretrained`'s, alone), or an SD3 folder (or loaded
        parts) with our LoRA checkpoint or the release's files
        (:func:`~scoredistill.sr.loading.load_model`); then build the pipeline with ``kwargs``.

        ``torch_dtype`` (default float32; ``dtype`` is an alias kept for earlier callers) and
        ``device`` apply to the weights (loaded parts are cast and moved in place) and the
        prompt. A model folder's options become the pipeline's defaults unless ``options`` is
        given.
        """
        if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
            raise ValueError(f"torch_dtype={torch_dtype} and dtype={dtype} disagree: give "
                             "torch_dtype only")
        torch_dtype = torch_dtype or dtype or torch.float32
        if not isinstance(torch_dtype, torch.dtype):
            raise TypeError(f"torch_dtype must be a torch.dtype such as torch.float16, got "
                            f"{torch_dtype!r}")
        if model_folder.is_model_folder(backbone):
            if lora is not None or release is not None or embeds is not None:
                raise ValueError(f"{backbone} is a model folder (LoRA merged, prompt included): "
                                 "give lora, release and embeds only with an SD3 folder")
            backbone, saved = model_folder.load_model_folder(backbone, torch_dtype, device)
            if "options" not in kwargs:
                try:
                    kwargs["options"] = SROptions(**saved)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"{model_folder.CONFIG_FILE}'s options: {exc}") from None
        elif isinstance(backbone, Backbone):  # loaded parts: cast and moved like a folder's
            for module in (backbone.transformer, backbone.vae):
                # nn.Module.to: diffusers' override warns about fp32-kept modules, which only
                # matters for weights loaded with `torch_dtype` (as models/tiny.py notes).
                torch.nn.Module.to(module, device=device, dtype=torch_dtype)
        model = load_model(backbone, lora=lora, release=release, embeds=embeds,
                           dtype=torch_dtype, device=device, fuse_qkv=fuse_qkv)
        return cls(model, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the model as a folder that :meth:`from_pretrained` loads alone: the merged
        student, the VAE, the default prompt and a JSON with :attr:`options`
        (:mod:`~scoredistill.sr.model_folder`), atomically; an existing folder is replaced only
        with ``overwrite`` and only if it is a model folder."""
        if self.fp8:
            raise ValueError("an FP8-quantised transformer cannot be saved: save the pipeline "
                             "before fp8=True")
        return model_folder.save_model_folder(self.model, dataclasses.asdict(self.options),
                                              directory, overwrite=overwrite)

    def to(self, device: str | torch.device | torch.dtype | None = None,
           dtype: torch.dtype | None = None) -> TSDSRPipeline:
        """Move (and cast) the transformer, the VAE and the prompt, as diffusers' pipelines:
        ``pipe.to("cuda")``, ``pipe.to(torch.float16)``, ``pipe.to("cuda", torch.bfloat16)``;
        returns the pipeline. ``cuda_graphs``' default is decided at construction: build a
        compiled pipeline on its device (``from_pretrained(..., device=...)``)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device if dtype is None else dtype
        if self.fp8:
            raise ValueError("an FP8-quantised pipeline cannot be moved: build it on its device")
        for module in (self.model.student.module, self.model.vae):
            torch.nn.Module.to(module, device=device, dtype=dtype)  # no diffusers warning
        cond = {k: v.to(device=device, dtype=dtype) for k, v in self.model.cond.items()}
        self.model = dataclasses.replace(self.model, cond=cond)
        self.device = cond["prompt_embeds"].device
        self.dtype = next(self.model.vae.parameters()).dtype
        return self

    # --- images ------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, image: ImageInput | Sequence[ImageInput],
                 options: SROptions | None = None, *, upscale: float | None = None,
                 process_size: int | None = None, color: str | None = None,
                 strength: float | None = None, output_type: OutputType = "pil",
                 return_dict: bool = True) -> TSDSROutput | tuple[list, dict[str, float] | None]:
        """Super-resolve one image or a list, as diffusers' pipelines take them: PIL images,
        numpy arrays (H, W, C) / (B, H, W, C), tensors (C, H, W) / (B, C, H, W); uint8, or floats
        in [0, 1] (:func:`~scoredistill.sr.images.to_tensors`; anything else is refused, naming
        the image). Each output is ``round(h * upscale)`` x ``round(w * upscale)``.

        ``options`` (default :attr:`options`) with the given keywords replacing its fields.
        Returns a :class:`TSDSROutput`, or ``(images, timings)`` if not ``return_dict``.
        """
        check_output_type(output_type)
        overrides = dict(upscale=upscale, process_size=process_size, color=color,
                         strength=strength)
        options = dataclasses.replace(options or self.options,
                                      **{k: v for k, v in overrides.items() if v is not None})
        tensors = to_tensors(image, MIN_SIDE)
        before = self.timer.totals() if self.timer.enabled else None
        outputs = self._super_resolve(tensors, options)
        timings = None
        if before is not None:
            timings = {k: v - before.get(k, 0.0) for k, v in self.timer.totals().items()
                       if v != before.get(k)}
        images = from_tensors(outputs, output_type)
        return TSDSROutput(images, timings) if return_dict else (images, timings)

    @torch.no_grad()
    def run(self, images: Sequence[Tensor], options: SROptions | None = None) -> list[Tensor]:
        """Super-resolve (3, h, w) float images in [0, 1] (any device, any sizes) to
        (3, round(h * upscale), round(w * upscale)) float32 in [0, 1] on the pipeline's device:
        the tensors-only form of ``__call__`` (the file loop's), with no conversion."""
        for i, image in enumerate(images):
            self.check(image, f"image {i}")
        return self._super_resolve(images, options or self.options)

    def check(self, image: Tensor, label: str = "image") -> None:
        """ValueError unless ``image`` is a (3, h, w) float image in [0, 1] of at least MIN_SIDE
        px a side."""
        check_image(image, label, MIN_SIDE)

    def _super_resolve(self, images: Sequence[Tensor], options: SROptions) -> list[Tensor]:
        prepared = [self._prepare(image, options) for image in images]
        decoded = self.forward([p.x for p in prepared], options.strength)
        with self.timer.stage("colour fix + resize", self.device):
            return [self._finish(p, sr, options) for p, sr in zip(prepared, decoded, strict=True)]

    def work_size(self, height: int, width: int, options: SROptions | None = None
                  ) -> tuple[tuple[int, int], tuple[int, int]]:
        """The output size of an ``height`` x ``width`` image and the size the model runs at."""
        options = options or self.options
        target = (round(height * options.upscale), round(width * options.upscale))
        if min(target) < 1:
            raise ValueError(f"upscale {options.upscale:g} makes this {width}x{height} px image "
                             f"{target[1]}x{target[0]} px: give an upscale above "
                             f"{0.5 / min(height, width):g} for it")
        # The model saw >= 512 px crops: raise the short side to process_size (release: LQ 128).
        grow = max(1.0, options.process_size / min(target))
        return target, (round(target[0] * grow), round(target[1] * grow))

    def latent_tiles(self, height: int, width: int, options: SROptions | None = None) -> int:
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
    def forward(self, xs: Sequence[Tensor], strength: float = 1.0) -> list[Tensor]:
        """``D(z_L - s v(z_L, 1000, c))``, ``z_L = E(x)`` (posterior mode), ``s`` the
        ``strength``, of each (B, 3, H, W) in [-1, 1] (sides multiples of ``model.multiple``),
        float32 in [-1, 1]."""
        check_strength(strength)
        with self.timer.stage("VAE encode", self.device):
            latents = self._vae(xs, self._encode, "encoder")
        with self.timer.stage("transformer", self.device):
            tiles = self.tiles
            tile = max(max(z.shape[-2:]) for z in latents) if tiles is None else tiles.latent
            steps = tiled_map(self._step, latents, tile=tile,
                              overlap=0 if tiles is None else tiles.latent_overlap,
                              align=self._patch, batch_size=self.batch_size)
            # z_L + s (G(z_L) - z_L) = z_L - s v: a straight line, so the tiles' blend commutes
            # with it; lerp gives z_L exactly at s = 0 and G(z_L) exactly at s = 1.
            latents = [torch.lerp(z, g, strength) for z, g in zip(latents, steps, strict=True)]
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

