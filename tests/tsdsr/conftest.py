"""Fixtures of the recipe's training tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def random_tiny_backbone(monkeypatch):
    """train.py builds the random tiny SD3-shaped backbone instead of the pre-fitted one."""
    from examples.tsdsr.models.tiny import random_backbone
    from examples.tsdsr.training import models

    monkeypatch.setattr(models, "load_backbone", lambda pretrained, dtype, device:
                        random_backbone("tiny", dtype=dtype, device=device))


@pytest.fixture(scope="module")
def one_image(tmp_path_factory):
    """A folder with one random 64 px HQ image (``hq/``) and its embeddings (``embeds/``)."""
    from examples.tsdsr.precompute import precompute
    from scoredistill.sr.imageio import save_png

    root = tmp_path_factory.mktemp("one_image")
    (root / "hq").mkdir()
    save_png(torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)),
             root / "hq" / "a.png")
    precompute(root / "hq", root / "embeds")
    return root
