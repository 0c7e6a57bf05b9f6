"""Named intermediate hidden states of a model's call, for discriminator heads (DMD2, f-distill).

A `FeatureLayer` names a submodule of a backbone and how its output becomes a feature tensor:
(N, C, h, w) maps for the UNets' mid-block and the transformers' blocks (image tokens back on
their patch grid), (N, C) for the toy MLPs' hidden layer. `scoredistill.batching` captures it
with a forward hook during the batched call a loss already makes, so features cost no extra
backbone pass. Adapters state their default layer through a ``feature_layer(layer)`` method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .messages import brief


@dataclass(frozen=True, eq=False)
class FeatureLayer:
    """A submodule whose output is read as features, and how.

    Attributes:
        name: Its dotted name in the backbone (``nn.Module.get_submodule``).
        module: The submodule the hook is put on.
        channels: The feature channels C (what `scoredistill.heads.DiscriminatorHead` takes),
            or None where the adapter cannot tell before a call (`ModuleScoreModel`).
        read: ``(output, x_shape) -> (N, C, ...)`` float32, from the module's output for a batch
            of inputs of shape ``x_shape`` (N, ...).
        spatial: True for (N, C, h, w) maps, False for (N, C) vectors.
    """

    name: str
    module: nn.Module
    channels: int | None
    read: Callable[[Any, tuple[int, ...]], Tensor]
    spatial: bool = True


def submodule(root: nn.Module, name: str, owner: str) -> nn.Module:
    """``root.get_submodule(name)``, or one line naming the model and a few valid names."""
    try:
        return root.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in root.named_children()]
        raise ValueError(f"{owner} has no layer {name!r} to read features from; its top-level "
                         f"layers are {names[:12]}") from None


def as_tensor(output: Any, name: str) -> Tensor:
    """The layer's output if it is one tensor (the UNets' mid-block, an MLP layer)."""
    if not isinstance(output, Tensor):
        raise ValueError(f"layer {name!r} returned a {type(output).__name__}, not one tensor: "
                         "read features from a layer that returns a tensor")
    return output.float()


def token_map(output: Any, name: str, height: int, width: int) -> Tensor:
    """A transformer block's image tokens (N, h * w, D) as a map (N, D, h, w).

    Blocks return ``(encoder_hidden_states, hidden_states)`` (SD3's joint, FLUX's double and
    single blocks) or one tensor of text then image tokens (FLUX.2's single blocks): the image
    tokens are the last ``h * w`` in both cases.
    """
    hidden = output[-1] if isinstance(output, tuple) else output
    if not isinstance(hidden, Tensor) or hidden.ndim != 3 or hidden.shape[1] < height * width:
        raise ValueError(f"layer {name!r} returned {brief(hidden)}, not (N, L >= {height * width}"
                         ", D) tokens: read features from a transformer block")
    tokens = hidden[:, hidden.shape[1] - height * width:]
    return tokens.transpose(1, 2).reshape(hidden.shape[0], -1, height, width).float()


def middle_block(blocks: list[tuple[str, int]]) -> str:
    """The name of the middle block of ``[(list name, count), ...]`` taken in order (FastGen's
    default for DiTs: index ``total // 2`` over double then single blocks)."""
    index = sum(n for _, n in blocks) // 2
    for prefix, count in blocks:
        if index < count:
            return f"{prefix}.{index}"
        index -= count
    raise ValueError("the backbone has no transformer blocks to read features from")


def feature_layer(model: object, layer: str | None = None) -> FeatureLayer:
    """The `FeatureLayer` of a ScoreModel: ``layer`` by name, or its adapter's default.

    Wrappers are looked through: `scoredistill.CFG` (its model), LoRA roles (their backbone's
    base model). Adapters with a ``feature_layer(layer)`` method give their own (SD3, FLUX,
    FLUX.2, UNets, the toy MLP); any other ``nn.Module`` (or model with an ``nn.Module``
    ``module``) needs ``layer`` named, and its output must be one tensor.

    Raises:
        ValueError: For a model with no layers, a name it lacks, or no default and no name.
    """
    inner = getattr(model, "model", None)
    if inner is None:
        inner = getattr(getattr(model, "backbone", None), "base", None)
    if inner is not None:
        return feature_layer(inner, layer)
    own = getattr(model, "feature_layer", None)
    if callable(own):
        return own(layer)
    root = model if isinstance(model, nn.Module) else getattr(model, "module", None)
    owner = type(model).__name__
    if not isinstance(root, nn.Module):
        raise ValueError(f"{owner} has no nn.Module to read features from")
    if layer is None:
        raise ValueError(f"{owner} has no default feature layer: name one, e.g. layer="
                         f"{next((n for n, _ in root.named_children()), 'net')!r}")
    return FeatureLayer(layer, submodule(root, layer, owner), None,
                        lambda out, _: as_tensor(out, layer))
