import math

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
