import math

import numpy as np
import pytest
import torch

from scoredistill import LogitNormalIndex, ModeIndex, UniformIndex


def test_uniform_range_and_seed():
    s = UniformIndex()
    idx = s(20_000, 1000, generator=torch.Generator().manual_seed(0))
    assert idx.dtype == torch.int64 and int(idx.min()) == 50 and int(idx.max()) == 949
    assert torch.equal(idx, s(20_000, 1000, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="not inside"):
        UniformIndex(0, 2000)(1, 1000)


def test_logit_normal_matches_its_density():
    idx = LogitNormalIndex()(200_000, 1000, generator=torch.Generator().manual_seed(0))
    u = (idx.double() + 0.5) / 1000
    logit = torch.log(u / (1 - u))
    assert abs(float(logit.mean())) < 0.02 and abs(float(logit.std()) - 1) < 0.02


def test_mode_sampling_matches_diffusers_formula():
    diffusers = pytest.importorskip("diffusers.training_utils")
    torch.manual_seed(0)
    ref = diffusers.compute_density_for_timestep_sampling("mode", 10, mode_scale=1.29)
    ours = ModeIndex(1.29)(10, 1000, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    assert ours.tolist() == (ref * 1000).long().tolist()
    # scale 0 is uniform over the table.
    idx = ModeIndex(0.0)(100_000, 1000, generator=torch.Generator().manual_seed(1))
    assert abs(float(idx.double().mean()) - 499.5) < 3 * 288.7 / math.sqrt(100_000) * 2


@pytest.mark.parametrize(("build", "words"), [
    (lambda: LogitNormalIndex(mean=math.nan), "LogitNormalIndex mean must be a finite number"),
    (lambda: LogitNormalIndex(std=math.inf), "LogitNormalIndex std must be a finite number"),
    (lambda: LogitNormalIndex(std=0.0), "LogitNormalIndex std must be > 0"),
    (lambda: ModeIndex(scale=math.nan), "ModeIndex scale must be a finite number"),
    (lambda: ModeIndex(scale=2.0), "ModeIndex scale must be in [-1, 2 / (pi - 2)"),
    (lambda: ModeIndex(scale=-1.5), "ModeIndex scale must be in [-1"),
    (lambda: UniformIndex(low=math.nan), "UniformIndex low must be a finite integer"),
    (lambda: UniformIndex(high=950.0), "UniformIndex high must be a finite integer"),
    (lambda: UniformIndex(500, 500), "is empty"),
    (lambda: UniformIndex(-1, 10), "below 0"),
])
def test_non_finite_or_meaningless_parameters_are_refused(build, words):
    # LogitNormalIndex(mean=nan) and ModeIndex(scale=nan) drew index 0 for every sample.
    with pytest.raises(ValueError) as info:
        build()
    assert words in str(info.value)


def test_mode_scale_range_ends_are_densities():
    for scale in (-1.0, 2 / (math.pi - 2)):
        u = torch.linspace(0, 1, 10_001, dtype=torch.float64)
        f = 1 - u - scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        assert float(f.diff().max()) <= 1e-12 and float(f.min()) >= -1e-12
        ModeIndex(scale)(4, 1000, generator=torch.Generator().manual_seed(0))
    assert ModeIndex(np.float64(1.29)).scale == 1.29
