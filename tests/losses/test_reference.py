"""Each loss's gradient w.r.t. z_hat against a slow, explicit, loop-by-loop reference.

The reference follows TSD-SR Alg. 1 and Eqs. (3)-(6) sample by sample and point by point, with
CFG written out as two calls and the noise levels read from diffusers' own scheduler tables.
"""

import math

import pytest
import torch

from scoredistill import (
    CFG,
    DASMSampler,
    RectifiedFlow,
    SDSLoss,
    TSDLoss,
    TSMLoss,
    VariancePreserving,
    VSDLoss,
)
from tests.helpers import TinyNet

diffusers = pytest.importorskip("diffusers")
B, D, SCALE = 3, 6, 7.5


def levels(schedule_name: str, index: int) -> tuple[float, float, float]:
    """(t, alpha, sigma) at a sampling-order index, from diffusers' tables."""
    if schedule_name == "flow":
        s = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        sigma = float(s.sigmas[index])
        return float(s.timesteps[index]), 1 - sigma, sigma
    s = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = 999 - index
    abar = float(s.alphas_cumprod[t])
    return float(t), math.sqrt(abar), math.sqrt(1 - abar)


def guided(net, x, t, c, null):
    """CFG by two explicit calls on one sample."""
    tt = torch.tensor([t])
    uncond = net(x[None], tt, null)[0]
    return uncond + SCALE * (net(x[None], tt, c[None])[0] - uncond)


def reference_grad(kind, terms, teacher, fake, z_hat, z, cond, null, noise, index, bias,
                   n_points, step, weights):
    """g = sum_k w_k sigma_k^2 sum_term mix_term * diff_term, Alg. 1 with Eq. (6) steps."""
    grads = torch.zeros_like(z_hat)
    for b in range(z_hat.shape[0]):
        i = int(index[b])
        end = min(i + n_points * step + int(bias[b]), 999)
        pts = [math.floor(i + (end - i) * k / n_points) for k in range(n_points)]
        _, a0, s0 = levels(kind, pts[0])
        zh_t = a0 * z_hat[b] + s0 * noise[b]
        z_t = a0 * z[b] + s0 * noise[b]
        for k, p in enumerate(pts):
            t, a, s = levels(kind, p)
            psi_hat = guided(teacher, zh_t, t, cond[b], null)
            psi = guided(teacher, z_t, t, cond[b], null)
            phi_hat = guided(fake, zh_t, t, cond[b], null)
            diff = {"vsd": psi_hat - phi_hat, "tsm": psi_hat - psi}
            if "sds" in terms:
                # The exact prediction for (z_hat, noise): noise itself, or eps - x0 for flow.
                diff["sds"] = psi_hat - (noise[b] - z_hat[b] if kind == "flow" else noise[b])
            grads[b] += weights[k] * s**2 * sum(c * diff[term] for term, c in terms.items())
            if k + 1 < n_points:
                _, a1, s1 = levels(kind, pts[k + 1])
                if kind == "flow":  # Eq. (6)
                    zh_t = zh_t + (s1 - s) * phi_hat
                    z_t = z_t + (s1 - s) * psi
                else:  # DDIM with epsilon predictions
                    zh_t = a1 * (zh_t - s * phi_hat) / a + s1 * phi_hat
                    z_t = a1 * (z_t - s * psi) / a + s1 * psi
    return grads


def make(kind):
    sched, pred = (RectifiedFlow(), "flow") if kind == "flow" else (VariancePreserving(), "epsilon")
    g = torch.Generator().manual_seed(7)
    z_hat, z, noise = torch.randn(3, B, D, generator=g).unbind(0)
    cond, null = torch.randn(B, 3, generator=g), torch.randn(1, 3, generator=g)
    return (TinyNet(pred, sched, seed=0), TinyNet(pred, sched, seed=1), z_hat, z, noise, cond,
            null)


CASES = {
    "tsd+dasm": (lambda: TSDLoss(lam=0.7, dasm=DASMSampler()), {"vsd": 0.7, "tsm": 0.3}, True),
    "tsd": (lambda: TSDLoss(lam=0.3), {"vsd": 0.3, "tsm": 0.7}, False),
    "vsd+dasm": (lambda: VSDLoss(dasm=DASMSampler(num_points=3, step=40,
                                                  weights=(1.0, 0.5, 0.2))),
                 {"vsd": 1.0}, True),
    "tsm": (lambda: TSMLoss(), {"tsm": 1.0}, False),
    "sds": (lambda: SDSLoss(), {"sds": 1.0}, False),
}


@pytest.mark.parametrize("kind", ["flow", "vp"])
@pytest.mark.parametrize("case", list(CASES))
def test_gradient_equals_explicit_reference(kind, case):
    build, terms, _use_dasm = CASES[case]
    loss_fn = build()
    teacher, fake, z_hat, z, noise, cond, null = make(kind)
    # Per-sample start indices, one running into the end of the schedule (clamped to 999).
    index, bias = torch.tensor([60, 480, 930]), torch.tensor([-25, 3, 24])
    z_hat = z_hat.requires_grad_(True)
    out = loss_fn(z_hat, cond, index=index, noise=noise, **loss_fn.select_inputs(
        teacher=CFG(teacher, SCALE, null), fake=CFG(fake, SCALE, null), z=z, dasm_bias=bias))
    out.loss.backward()

    dasm = loss_fn.dasm or DASMSampler(num_points=1, weights=(1.0,))
    ref = reference_grad(kind, terms, teacher, fake, z_hat.detach(), z, cond, null, noise, index,
                         bias, dasm.num_points, dasm.step, dasm.weights)
    torch.testing.assert_close(out.grad, ref, rtol=2e-5, atol=2e-6)
    # The surrogate turns g into d loss / d z_hat = g / numel (TSD-SR release: a mean MSE).
    torch.testing.assert_close(z_hat.grad * z_hat.numel(), ref, rtol=1e-4, atol=1e-5)
    # Timesteps reported per sample and point are the reference's.
    for b in range(B):
        for k in range(dasm.num_points):
            t_ref = levels(kind, int(out.index[b, k]))[0]
            assert abs(float(out.timesteps[b, k]) - t_ref) < 2e-4
    assert out.index[:, 0].tolist() == index.tolist()


def test_x0_space_flips_the_sign_so_descent_moves_toward_the_teacher():
    teacher, fake, z_hat, _z, noise, cond, _null = make("flow")
    kw = dict(teacher=teacher, fake=fake, index=torch.tensor([100, 400, 800]), noise=noise)
    v = VSDLoss(time_weighting="uniform")(z_hat, cond, **kw)
    x0 = VSDLoss(time_weighting="uniform", space="x0")(z_hat, cond, **kw)
    # u = eps - x0 at fixed x_t: delta x0 = -sigma * delta u; the x0 form negates that difference.
    sigma = v.sigmas[:, 0, None]
    torch.testing.assert_close(x0.grad, sigma * v.grad, rtol=1e-5, atol=1e-6)
