"""LoRA files in the diffusers/peft layout of ``StableDiffusion3Pipeline.save_lora_weights``.

A file is a safetensors state dict with keys ``<prefix>.<module path>.lora_A.weight`` and
``...lora_B.weight`` (peft's names without the adapter name; prefix ``transformer``) and,
optionally, the adapter's LoraConfig as JSON under the ``lora_adapter_metadata`` metadata key.
The TSD-SR release ships two such files, ``transformer.safetensors`` (the student) and
``vae.safetensors`` (the VAE encoder), both rank 64 with alpha 64 and, as written by
``save_lora_weights``, both with the ``transformer.`` prefix.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..atomic import save_safetensors

if TYPE_CHECKING:
    from peft import LoraConfig

METADATA_KEY = "lora_adapter_metadata"
"""diffusers' safetensors metadata key for the LoraConfig (``LORA_ADAPTER_METADATA_KEY``)."""

_CONFIG_FIELDS = ("r", "lora_alpha", "target_modules", "exclude_modules", "rank_pattern",
                  "alpha_pattern", "use_rslora", "init_lora_weights")
RELEASED_FILES = {"transformer": "transformer.safetensors", "vae": "vae.safetensors"}


_KINDS = {
    "VAE": {"encoder", "decoder", "quant_conv", "post_quant_conv"},
    "UNet": {"down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding",
             "add_embedding"},
    "transformer": {"transformer_blocks", "single_transformer_blocks", "pos_embed", "x_embedder",
                    "context_embedder", "time_text_embed", "time_guidance_embed", "norm_out",
                    "proj_out", "double_stream_modulation_img", "double_stream_modulation_txt",
                    "single_stream_modulation"},
}
"""diffusers' top-level module names of each backbone part: what a LoRA file's keys start with."""


class LoraMismatchError(ValueError):
    """A LoRA file whose modules are not (all) in the module it is loaded into.

    The message names the file, what the file seems to be (``"a VAE LoRA"``, by its keys'
    top-level names) and the model it was given for; ``path`` is the file.
    """

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def _part(names: Iterable[str]) -> str | None:
    # "VAE", "UNet" or "transformer": the part whose top-level names most of ``names`` start with.
    votes = Counter(kind for name in names for kind, heads in _KINDS.items()
                    if name.split(".", 1)[0] in heads)
    return votes.most_common(1)[0][0] if votes else None


def _check_modules(path: str | Path, state: dict[str, Tensor], module: nn.Module) -> None:
    # Before peft sees the file: its error lists every module of the model and names no file.
    files = sorted({key.split(".lora_", 1)[0] for key in state})
    names = {name for name, _ in module.named_modules()}
    absent = [name for name in files if name not in names]
    if not absent:
        return
    kind, target = _part(files), _part(name for name, _ in module.named_children()) or "model"
    given = f"given as the {target}'s ({type(module).__name__})"
    what = (f"seems to be a {kind} LoRA, {given}" if kind not in (None, target)
            else f"seems to be a {kind} LoRA for another {kind} layout, {given}" if kind
            else f"is no LoRA of this {target} ({type(module).__name__})")
    count = (f"none of its {len(files)} modules is" if len(absent) == len(files)
             else f"{len(absent)} of its {len(files)} modules are not")
    raise LoraMismatchError(f"LoRA file {path} {what}: {count} in it, e.g. {absent[0]!r}",
                           Path(path))


def add_lora(module: nn.Module, config: LoraConfig, adapter: str) -> None:
    """Inject adapter ``adapter`` into ``module`` (diffusers' ``add_adapter`` where it exists)."""
    from peft import inject_adapter_in_model

    with warnings.catch_warnings():  # several adapters on one model is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        if hasattr(module, "add_adapter"):
            module.add_adapter(config, adapter_name=adapter)
        else:
            inject_adapter_in_model(config, module, adapter_name=adapter)


def lora_state_dict(module: nn.Module, adapter: str) -> dict[str, Tensor]:
    """One adapter's parameters under peft's file names ``<module path>.lora_A.weight``."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, layer in module.named_modules():
        if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
            for part in ("lora_A", "lora_B"):
                for p_name, p in getattr(layer, part)[adapter].named_parameters():
                    out[f"{name}.{part}.{p_name}"] = p
    return out


def _jsonable(value: Any) -> Any:
    return sorted(value) if isinstance(value, set | frozenset) else value


def save_lora(path: str | Path, module: nn.Module, adapter: str, *,
              prefix: str = "transformer", dtype: torch.dtype | None = None,
              state: dict[str, Tensor] | None = None) -> Path:
    """Write one adapter of ``module`` to ``path`` atomically (temp file + ``os.replace``).

    Args:
        path: The ``.safetensors`` file written.
        module: The module carrying the adapter.
        adapter: The adapter's name.
        prefix: The key prefix in the file (diffusers' "transformer", "unet", ...).
        dtype: The dtype written (None: the parameters' own).
        state: The adapter's tensors to write instead of reading them from ``module`` (e.g.
            gathered whole from FSDP shards), keyed as :func:`lora_state_dict`.

    Returns:
        ``path``.

    Raises:
        ValueError: If ``module`` has no adapter ``adapter``.
    """
    state = lora_state_dict(module, adapter) if state is None else state
    if not state:
        raise ValueError(f"module has no LoRA adapter {adapter!r}")
    tensors = {f"{prefix}.{k}": v.detach().to("cpu", dtype or v.dtype).contiguous()
               for k, v in state.items()}
    metadata = {"format": "pt"}
    config = getattr(module, "peft_config", {}).get(adapter)
    if config is not None:
        fields = {f"{prefix}.{k}": _jsonable(getattr(config, k)) for k in _CONFIG_FIELDS}
        metadata[METADATA_KEY] = json.dumps(fields, indent=2, sort_keys=True)
    save_safetensors(tensors, path, metadata)
    return Path(path)


def read_lora(path: str | Path, prefix: str = "transformer") -> tuple[dict[str, Tensor],
                                                                       dict[str, Any]]:
    """``(state dict without the prefix, LoraConfig fields from the metadata or {})``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
            metadata = f.metadata() or {}
    except SafetensorError as exc:  # a truncated or foreign file: its errors name no file
        raise ValueError(f"cannot read LoRA file {path}: {exc}") from None
    head = f"{prefix}."
    foreign = [k for k in raw if not k.startswith(head)]
    if foreign:
        raise ValueError(f"{path}: {len(foreign)} keys lack the {head!r} prefix, "
                         f"e.g. {foreign[0]!r}")
    packed = json.loads(metadata.get(METADATA_KEY, "{}"))
    config = {k.removeprefix(head): v for k, v in packed.items() if k.startswith(head)}
    return {k.removeprefix(head): v for k, v in raw.items()}, config


def _infer_config(state: dict[str, Tensor]) -> LoraConfig:
    # No metadata (the release's files): ranks from the lora_A shapes, alpha = rank as released.
    from peft import LoraConfig

    ranks = {k.removesuffix(".lora_A.weight"): v.shape[0] for k, v in state.items()
             if k.endswith(".lora_A.weight")}
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: r for name, r in ranks.items() if r != rank}
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(ranks),
                      rank_pattern=pattern, alpha_pattern=pattern)


@torch.no_grad()
def load_lora(path: str | Path, module: nn.Module, adapter: str, *,
              prefix: str = "transformer") -> None:
    """Load a LoRA file into adapter ``adapter`` of ``module``, creating it if it is missing.

    An existing adapter must have exactly the file's modules and shapes (strict).

    Args:
        path: The ``.safetensors`` LoRA file.
        module: The module to load it into.
        adapter: The adapter's name.
        prefix: The key prefix in the file (diffusers' "transformer", "unet", ...).

    Raises:
        LoraMismatchError: For a file with modules the module lacks, naming what the file
            seems to be.
        ValueError: For a file that cannot be read as a LoRA file.
    """
    state, fields = read_lora(path, prefix)
    _check_modules(path, state, module)
    if not lora_state_dict(module, adapter):
        from peft import LoraConfig

        add_lora(module, LoraConfig(**fields) if fields else _infer_config(state), adapter)
    own = lora_state_dict(module, adapter)
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(f"{path} does not fit adapter {adapter!r}: missing {missing[:3]}"
                         f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                         f"{'...' if len(unexpected) > 3 else ''}")
    for key, param in own.items():
        if param.shape != state[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(state[key].shape)}, the adapter "
                             f"{tuple(param.shape)}")
        param.copy_(state[key])


def load_tsdsr_release(directory: str | Path, *, transformer: nn.Module | None = None,
                       vae: nn.Module | None = None, adapter: str = "student",
                       vae_adapter: str = "default") -> None:
    """Load the TSD-SR release's ``transformer.safetensors`` / ``vae.safetensors`` LoRAs.

    Args:
        directory: The release's folder holding the two files.
        transformer: The SD3 transformer to load the student LoRA into (None: skipped).
        vae: The VAE to load the encoder LoRA into (None: skipped).
        adapter: The transformer adapter's name.
        vae_adapter: The VAE adapter's name.
    """
    directory = Path(directory)
    if transformer is not None:
        load_lora(directory / RELEASED_FILES["transformer"], transformer, adapter)
    if vae is not None:
        load_lora(directory / RELEASED_FILES["vae"], vae, vae_adapter)
