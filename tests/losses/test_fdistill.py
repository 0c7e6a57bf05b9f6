"""f-distill's weighting of DMD's direction (Xu et al. 2025; NVlabs FastGen's f_distill.py)."""

import math

import pytest
import torch

from scoredistill import CFG, DMDLoss, FDistillLoss, f_distill_weight
from tests.losses.test_reference import SCALE, make
from tests.losses.test_sid import INDEX

# h(r) = f''(r) r^2 written out per divergence, r = p_data / p_student = exp(logit).
H = {"reverse_kl": lambda r: 1.0, "kl": lambda r: r, "js": lambda r: r / (1 + r),
     "squared_hellinger": lambda r: math.sqrt(r) / 2}
LOGIT = torch.tensor([-1.5, 0.3, 2.0])


def binned_ratio(logit, index, bins):
    """r, divided by the mean r of its sample's time bin (FastGen's ratio_normalization with
    EMA rate 0), written out per sample; bins None: r."""
    r = [math.exp(v) for v in logit.tolist()]
    if bins is None:
        return r
    ids = [int(i) * bins // 1000 for i in index]
    mean = {b: sum(x for x, c in zip(r, ids, strict=True) if c == b) / ids.count(b) for b in ids}
    return [x / mean[b] for x, b in zip(r, ids, strict=True)]


@pytest.mark.parametrize("divergence", sorted(H))
@pytest.mark.parametrize("kind", ["flow", "vp"])
@pytest.mark.parametrize("bins", [None, 2])
def test_direction_is_dmds_times_normalised_h(kind, divergence, bins):
    teacher, fake, z_hat, _, noise, cond, null = make(kind)
    inputs = {"teacher": CFG(teacher, SCALE, null), "fake": fake, "index": INDEX, "noise": noise}
    dmd = DMDLoss()(z_hat, cond, **inputs)
    logit = LOGIT.clone().requires_grad_(True)
    z = z_hat.clone().requires_grad_(True)
    out = FDistillLoss(divergence=divergence, time_bins=bins)(z, cond, logit=logit, **inputs)
    # INDEX = 25, 512, 970: with 2 bins the last two share one, so their r are normalised.
    h = torch.tensor([H[divergence](r) for r in binned_ratio(LOGIT, INDEX, bins)])
    want = (h / h.mean())[:, None] * dmd.grad
    torch.testing.assert_close(out.grad, want, rtol=1e-5, atol=1e-7)
    out.loss.backward()
    torch.testing.assert_close(z.grad, want / z.numel(), rtol=1e-5, atol=1e-9)
    assert logit.grad is None  # r is detached: the generator's loss does not train the head


def test_ratio_is_clamped_and_clipped():
    w = f_distill_weight("kl", torch.tensor([30.0, -30.0, 0.0]))
    r = torch.tensor([20.0, 0.1, 1.0])  # exp(10) clipped to 20, exp(-10) to 0.1
    torch.testing.assert_close(w, r / r.mean())
    w = f_distill_weight("kl", torch.tensor([1.0, 2.0]), low=0.5, high=3.0)
    r = torch.tensor([math.e, 3.0])
    torch.testing.assert_close(w, r / r.mean())
    assert not f_distill_weight("js", torch.zeros(2, requires_grad=True)).requires_grad


def test_bad_options_and_logits_are_refused():
    with pytest.raises(ValueError, match=r"FDistillLoss\(divergence=...\): unknown f-divergence"):
        FDistillLoss(divergence="hellinger")
    with pytest.raises(ValueError, match=r"FDistillLoss\(ratio_range=...\)"):
        FDistillLoss(ratio_range=(20.0, 0.1))
    teacher, fake, z_hat, _, _, cond, _ = make("flow")
    with pytest.raises(ValueError, match=r"logit must have shape \(3,\)"):
        FDistillLoss()(z_hat, cond, teacher=teacher, fake=fake, logit=torch.zeros(3, 1))
