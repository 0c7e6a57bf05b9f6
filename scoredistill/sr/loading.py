"""Load a one-step TSD-SR model: SD3's transformer and VAE, our LoRA checkpoint or the authors'
release files, and the default prompt embeddings; LoRA merged and QKV fused once."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from scoredistill.adapters import RELEASED_FILES, SD3ScoreModel, load_lora
from scoredistill.sr.tiling import vae_factor

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, SD3Transformer2DModel

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
EMBED_FILES = {"prompt_embeds": "prompt_embeds.pt", "pooled_projections": "pool_embeds.pt"}
PROMPTS_FILE = "prompts.safetensors"
KEYS = ("prompt_embeds", "pooled_projections")


@dataclass(frozen=True)
class Backbone:
    """SD3 transformer, VAE and the default prompt ``{"prompt_embeds": (1, L, D),
    "pooled_projections": (1, P)}`` (None when it must come from a file, e.g. the release's)."""

    transformer: SD3Transformer2DModel
    vae: AutoencoderKL
    cond: dict[str, Tensor] | None


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


def load_sd3(pretrained: str | os.PathLike, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> Backbone:
    """SD3's transformer and VAE from a local diffusers folder (no download), in eval mode.

    The folder's prompt embeddings need the text encoders, so ``cond`` is None: the default
    prompt comes precomputed (e.g. the release's ``prompt_embeds.pt``).
    """
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    kwargs = dict(torch_dtype=dtype, local_files_only=True)
    transformer = SD3Transformer2DModel.from_pretrained(pretrained, subfolder="transformer",
                                                        **kwargs)
    vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **kwargs)
    return Backbone(transformer.to(device).eval(), vae.to(device).eval(), None)


def load_prompts(embeds_dir: str | Path, device: str | torch.device = "cpu"
                 ) -> dict[str, dict[str, Tensor]]:
    """``{"default": cond, "null": cond}``, each ``{"prompt_embeds": (1, L, D),
    "pooled_projections": (1, P)}``, from precompute's ``prompts.safetensors``."""
    from safetensors.torch import load_file

    # Read on the CPU, then moved: safetensors refuses device strings such as "cpu:0", which
    # accelerate gives each process of a multi-CPU run.
    flat = load_file(str(Path(embeds_dir) / PROMPTS_FILE))
    return {name: {key: flat[f"{name}.{key}"].to(device) for key in KEYS}
            for name in ("default", "null")}


def read_embeds(directory: str | Path) -> dict[str, Tensor] | None:
    """The default prompt (1, L, D) / (1, P) from precompute.py's ``prompts.safetensors`` or the
    release's ``prompt_embeds.pt`` / ``pool_embeds.pt`` (in the folder or its ``default/``,
    read as tensors only); None if absent."""
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


def load_model(backbone: Backbone | str | os.PathLike, *, lora: str | Path | None = None,
               release: str | Path | None = None, embeds: str | Path | None = None,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               fuse_qkv: bool = True) -> SRModel:
    """Backbone (loaded parts, or a local SD3 folder) + student/VAE-encoder LoRA, merged and
    QKV-fused.

    ``lora``: our checkpoint folder (``transformer.safetensors``, optional ``vae.safetensors``);
    ``release``: the authors' folder (both files and the prompt ``.pt`` files, all required).
    The default prompt comes from ``embeds``, else the checkpoint folder, else ``backbone.cond``.
    ``dtype``/``device`` apply to a folder's weights and to the prompt.
    """
    if lora is not None and release is not None:
        raise ValueError("give --lora or --tsdsr-release, not both")
    parts = backbone if isinstance(backbone, Backbone) else load_sd3(backbone, dtype, device)
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
