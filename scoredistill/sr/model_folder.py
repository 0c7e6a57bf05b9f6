"""A one-step SR model as one self-contained folder, written by ``TSDSRPipeline.save_pretrained``
and read by ``TSDSRPipeline.from_pretrained`` with nothing else (no SD3 folder, no embeddings).

Layout (diffusers' subfolders, so each part also loads with diffusers' own ``from_pretrained``)::

    DIR/scoredistill_sr.json                         what it is, versions, the default options
    DIR/transformer/config.json, diffusion_pytorch_model.safetensors   the student, LoRA merged
    DIR/vae/config.json, diffusion_pytorch_model.safetensors           the VAE, its LoRA merged
    DIR/prompt_embeds.safetensors                    the default prompt (1, L, D) and (1, P)

The folder is written under a temporary name beside ``DIR`` and renamed into place, so ``DIR``
is either absent or complete; an existing folder is replaced only when asked and only if it is
a model folder itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scoredistill.atomic import new_file_mode
from scoredistill.sr.fast import unfused_state_dict
from scoredistill.sr.loading import KEYS, Backbone, SRModel, load_sd3

CONFIG_FILE = "scoredistill_sr.json"
EMBEDS_FILE = "prompt_embeds.safetensors"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"  # diffusers' name: its loaders find it
FORMAT = "scoredistill one-step SR model (TSD-SR)"
FORMAT_VERSION = 1


def is_model_folder(path: object) -> bool:
    """Whether ``path`` is a folder holding a model folder's JSON."""
    return isinstance(path, str | os.PathLike) and (Path(path) / CONFIG_FILE).is_file()


def save_model_folder(model: SRModel, options: dict[str, Any], directory: str | os.PathLike, *,
                      overwrite: bool = False) -> Path:
    """Write ``model`` (LoRA already merged) and the default ``options`` (SROptions' fields) as
    a model folder at ``directory``, atomically; FileExistsError if it exists and is not empty,
    unless ``overwrite`` and it is a model folder."""
    directory = Path(directory)
    if directory.exists() and not (directory.is_dir() and not any(directory.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{directory} exists: pick a new folder, or pass "
                                  "overwrite=True to replace an earlier model folder")
        if not is_model_folder(directory):
            raise FileExistsError(f"{directory} exists and is not a model folder (no "
                                  f"{CONFIG_FILE}): refusing to replace it; pick a new folder")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        os.chmod(tmp, _dir_mode())  # mkdtemp makes it 0700
        for name, module in (("transformer", model.student.module), ("vae", model.vae)):
            _save_module(module, tmp / name)
        from safetensors.torch import save_file

        save_file({k: model.cond[k].detach().to("cpu").contiguous() for k in KEYS},
                  str(tmp / EMBEDS_FILE))
        dtype = str(next(model.vae.parameters()).dtype).removeprefix("torch.")
        config = {"format": FORMAT, "format_version": FORMAT_VERSION,
                  "scoredistill_version": _version(), "dtype": dtype, "options": options}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        _replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_model_folder(directory: str | os.PathLike, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> tuple[Backbone, dict[str, Any]]:
    """The parts of a model folder (the prompt in ``cond``) and its default options;
    FileNotFoundError or ValueError naming what is missing or unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_config(directory)
    needed = [f"{sub}/{name}" for sub in ("transformer", "vae")
              for name in ("config.json", WEIGHTS_FILE)] + [EMBEDS_FILE]
    missing = [name for name in needed if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"model folder {directory} lacks {', '.join(missing)}: save it "
                                "again with TSDSRPipeline.save_pretrained")
    parts = load_sd3(directory, dtype, device)  # the same subfolders as an SD3 folder's
    try:
        embeds = load_file(str(directory / EMBEDS_FILE))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"cannot read {directory / EMBEDS_FILE}: {exc}") from None
    if set(embeds) != set(KEYS):
        raise ValueError(f"{directory / EMBEDS_FILE} holds {sorted(embeds)}, expected "
                         f"{list(KEYS)}")
    cond = {k: v.to(device, dtype) for k, v in embeds.items()}
    return dataclasses.replace(parts, cond=cond), config["options"]


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """A model folder's JSON, checked: ValueError naming the file if it is not one we read."""
    path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a scoredistill SR model folder's JSON")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {config.get('format_version')!r}, this "
                         f"scoredistill reads {FORMAT_VERSION}: upgrade scoredistill")
    if not isinstance(config.get("options"), dict):
        raise ValueError(f"{path} has no options object")
    return config


def _save_module(module: nn.Module, folder: Path) -> None:
    """diffusers' config.json and the weights, fused QKV projections saved as the separate
    ones diffusers loads (they are fused again at load time)."""
    from safetensors.torch import save_file

    module.save_config(folder)  # type: ignore[attr-defined]
    state = {k: v.detach().to("cpu").contiguous() for k, v in unfused_state_dict(module).items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def _replace(tmp: Path, directory: Path) -> None:
    """Rename the finished ``tmp`` to ``directory``; an earlier model folder there is moved
    aside first and removed only once the new one is in place."""
    old = None
    if directory.exists() and any(directory.iterdir()):
        old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old-"))
        os.replace(directory, old / "model")
    elif directory.exists():
        directory.rmdir()  # empty: rename cannot replace a folder on every platform
    try:
        os.replace(tmp, directory)
    except BaseException:
        if old is not None:  # put the earlier folder back
            os.replace(old / "model", directory)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _dir_mode() -> int:
    """The mode ``mkdir`` gives a new folder under the usual umasks: a new file's mode, with
    search (x) wherever read is granted (022 -> 0755, 027 -> 0750, 077 -> 0700)."""
    mode = new_file_mode()
    return mode | (mode & 0o444) >> 2


def _version() -> str:
    try:
        return metadata.version("scoredistill")
    except metadata.PackageNotFoundError:
        return "unknown"
