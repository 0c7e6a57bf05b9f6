"""LPIPS (Zhang et al. 2018) with a random AlexNet, built without touching the network."""

from __future__ import annotations

import warnings

import torch
from torch import nn


def alexnet_lpips(seed: int = 0) -> nn.Module:
    """``lpips.LPIPS`` over AlexNet: lpips' bundled linear layers, the AlexNet random (seeded,
    the global RNG untouched); load published AlexNet weights into ``.net`` yourself.

    ``pretrained=True`` reads the linear layers shipped in the lpips package; ``pnet_rand=True``
    keeps torchvision from downloading AlexNet.
    """
    import lpips

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # lpips 0.1.4 builds AlexNet with torchvision's deprecated `pretrained=` argument (two
        # deprecation warnings per call); the argument it passes here is False: no download.
        for text in ("The parameter 'pretrained' is deprecated",
                     "Arguments other than a weight enum or `None` for 'weights'"):
            warnings.filterwarnings("ignore", message=text, category=UserWarning)
        torch.manual_seed(seed)
        return lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
