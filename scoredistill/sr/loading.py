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
from scoredistill.sr import fast
from scoredistill.sr.tiling import vae_factor

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, SD3Transformer2DModel

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
EMBED_FILES = {"prompt_embeds": "prompt_embeds.pt", "pooled_projections": "pool_embeds.pt"}
PROMPTS_FILE = "prompts.safetensors"
KEYS = ("prompt_embeds", "pooled_projections")


class ModelFileError(ValueError):
    """A file given to :func:`load_model` that cannot be used (corrupt, pickled, the wrong width
    or the wrong module); ``argument`` is the keyword that named it (``"backbone"``, ``"lora"``,
    ``"release"`` or ``"embeds"``), so that a command line can name its flag."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(message)
        self.argument = argument


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
    from safetensors import SafetensorError

    check_weights(pretrained)
    kwargs = dict(torch_dtype=dtype, local_files_only=True)
    parts = {}
    for sub, cls in (("transformer", SD3Transformer2DModel), ("vae", AutoencoderKL)):
        try:
            parts[sub] = cls.from_pretrained(pretrained, subfolder=sub, **kwargs)
        except (OSError, ValueError, SafetensorError) as exc:  # missing or mismatched weights
            raise ModelFileError("backbone", f"cannot load {Path(pretrained) / sub}: "
                                 f"{' '.join(str(exc).split())[:300]}") from exc
    return Backbone(parts["transformer"].to(device).eval(), parts["vae"].to(device).eval(), None)


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
            out = {k: _load_tensor(p) for k, p in paths.items()}
            if not all(isinstance(v, Tensor) for v in out.values()):
                raise ValueError(f"{folder}: prompt embedding files must hold tensors")
            # A leading batch of several prompts: the first is the default one.
            return {"prompt_embeds": out["prompt_embeds"].reshape(
                        -1, *out["prompt_embeds"].shape[-2:])[:1],
                    "pooled_projections": out["pooled_projections"].reshape(
                        -1, out["pooled_projections"].shape[-1])[:1]}
    return None


def _load_tensor(path: Path) -> object:
    """``torch.load`` of tensors only: a file that would unpickle other objects (which can run
    code) is refused in one line."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message would suggest weights_only=False
        raise ValueError(f"refusing to load {path}: it holds pickled objects, not only tensors "
                         "(loading it could run code); save the tensor alone with "
                         "torch.save(tensor, path)") from None
    except (OSError, RuntimeError, EOFError) as exc:  # truncated, or not a torch file
        raise ValueError(f"cannot read {path}: {' '.join(str(exc).split())[:200]}") from None


def _check_widths(cond: dict[str, Tensor], transformer: nn.Module) -> str | None:
    """What is wrong with the prompt's widths for ``transformer`` (SD3: 4096 and 2048), if any."""
    config = transformer.config
    for key, field in (("prompt_embeds", "joint_attention_dim"),
                       ("pooled_projections", "pooled_projection_dim")):
        want, got = getattr(config, field), cond[key].shape[-1]
        if got != want:
            return (f"{key} are {got} wide but the transformer takes {want} ({field}): they "
                    "were computed for another model; precompute them with this model's text "
                    "encoders")
    return None


def _prefix(path: Path) -> str:
    # save_lora and the release write "transformer."; a VAE file may carry "vae." instead.
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return next(iter(f.keys())).split(".", 1)[0]
    except (SafetensorError, StopIteration) as exc:  # truncated, foreign or empty: name it
        raise ValueError(f"cannot read LoRA file {path}: {exc or 'no tensors'}") from None


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
    checkpoint = Path(release or lora) if (release or lora) else None
    role = "release" if release is not None else "lora"
    if release is not None:
        needed = [*RELEASED_FILES.values(), *EMBED_FILES.values()]
        missing = [n for n in needed if not (checkpoint / n).is_file()
                   and not (checkpoint / "default" / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{release} lacks {missing} (the TSD-SR release's layout)")
    cond, source = None, None  # read before the weights load: a bad file fails fast
    for folder, argument in ((embeds, "embeds"), (checkpoint, role)):
        if folder is not None and cond is None:
            try:
                cond, source = read_embeds(folder), (folder, argument)
            except ValueError as exc:  # pickled, truncated or not tensors
                raise ModelFileError(argument, str(exc)) from None
    if embeds is not None and cond is None:
        raise FileNotFoundError(f"{embeds} has no {' / '.join(EMBED_FILES.values())}")
    parts = backbone if isinstance(backbone, Backbone) else load_sd3(backbone, dtype, device)
    if cond is not None:
        problem = _check_widths(cond, parts.transformer)
        if problem:
            raise ModelFileError(source[1], f"the prompt in {source[0]}: {problem}")
    cond = cond or parts.cond
    if cond is None:
        raise ValueError("an SD3 folder needs the default prompt embeddings: pass --embeds DIR")
    if checkpoint is not None:
        for module, name, adapter in ((parts.transformer, "transformer", "student"),
                                      (parts.vae, "vae", "default")):
            path = checkpoint / RELEASED_FILES[name]
            if path.is_file():
                try:
                    load_lora(path, module, adapter, prefix=_prefix(path))
                except ValueError as exc:  # foreign, truncated, or for another module
                    raise ModelFileError(role, str(exc)) from exc
            elif name == "transformer":
                raise FileNotFoundError(f"{path} not found")
    for module in (parts.transformer, parts.vae):
        merge_lora(module)
        module.requires_grad_(False)
        if fuse_qkv:  # one (3D x D) matmul instead of three; the separate ones freed
            fast.fuse_qkv(module)
    return SRModel(SD3ScoreModel(parts.transformer), parts.vae,
                   {k: v.to(device, dtype) for k, v in cond.items()})


def check_weights(pretrained: str | os.PathLike) -> None:
    """:class:`ModelFileError` naming the first ``*.safetensors`` file of ``pretrained``'s
    ``transformer/`` and ``vae/`` that is truncated or not safetensors (headers only: fast)."""
    from safetensors import SafetensorError, safe_open

    for sub in ("transformer", "vae"):
        for path in sorted((Path(pretrained) / sub).glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt"):
                    pass
            except (SafetensorError, OSError) as exc:
                raise ModelFileError("backbone", f"{path} is damaged ({exc}): download the "
                                     "model again") from None


def check_sd3_folder(pretrained: str | os.PathLike) -> None:
    """FileNotFoundError unless ``pretrained`` is a local diffusers SD3 folder (``transformer/``
    and ``vae/`` with their config.json), checked before anything loads."""
    missing = [f"{sub}/config.json" for sub in ("transformer", "vae")
               if not (Path(pretrained) / sub / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(f"--pretrained {pretrained} has no {' or '.join(missing)}: give "
                                "a local diffusers SD3 folder (stabilityai/stable-diffusion-3-"
                                "medium-diffusers as downloaded)")
