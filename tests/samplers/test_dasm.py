import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from scoredistill import DASMSampler


@given(st.lists(st.integers(0, 949), min_size=1, max_size=6), st.data())
def test_points_follow_the_paper_per_sample(starts, data):
    dasm = DASMSampler()
    bias = data.draw(st.lists(st.integers(-25, 24), min_size=len(starts), max_size=len(starts)))
    points = dasm.indices(torch.tensor(starts), 1000, torch.tensor(bias))
    assert points.shape == (len(starts), 4)
    for b, (i, bb) in enumerate(zip(starts, bias, strict=True)):
        end = min(i + 4 * 50 + bb, 999)
        # floor(linspace(i, end, N + 1))[:N], written out; each sample from its own index.
        assert points[b].tolist() == [math.floor(i + (end - i) * k / 4) for k in range(4)]


def test_batch_samples_keep_their_own_start():
    points = DASMSampler().indices(torch.tensor([50, 900]), 1000, torch.tensor([0, 0]))
    assert points.tolist() == [[50, 100, 150, 200], [900, 924, 949, 974]]


def test_bias_draws_are_seeded_and_in_range():
    dasm = DASMSampler()
    a = dasm.draw_bias(2000, generator=torch.Generator().manual_seed(0))
    b = dasm.draw_bias(2000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and int(a.min()) == -25 and int(a.max()) == 24


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(num_points=0), "num_points >= 1"),
    (dict(num_points=3), "3 points but 4 weights"),
    (dict(bias=(5, 5)), "is empty"),
    (dict(weights=(1.0, math.nan, 0.3, 0.3)), "DASM weight 1 must be a finite number"),
    (dict(weights=(1.0, 0.3, -0.3, 0.3)), "DASM weight 2 is -0.3"),
    (dict(step=50.0), "DASM step must be a finite integer"),
    (dict(num_points=math.inf), "DASM num_points must be a finite integer"),
    (dict(bias=(-25.5, 25)), "DASM bias low must be a finite integer"),
    (dict(bias=(-25,)), "must be a range"),
    (dict(clamp="no"), "clamp must be True or False"),
])
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DASMSampler(**kwargs)


def test_past_the_end_is_an_error_without_clamp_and_collapsed_points_always():
    with pytest.raises(ValueError, match="sample 1: index 900"):
        DASMSampler(clamp=False).indices(torch.tensor([10, 900]), 1000, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="strictly increase"):
        DASMSampler().indices(torch.tensor([997]), 1000, torch.tensor([0]))
    with pytest.raises(ValueError, match="must both be"):
        DASMSampler().indices(torch.tensor([1, 2]), 1000, torch.tensor([0]))
