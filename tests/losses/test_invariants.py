import pytest
import torch

from scoredistill import (
    CFG,
    DASMSampler,
    RectifiedFlow,
    SDSLoss,
    TSDLoss,
    TSMLoss,
    VSDLoss,
)
from tests.helpers import TinyNet


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(3)
    teacher = TinyNet("flow", RectifiedFlow(), seed=0)
    fake = TinyNet("flow", RectifiedFlow(), seed=1)
    z_hat, z, noise = torch.randn(3, 4, 6, generator=g).unbind(0)
    cond = torch.randn(4, 3, generator=g)
    fixed = dict(index=torch.tensor([50, 300, 700, 949]), noise=noise,
                 dasm_bias=torch.tensor([-25, 0, 10, 24]))
    return teacher, fake, z_hat, z, cond, fixed


DASM = DASMSampler()


def along(dasm, fixed):
    """The fixed draws a loss with ``dasm`` takes: no ``dasm_bias`` without a trajectory."""
    return fixed if dasm is not None else {k: v for k, v in fixed.items() if k != "dasm_bias"}


@pytest.mark.parametrize("dasm", [None, DASM])
def test_lambda_one_is_vsd_and_zero_is_tsm(setup, dasm):
    teacher, fake, z_hat, z, cond, fixed = setup
    kw = dict(teacher=teacher, fake=fake, z=z, **along(dasm, fixed))
    tsd1 = TSDLoss(lam=1.0, dasm=dasm)(z_hat, cond, **kw)
    tsd0 = TSDLoss(lam=0.0, dasm=dasm)(z_hat, cond, **kw)
    vsd = VSDLoss(dasm=dasm)
    torch.testing.assert_close(tsd1.grad, vsd(z_hat, cond, **vsd.select_inputs(**kw)).grad)
    tsm = TSMLoss(dasm=dasm)
    torch.testing.assert_close(tsd0.grad, tsm(z_hat, cond, **tsm.select_inputs(**kw)).grad)
    # And TSD is exactly the lambda-mix of the two terms it reports.
    tsd = TSDLoss(lam=0.7, dasm=dasm)(z_hat, cond, **kw)
    torch.testing.assert_close(tsd.grad, 0.7 * tsd.grads["vsd"] + 0.3 * tsd.grads["tsm"])


def test_shared_evaluations_one_teacher_call_per_point(setup):
    teacher, fake, z_hat, z, cond, fixed = setup
    TSDLoss(dasm=DASM)(z_hat, cond, teacher=teacher, fake=fake, z=z, **fixed)
    # Teacher on z_hat_t and z_t batched: 4 points x 1 call of batch 8; the fake 4 x batch 4.
    assert teacher.batch_sizes == [8] * 4 and fake.batch_sizes == [4] * 4


def test_tsm_vanishes_when_z_hat_equals_z(setup):
    teacher, fake, _, z, cond, fixed = setup
    kw = dict(index=fixed["index"], noise=fixed["noise"])
    out = TSMLoss()(z.clone(), cond, teacher=teacher, z=z, **kw)
    assert out.grad.abs().max() == 0 and float(out.loss) == 0
    assert TSMLoss()(z + 0.1, cond, teacher=teacher, z=z, **kw).grad.abs().max() > 1e-3
    # Along DASM, z_hat_t moves with the fake and z_t with the teacher (Alg. 1, lines 20-21):
    # the term vanishes only when both move alike.
    dasm = dict(dasm_bias=fixed["dasm_bias"], **kw)
    same = TSMLoss(dasm=DASM)(z.clone(), cond, teacher=teacher, fake=teacher, z=z, **dasm)
    assert same.grad.abs().max() == 0
    apart = TSMLoss(dasm=DASM)(z.clone(), cond, teacher=teacher, fake=fake, z=z, **dasm)
    assert apart.norms["tsm"][:, 0].max() == 0 and apart.norms["tsm"][:, 1:].min() > 0


@pytest.mark.parametrize("dasm", [None, DASM])
def test_vsd_vanishes_when_fake_equals_teacher(setup, dasm):
    teacher, _, z_hat, _z, cond, fixed = setup
    out = VSDLoss(dasm=dasm)(z_hat, cond, teacher=teacher, fake=teacher, **along(dasm, fixed))
    assert out.grad.abs().max() == 0


def test_dasm_with_one_point_equals_no_dasm(setup):
    teacher, fake, z_hat, z, cond, fixed = setup
    kw = dict(teacher=teacher, fake=fake, z=z, index=fixed["index"], noise=fixed["noise"])
    one = TSDLoss(dasm=DASMSampler(num_points=1, weights=(1.0,)))(
        z_hat, cond, dasm_bias=fixed["dasm_bias"], **kw)
    none = TSDLoss()(z_hat, cond, **kw)
    torch.testing.assert_close(one.grad, none.grad)
    torch.testing.assert_close(one.loss, none.loss)


def test_logging_outputs_per_point(setup):
    teacher, fake, z_hat, z, cond, fixed = setup
    out = TSDLoss(dasm=DASM)(z_hat, cond, teacher=teacher, fake=fake, z=z, **fixed)
    assert out.norms["vsd"].shape == out.norms["tsm"].shape == (4, 4)
    assert out.timesteps.shape == out.sigmas.shape == out.index.shape == (4, 4)
    # Per sample, timesteps fall (toward clean data) along the trajectory.
    assert bool((out.timesteps.diff(dim=1) < 0).all())
    # Point weights scale the norms: point 0 has weight 1, later ones 0.3.
    assert bool((out.norms["vsd"] > 0).all())


def test_same_generator_same_step_and_explicit_choices_override():
    teacher = TinyNet("flow", RectifiedFlow(), seed=0)
    fake = TinyNet("flow", RectifiedFlow(), seed=1)
    z_hat, z = torch.randn(2, 5, 6).unbind(0)
    loss = TSDLoss(dasm=DASM)
    a = loss(z_hat, None, teacher=teacher, fake=fake, z=z,
             generator=torch.Generator().manual_seed(11))
    b = loss(z_hat, None, teacher=teacher, fake=fake, z=z,
             generator=torch.Generator().manual_seed(11))
    c = loss(z_hat, None, teacher=teacher, fake=fake, z=z,
             generator=torch.Generator().manual_seed(12))
    torch.testing.assert_close(a.grad, b.grad)
    assert not torch.equal(a.index, c.index)
    # Per sample indices: samples in a batch get different start indices.
    assert len(set(a.index[:, 0].tolist())) > 1


def test_sds_needs_no_fake_and_refuses_dasm(setup):
    teacher, _, z_hat, _, cond, fixed = setup
    kw = {k: v for k, v in fixed.items() if k != "dasm_bias"}
    assert SDSLoss()(z_hat, cond, teacher=teacher, **kw).loss > 0
    with pytest.raises(ValueError, match="no DASM"):
        SDSLoss(dasm=DASM)(z_hat, cond, teacher=teacher, **kw)


def test_cfg_wrapped_models_work_with_the_shared_call(setup):
    teacher, fake, z_hat, z, cond, fixed = setup
    null = torch.zeros(1, 3)
    out = TSDLoss(dasm=DASM)(z_hat, cond, teacher=CFG(teacher, 7.5, null),
                             fake=CFG(fake, 7.5, null), z=z, **fixed)
    assert teacher.batch_sizes == [16] * 4 and torch.isfinite(out.loss)


class TestBadInput:
    def call(self, setup, **over):
        teacher, fake, z_hat, z, cond, fixed = setup
        kw = dict(teacher=teacher, fake=fake, z=z, **fixed)
        kw.update(over)
        z_hat = kw.pop("z_hat", z_hat)
        cond = kw.pop("cond", cond)
        return TSDLoss(dasm=kw.pop("dasm", DASM), lam=kw.pop("lam", 0.7))(z_hat, cond, **kw)

    @pytest.mark.parametrize(("over", "match"), [
        (dict(z=torch.zeros(4, 5)), r"z has shape \(4, 5\) but z_hat has \(4, 6\)"),
        (dict(z=torch.zeros(4, 6, dtype=torch.float64)), "z has dtype torch.float64"),
        (dict(z=torch.zeros(4, 6, device="meta")), "z is on meta"),
        (dict(cond=torch.zeros(2, 3)), "does not have batch 4"),
        (dict(noise=torch.zeros(4, 7)), "noise has shape"),
        (dict(index=torch.tensor([1.0, 2, 3, 4])), "index must be an integer tensor"),
        (dict(index=torch.tensor([1, 2])), r"index must be .* shape \(4,\)"),
        (dict(z_hat=torch.full((4, 6), float("nan"))), "non-finite values in z_hat"),
        (dict(z=torch.full((4, 6), float("inf"))), "non-finite values in z"),
        (dict(fake=None), "needs a fake-score model"),
        (dict(z=None), "needs the target latent"),
        (dict(index=torch.tensor([50, 300, 700, 998])), "sample 3 from index 998"),
        (dict(dasm=DASMSampler(clamp=False)), "runs past the end of the schedule for sample 3"),
        (dict(index=torch.tensor([50, 300, 700, 1000])), r"out of range|stay in \[0, 999\]"),
    ])
    def test_clear_errors(self, setup, over, match):
        with pytest.raises(ValueError, match=match):
            self.call(setup, **over)

    @pytest.mark.parametrize("lam", [-0.1, 1.5])
    def test_lambda_outside_unit_interval(self, lam):
        with pytest.raises(ValueError, match=r"lambda must be in \[0, 1\]"):
            TSDLoss(lam=lam)

    def test_teacher_and_fake_must_share_a_schedule(self, setup):
        teacher, _, z_hat, z, cond, fixed = setup
        other = TinyNet("flow", RectifiedFlow(shift=1.0), seed=1)
        with pytest.raises(ValueError, match="share one noise schedule"):
            TSDLoss()(z_hat, cond, teacher=teacher, fake=other, z=z, index=fixed["index"])
