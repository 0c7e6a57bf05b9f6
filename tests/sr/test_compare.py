"""scoredistill-sr --compare's picture: bicubic | SR, the zoomed centre below, framed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from scoredistill.sr.compare import BOX, crop_box, side_by_side


def test_layout_against_an_independent_composition():
    g = torch.Generator().manual_seed(0)
    lq, sr = torch.rand(3, 10, 12, generator=g), torch.rand(3, 40, 48, generator=g)
    out = side_by_side(lq, sr, zoom=4)
    assert out.shape == (3, 80, 96)
    bicubic = F.interpolate(lq[None], size=(40, 48), mode="bicubic", align_corners=False,
                            antialias=True)[0].clamp(0, 1)
    assert crop_box(40, 48, 4) == (15, 18, 10, 12)
    inner = (slice(None), slice(16, 24), slice(19, 29))  # inside the frame
    torch.testing.assert_close(out[:, :40, :48][inner], bicubic[inner])
    torch.testing.assert_close(out[:, :40, 48:][inner], sr[inner])
    # Below: the 10 x 12 centre repeated 4 x 4 (nearest neighbour).
    want = sr[:, 15:25, 18:30].repeat_interleave(4, 1).repeat_interleave(4, 2)
    torch.testing.assert_close(out[:, 40:, 48:], want)
    want = bicubic[:, 15:25, 18:30].repeat_interleave(4, 1).repeat_interleave(4, 2)
    torch.testing.assert_close(out[:, 40:, :48], want)
    red = torch.tensor(BOX)
    assert torch.equal(out[:, 15, 18:30].T, red.expand(12, 3))  # the frame's top edge
    assert torch.equal(out[:, 15:25, 48 + 29].T, red.expand(10, 3))  # SR's right edge


def test_bad_shapes_are_one_line():
    with pytest.raises(ValueError, match=r"expected \(3, h, w\) images"):
        side_by_side(torch.rand(1, 4, 4), torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="zoom must be >= 1"):
        side_by_side(torch.rand(3, 4, 4), torch.rand(3, 8, 8), zoom=0)
