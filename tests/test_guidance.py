import pytest
import torch

from scoredistill import CFG, RectifiedFlow
from tests.helpers import TinyNet


def test_cfg_is_one_batched_call_and_matches_two_calls():
    net = TinyNet("flow", RectifiedFlow())
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
    null = torch.randn(1, 3, generator=g)
    t = torch.tensor([1000.0, 700.0, 300.0, 20.0])
    guided = CFG(net, scale=7.5, null_cond=null)
    out = guided(x, t, c)
    assert net.calls == 1 and net.batch_sizes == [8]
    ref = net(x, t, null.expand(4, 3)) + 7.5 * (net(x, t, c) - net(x, t, null.expand(4, 3)))
    torch.testing.assert_close(out, ref)
    assert guided.prediction == "flow" and guided.schedule == RectifiedFlow()


def test_cfg_scale_one_skips_the_null_branch():
    net = TinyNet("flow", RectifiedFlow())
    x, c, t = torch.randn(2, 6), torch.randn(2, 3), torch.full((2,), 500.0)
    torch.testing.assert_close(CFG(net, 1.0, torch.zeros(1, 3))(x, t, c), net(x, t, c))
    assert net.batch_sizes[0] == 2


def test_cfg_rejects_a_null_cond_of_another_batch():
    net = TinyNet("flow", RectifiedFlow())
    with pytest.raises(ValueError, match="null_cond has batch 3"):
        CFG(net, 7.5, torch.zeros(3, 3))(torch.randn(2, 6), torch.ones(2), torch.zeros(2, 3))
