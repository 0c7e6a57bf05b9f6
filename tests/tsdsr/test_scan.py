"""The data check's cache and what training does with an image damaged after it: the cache
(size and mtime) cannot see an in-place change keeping both, so sampling skips the image with a
warning naming it; many failing in a row stop the run."""

import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from examples.tsdsr.data import PairedSRDataset
from examples.tsdsr.precompute import precompute
from examples.tsdsr.training.data import CaptionedCrops
from examples.tsdsr.training.scan import scan_items
from scoredistill.sr.imageio import save_png
from scoredistill.sr.loading import load_prompts
from tests.bad_input_files import damage_in_place


@pytest.fixture
def items(tmp_path) -> CaptionedCrops:
    hq = tmp_path / "hq"
    hq.mkdir()
    g = torch.Generator().manual_seed(0)
    for name in "abc":
        save_png(torch.rand(3, 32, 32, generator=g), hq / f"{name}.png")
    precompute(hq, tmp_path / "embeds")
    return CaptionedCrops(PairedSRDataset(hq, crop_size=16), tmp_path / "embeds",
                          load_prompts(tmp_path / "embeds")["default"])


def test_an_image_damaged_after_the_check_is_skipped_with_a_warning(items, caplog):
    problems, passed = scan_items(items, {}, progress=False)
    assert problems == {} and len(passed) == 3
    b = items.dataset.paths.index(next(p for p in items.dataset.paths if p.name == "b.png"))
    damage_in_place(items.dataset.paths[b])
    # A resumed run's check trusts the cache: size and mtime are unchanged.
    assert scan_items(items, passed, progress=False) == ({}, passed)
    with caplog.at_level(logging.WARNING):
        item = items[(b, 7)]
    assert Path(item["path"]).name == "c.png"  # the next image in the folder's order
    assert "skipping" in caplog.text and "b.png" in caplog.text
    assert torch.equal(item["hq"], items[(b, 7)]["hq"])  # still the same on a rerun


def test_many_failing_images_in_a_row_stop_the_run(items):
    for path in items.dataset.paths:
        damage_in_place(path)
    with pytest.raises(ValueError, match="3 training images in a row failed to load"):
        items[(0, 0)]
