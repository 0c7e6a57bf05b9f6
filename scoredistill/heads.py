"""A small discriminator head over a backbone's features: one logit per sample (DMD2, f-distill).

The head is the user's module: they own its optimiser, as they own the fake score's LoRA. It
reads the features of `scoredistill.features` ((N, C, h, w) maps or (N, C) vectors).
"""

from __future__ import annotations

from torch import Tensor, nn

from .features import feature_layer


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class DiscriminatorHead(nn.Module):
    """``features -> logit (N,)``: conv 3x3, GroupNorm, SiLU, conv 1x1, mean over positions.

    On (N, C, h, w) maps: a 3x3 convolution (any h, w >= 1) to ``hidden`` channels, GroupNorm,
    SiLU and a 1x1 convolution to one channel, averaged over positions (FastGen's
    ``Discriminator_ImageDiT``, with stride 1 instead of 2 so small maps fit; DMD2's SD head
    strides its bottleneck down to 1x1 instead). On (N, C) vectors: Linear, SiLU, Linear.

    Args:
        channels: The features' channels C (`FeatureLayer.channels`; see `for_model`).
        hidden: The hidden width.
        spatial: True for (N, C, h, w) maps, False for (N, C) vectors.

    Example:
        >>> head = DiscriminatorHead.for_model(roles.fake)  # SD3: the middle block's tokens
        >>> head_opt = torch.optim.AdamW(head.parameters(), lr=1e-5)
    """

    def __init__(self, channels: int, hidden: int = 64, spatial: bool = True) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"DiscriminatorHead(channels=...): expected a positive int, got "
                             f"{channels!r}")
        self.spatial = spatial
        if spatial:
            self.net = nn.Sequential(
                nn.Conv2d(channels, hidden, 3, padding=1), nn.GroupNorm(_groups(hidden), hidden),
                nn.SiLU(), nn.Conv2d(hidden, 1, 1))
        else:
            self.net = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(),
                                     nn.Linear(hidden, 1))
        self.channels = channels

    @classmethod
    def for_model(cls, model: object, layer: str | None = None, hidden: int = 64
                  ) -> DiscriminatorHead:
        """A head for ``model``'s features at ``layer`` (None: its adapter's default).

        Maps for the transformers and UNets, vectors for the toy MLP (`MLPScore`).
        """
        spec = feature_layer(model, layer)
        if spec.channels is None:
            raise ValueError(f"the channels of layer {spec.name!r} are not known before a call: "
                             "build DiscriminatorHead(channels, spatial=...) yourself")
        return cls(spec.channels, hidden, spec.spatial)

    def forward(self, features: Tensor) -> Tensor:
        """Logits (N,) float32 for features (N, C, h, w) (or (N, C) with ``spatial=False``)."""
        want = 4 if self.spatial else 2
        if features.ndim != want or features.shape[1] != self.channels:
            shape = "(N, C, h, w)" if self.spatial else "(N, C)"
            raise ValueError(f"DiscriminatorHead takes features {shape} with C = "
                             f"{self.channels}, got {tuple(features.shape)}")
        out = self.net(features.float())
        return out.flatten(1).mean(dim=1)

