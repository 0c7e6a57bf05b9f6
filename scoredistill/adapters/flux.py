"""FLUX.1's ``FluxTransformer2DModel`` as a rectified-flow ScoreModel (Black Forest Labs 2024),
and the latent packing, position ids, conditioning and schedule that FLUX.2 shares with it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from einops import rearrange
from torch import Tensor

from ..features import FeatureLayer, middle_block, submodule, token_map
from ..protocols import Cond, Prediction
from ..schedules import RectifiedFlow, resolution_shift
from .module import cast_cond, weights_dtype
from .targets import FLUX_TARGETS, LoraTargets

if TYPE_CHECKING:
    from diffusers import FluxTransformer2DModel


def patchify(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): 2x2 patches, channel ``c * 4 + 2 * row + col``."""
    if x.shape[-2] % 2 or x.shape[-1] % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: height and width must be even, got "
                         f"{tuple(x.shape[-2:])}")
    return rearrange(x, "b c (h ph) (w pw) -> b (c ph pw) h w", ph=2, pw=2)


def unpatchify(x: Tensor) -> Tensor:
    """Inverse of `patchify`: (B, 4C, H/2, W/2) -> (B, C, H, W)."""
    return rearrange(x, "b (c ph pw) h w -> b c (h ph) (w pw)", ph=2, pw=2)


def to_tokens(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H * W, C), tokens in row-major order."""
    return rearrange(x, "b c h w -> b (h w) c")


def from_tokens(tokens: Tensor, height: int) -> Tensor:
    """Inverse of `to_tokens`: (B, H * W, C) -> (B, C, H, W)."""
    return rearrange(tokens, "b (h w) c -> b c h w", h=height)


def pack_latents(x: Tensor) -> Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens of 2x2 patches, FLUX.1's layout."""
    return to_tokens(patchify(x))


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of `pack_latents`: (B, H/2 * W/2, 4C) -> (B, C, H, W)."""
    return unpatchify(from_tokens(tokens, height // 2))


def grid_ids(rows: int, cols: int, axes: int, device: torch.device) -> Tensor:
    """Position ids (rows * cols, axes) ``(0, row, col, 0...)`` of row-major tokens (RoPE axes)."""
    r, c = torch.meshgrid(torch.arange(rows, device=device), torch.arange(cols, device=device),
                          indexing="ij")
    ids = torch.zeros(rows, cols, axes, device=device)
    ids[..., 1], ids[..., 2] = r, c
    return ids.reshape(-1, axes)


def image_ids(height: int, width: int, device: torch.device) -> Tensor:
    """Position ids (H/2 * W/2, 3): ``(0, row, col)`` of each packed token, FLUX.1's RoPE axes."""
    return grid_ids(height // 2, width // 2, 3, device)


def guided_cond(cond: Cond, keys: Mapping[str, str], guidance_embeds: bool,
                names: tuple[str, str]) -> tuple[list[Tensor], Tensor | None]:
    """The tensors of ``cond[k]`` for ``k`` in ``keys`` and its ``"guidance"`` (B,) or None.

    ``keys`` maps each required key to its shape for the error message; ``names`` are the
    checkpoints with and without a guidance embedding ("FLUX.1-dev", "FLUX.1-schnell"). A
    missing or unknown key, or guidance the transformer does not embed, is a ValueError.
    """
    allowed = {*keys, "guidance"}
    if not isinstance(cond, Mapping) or not keys.keys() <= cond.keys() or cond.keys() - allowed:
        given = sorted(cond) if isinstance(cond, Mapping) else type(cond).__name__
        wanted = ", ".join(f"{k!r} {shape}" for k, shape in keys.items())
        raise ValueError(f"{names[0].split('-')[0]} conditioning must be a dict with {wanted} "
                         f"and, for guidance-distilled {names[0]}, 'guidance' (B,); got {given}")
    guidance = cond.get("guidance")
    if guidance_embeds and guidance is None:
        raise ValueError(f"this transformer embeds the guidance scale ({names[0]}): pass "
                         "cond['guidance'] (B,), e.g. torch.full((B,), 3.5)")
    if not guidance_embeds and guidance is not None:
        raise ValueError(f"this transformer has no guidance embedding ({names[1]}): "
                         "drop cond['guidance']")
    return [cond[k] for k in keys], guidance


def flux_cond(cond: Cond, guidance_embeds: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(prompt_embeds (B, L, D), pooled_projections (B, P), guidance (B,) or None)``."""
    (embeds, pooled), guidance = guided_cond(
        cond, {"prompt_embeds": "(B, L, D)", "pooled_projections": "(B, P)"}, guidance_embeds,
        ("FLUX.1-dev", "FLUX.1-schnell"))
    return embeds, pooled, guidance


def built_size(height: int, width: int, config: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(height, width)`` when ``config``'s shift depends on the latent size (dynamic shifting),
    else None: the size a model's schedule is tied to, for `check_built_size`."""
    return (height, width) if config.get("use_dynamic_shifting", False) else None


def check_built_size(model: str, size: tuple[int, int] | None, got: tuple[int, int],
                     tokens: Callable[[int, int], int], shift: float) -> None:
    """ValueError unless latents of spatial size ``got`` have as many image tokens as ``size``,
    the size the schedule's shift was built for (None: any size). Shapes only, no host sync."""
    if size is None or tokens(*got) == tokens(*size):
        return
    raise ValueError(
        f"{model} was built for {size[0]}x{size[1]} latents ({tokens(*size)} tokens, shift "
        f"{shift:.3g}) but got {got[0]}x{got[1]} latents ({tokens(*got)} tokens), whose shift "
        f"differs: build one for this size, {model}.for_resolution(transformer, {got[0]}, "
        f"{got[1]}, ...)")


def flow_schedule(config: Mapping[str, Any],
                  dynamic_shift: Callable[[Mapping[str, Any]], float]) -> RectifiedFlow:
    """The table of a FlowMatch scheduler config: its fixed ``shift``, or with
    ``use_dynamic_shifting`` the shift ``dynamic_shift(config)`` (``exp(mu)``)."""
    if config.get("time_shift_type", "exponential") != "exponential":
        raise ValueError(f"time_shift_type {config['time_shift_type']!r} is not supported: "
                         "RectifiedFlow is the exponential shift e^mu s / (1 + (e^mu - 1) s)")
    num_steps = config.get("num_train_timesteps", 1000)
    if not config.get("use_dynamic_shifting", False):
        return RectifiedFlow(shift=float(config.get("shift", 1.0)), num_steps=num_steps)
    return RectifiedFlow(shift=dynamic_shift(config), num_steps=num_steps)


def dit_feature_layer(model: Any, layer: str | None, patch: int) -> FeatureLayer:
    """FLUX.1's and FLUX.2's block features: image tokens as a map (N, D, H/patch, W/patch);
    default the middle of the double- then single-stream blocks (FastGen's default)."""
    module = model.module
    name = layer or middle_block([("transformer_blocks", len(module.transformer_blocks)),
                                  ("single_transformer_blocks",
                                   len(module.single_transformer_blocks))])
    return FeatureLayer(
        name, submodule(module, name, type(model).__name__),
        module.config.num_attention_heads * module.config.attention_head_dim,
        lambda out, shape: token_map(out, name, shape[-2] // patch, shape[-1] // patch))


def _tokens(height: int, width: int) -> int:
    return (height // 2) * (width // 2)  # one token per 2x2 latent patch


@dataclass(frozen=True, eq=False)
class FluxScoreModel:
    """FLUX.1's transformer predicting the flow velocity ``eps - x0`` on (B, C, H, W) latents.

    Latents are packed into 2x2 patches with image position ids ``(0, row, col)`` and zero text
    ids, as diffusers' ``FluxPipeline`` does; ``t`` is ``sigma * 1000`` like SD3 and is passed as
    ``sigma`` (FLUX's convention; the transformer casts it to the weights' dtype). ``cond`` is
    ``{"prompt_embeds", "pooled_projections"}`` plus ``"guidance"`` (B,) for FLUX.1-dev, so the
    distilled guidance travels with each sample and CFG with a null prompt stays one batched call.

    Attributes:
        module: diffusers' ``FluxTransformer2DModel``.
        schedule: The resolution's shifted table: build it with `for_resolution`.
        size: The latent (H, W) the schedule is for, recorded by `for_resolution`; latents with
            another token count (``H/2 * W/2``) are then a ValueError, since their shift differs
            (None: no check).

    Example:
        >>> model = FluxScoreModel.for_resolution(transformer, 128, 128)  # 1024 px latents
        >>> v = model(x_t, t, {"prompt_embeds": e, "pooled_projections": p,
        ...                    "guidance": torch.full((B,), 3.5)})
    """

    module: FluxTransformer2DModel
    schedule: RectifiedFlow
    size: tuple[int, int] | None = None
    prediction: ClassVar[Prediction] = "flow"
    lora_targets: ClassVar[LoraTargets] = FLUX_TARGETS

    @classmethod
    def for_resolution(cls, module: FluxTransformer2DModel, height: int, width: int,
                       scheduler_config: Mapping[str, Any] | None = None) -> FluxScoreModel:
        """The model with FLUX's schedule for (height, width) latents (before 2x2 packing).

        Args:
            module: diffusers' ``FluxTransformer2DModel``.
            height: The latent height H (even).
            width: The latent width W (even).
            scheduler_config: The checkpoint's FlowMatch scheduler config; None: FLUX.1-dev's
                (dynamic shifting, base/max shift 0.5/1.15 at 256/4096 tokens). A config without
                dynamic shifting (FLUX.1-schnell: shift 1) uses its fixed ``shift`` and fits any
                latent size.
        """
        config = scheduler_config or {"use_dynamic_shifting": True}
        return cls(module, flow_schedule(config, lambda config: resolution_shift(
            _tokens(height, width), base_seq_len=config.get("base_image_seq_len", 256),
            max_seq_len=config.get("max_image_seq_len", 4096),
            base_shift=config.get("base_shift", 0.5), max_shift=config.get("max_shift", 1.15))),
            built_size(height, width, config))

    def feature_layer(self, layer: str | None = None) -> FeatureLayer:
        """A block's image tokens as a map (N, D, H/2, W/2) (`dit_feature_layer`)."""
        return dit_feature_layer(self, layer, 2)

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Velocity (B, C, H, W) float32 for latents ``x_t`` (B, C, H, W) at ``t`` (B,)."""
        height, width = x_t.shape[-2:]
        dtype = weights_dtype(self.module)
        tokens = pack_latents(x_t.to(dtype))  # refuses odd sizes first
        check_built_size("FluxScoreModel", self.size, (height, width), _tokens,
                         self.schedule.shift)
        embeds, pooled, guidance = flux_cond(cast_cond(cond, dtype),
                                             self.module.config.guidance_embeds)
        out = self.module(
            hidden_states=tokens, timestep=t.float() / self.schedule.num_steps,
            guidance=guidance, encoder_hidden_states=embeds, pooled_projections=pooled,
            img_ids=image_ids(height, width, x_t.device),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=x_t.device), return_dict=False)[0]
        return unpack_latents(out, height, width).float()
