"""The tiny demo's held-out pairs (the demo itself runs in ``make demo``)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from examples.tsdsr.run_tiny import write_pairs
from scoredistill.sr.imageio import list_images, load_image, save_png


def _photos(folder, names=("a", "b")):
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for name in names:
        save_png(torch.rand(3, 32, 48, generator=g), folder / f"{name}.png")
    return folder


def test_pairs_are_named_alike_and_each_draw_degrades_differently(tmp_path):
    photos = _photos(tmp_path / "photos")
    write_pairs(photos, tmp_path / "hq", tmp_path / "lq", draws=3)
    names = [p.name for p in list_images(tmp_path / "hq")]
    assert names == [p.name for p in list_images(tmp_path / "lq")]
    assert names == [f"{s}_{k}.png" for s in "ab" for k in range(3)]
    source = load_image(photos / "a.png").rgb
    assert all(torch.equal(load_image(tmp_path / "hq" / f"a_{k}.png").rgb, source)
               for k in range(3))
    lq = [load_image(tmp_path / "lq" / n).rgb for n in names]
    assert lq[0].shape == (3, 8, 12)
    assert all(not torch.equal(lq[i], lq[j]) for i in range(6) for j in range(i))
    write_pairs(photos, tmp_path / "hq2", tmp_path / "lq2", draws=3)  # fixed seeds
    assert all(torch.equal(x, load_image(tmp_path / "lq2" / n).rgb)
               for x, n in zip(lq, names, strict=True))

