"""SD3's ``SD3Transformer2DModel`` as a rectified-flow ScoreModel (Esser et al. 2024)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from torch import Tensor

from ..features import FeatureLayer, middle_block, submodule, token_map
from ..protocols import Cond, Prediction
from ..schedules import RectifiedFlow
from .module import cast_cond, weights_dtype
from .targets import SD3_TARGETS, LoraTargets

if TYPE_CHECKING:
    from diffusers import SD3Transformer2DModel


def sd3_cond(cond: Cond) -> tuple[Tensor, Tensor]:
    """``(prompt_embeds (B, L, D), pooled_projections (B, P))`` from a dict or a pair."""
    if isinstance(cond, Mapping):
        missing = {"prompt_embeds", "pooled_projections"} - cond.keys()
        if missing:
            raise ValueError(f"SD3 conditioning dict lacks {sorted(missing)}")
        return cond["prompt_embeds"], cond["pooled_projections"]
    if isinstance(cond, Sequence) and len(cond) == 2:
        return cond[0], cond[1]
    raise ValueError("SD3 conditioning must be {'prompt_embeds': (B, L, D), "
                     "'pooled_projections': (B, P)} or the pair (prompt_embeds, pooled)")


@dataclass(frozen=True, eq=False)
class SD3ScoreModel:
    """SD3's transformer predicting the flow velocity ``eps - x0`` (TSD-SR's teacher and student).

    The network timestep is ``t = sigma * 1000``, what ``RectifiedFlow.timesteps`` returns; ``cond``
    is ``{"prompt_embeds": (B, L, D), "pooled_projections": (B, P)}`` or that pair. Latents and
    embeddings are cast to the weights' dtype, ``t`` stays float32 (bf16 would quantise it), and
    the output (B, C, H, W) is float32.

    Attributes:
        module: diffusers' ``SD3Transformer2DModel``.
        schedule: The noise schedule (default SD3's ``RectifiedFlow(shift=3.0)``).

    Example:
        >>> model = SD3ScoreModel(SD3Transformer2DModel.from_pretrained(...))
        >>> v = model(x_t, t, {"prompt_embeds": e, "pooled_projections": p})
    """

    module: SD3Transformer2DModel
    schedule: RectifiedFlow = field(default_factory=lambda: RectifiedFlow(shift=3.0))
    prediction: ClassVar[Prediction] = "flow"
    lora_targets: ClassVar[LoraTargets] = SD3_TARGETS

    def feature_layer(self, layer: str | None = None) -> FeatureLayer:
        """A joint block's image tokens as a map (N, D, H/p, W/p); default the middle block
        (``transformer_blocks.{L // 2}``, FastGen's default for DiTs)."""
        name = layer or middle_block([("transformer_blocks", len(self.module.transformer_blocks))])
        config, patch = self.module.config, self.module.config.patch_size
        return FeatureLayer(
            name, submodule(self.module, name, "SD3ScoreModel"),
            config.num_attention_heads * config.attention_head_dim,
            lambda out, shape: token_map(out, name, shape[-2] // patch, shape[-1] // patch))

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        """Velocity (B, C, H, W) float32 for latents ``x_t`` (B, C, H, W) at ``t`` (B,)."""
        dtype = weights_dtype(self.module)
        embeds, pooled = sd3_cond(cast_cond(cond, dtype))
        out = self.module(hidden_states=x_t.to(dtype), timestep=t.float(),
                          encoder_hidden_states=embeds, pooled_projections=pooled,
                          return_dict=False)[0]
        return out.float()
