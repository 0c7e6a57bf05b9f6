"""--regulariser: TSD-SR's generator trained with another score-distillation loss in place of TSD
(examples/tsdsr/training/regularisers.py), on the tiny preset on the CPU."""

import json
import math
import shutil

import pytest
import torch

from examples.tsdsr.precompute import precompute
from examples.tsdsr.train import main, optimisation
from examples.tsdsr.training import models
from examples.tsdsr.training.checkpoint import checkpoints, read_state
from examples.tsdsr.training.config import REGULARISERS, WITH_DASM, TrainConfig, parse_config
from examples.tsdsr.training.regularisers import GAN_WEIGHT, Regulariser
from examples.tsdsr.training.step import Losses, train_step
from scoredistill import (
    CFG,
    DASMSampler,
    DecoupledDMDLoss,
    DiscriminatorHead,
    DMDLoss,
    FDistillLoss,
    GANTerm,
    SiDLoss,
    SIMLoss,
    TSDLoss,
    UniformIndex,
    VSDLoss,
)
from scoredistill.sr.imageio import save_png
from scoredistill.sr.loading import load_prompts
from tests.tsdsr.test_train import weights

SMALL = ["--tiny", "--student-rank", "2", "--fake-rank", "2", "--vae-rank", "2"]


def flags(name):
    """The flags that train with ``name`` (DASM off where it has none)."""
    return ["--regulariser", name, *([] if name in WITH_DASM else ["--no-use-dasm"])]


pytestmark = pytest.mark.usefixtures("random_tiny_backbone")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("regularisers")
    (root / "hq").mkdir()
    g = torch.Generator().manual_seed(0)
    for name in "ab":
        save_png(torch.rand(3, 64, 64, generator=g), root / "hq" / f"{name}.png")
    precompute(root / "hq", root / "embeds")
    return root


def batch_of(prompts, seed=1):
    hq = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    return {"hq": hq, "lq": hq.clone(),
            **{k: v.expand(2, *v.shape[1:]) for k, v in prompts["default"].items()}}


def test_each_choice_is_the_library_loss_called_as_its_authors_call_it(data):
    """Per choice, the regulariser's loss and gradient equal its library loss called by hand
    (index range and DASM from the config; the fake score guided for TSD/VSD only; the head on
    the teacher's features for f-distill, the fake score's for DMD2); all differ."""
    index = UniformIndex(50, 950)
    dasm = DASMSampler(4, 50, (1.0, 0.3, 0.3, 0.3), (-25, 25))
    fastgen = GANTerm(weight=GAN_WEIGHT, role="teacher", index_sampler=None)
    expected = {  # name: (loss, fake guided)
        "tsd": (TSDLoss(lam=0.7, space="flow", dasm=dasm, index_sampler=index), True),
        "vsd": (VSDLoss(space="flow", dasm=dasm, index_sampler=index), True),
        "dmd": (DMDLoss(dasm=dasm, index_sampler=index), False),
        "sid": (SiDLoss(alpha=1.0, index_sampler=index), False),
        "sim": (SIMLoss(c=1.0, index_sampler=index), False),
        "decoupled-dmd": (DecoupledDMDLoss(dm_index_sampler=index, ca_index_sampler=index),
                          False),
        "f-kl": (FDistillLoss(divergence="kl", dasm=dasm, index_sampler=index, gan=fastgen,
                              time_bins=None), False),
        "f-js": (FDistillLoss(divergence="js", dasm=dasm, index_sampler=index, gan=fastgen,
                              time_bins=None), False),
        "dmd2-gan": (DMDLoss(dasm=dasm, index_sampler=index, gan=GANTerm(weight=GAN_WEIGHT)),
                     False),
    }
    assert set(expected) == set(REGULARISERS)
    config = parse_config(SMALL)
    built = models.build_models(config, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a fake score that differs from the teacher (else VSD's part is 0)
        for p in built.fake_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    roles, null = built.roles, load_prompts(data / "embeds")["null"]
    torch.manual_seed(4)
    head = DiscriminatorHead.for_model(roles.fake)
    batch = batch_of(load_prompts(data / "embeds"))
    cond = {k: batch[k] for k in ("prompt_embeds", "pooled_projections")}
    z_hat = torch.randn(2, 16, 8, 8, generator=g).requires_grad_(True)
    z = torch.randn(2, 16, 8, 8, generator=g)
    grads = {}
    for name in REGULARISERS:
        reg = Regulariser.from_config(parse_config([*SMALL, *flags(name), "--cfg-scale", "2"]))
        out = reg(z_hat, cond, z, teacher=roles.teacher, fake=roles.fake, cfg_scale=2.0,
                  null=null, generator=torch.Generator().manual_seed(0), head=head)
        loss, guided = expected[name]
        fake = CFG(roles.fake, 2.0, null) if guided else roles.fake
        inputs = loss.select_inputs(teacher=CFG(roles.teacher, 2.0, null), fake=fake, z=z)
        if getattr(loss, "gan", None) is not None:
            inputs["head"] = head
        ref = loss(z_hat, cond, **inputs, generator=torch.Generator().manual_seed(0))
        # d loss / d z_hat: the direction's and (f-distill, DMD2) the GAN term's.
        (grads[name],), (want,) = (torch.autograd.grad(o.loss, z_hat) for o in (out, ref))
        assert grads[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], want, msg=name)
        torch.testing.assert_close(out.loss, ref.loss, msg=name)
    for a in REGULARISERS:
        for b in REGULARISERS:
            assert a == b or not torch.allclose(grads[a], grads[b]), (a, b)


@pytest.mark.parametrize("name", REGULARISERS)
def test_the_regulariser_alone_trains_the_student(name, data):
    """Two steps with LPIPS, the latent MSE and weight decay off: the student's LoRA moves only
    if the regulariser's gradient reaches it (at step 1 the fake score still equals the teacher,
    so all but TSD's TSM part are 0 there; step 1's fake update makes them differ)."""
    from accelerate import Accelerator

    config = parse_config([*SMALL, *flags(name), "--lpips-weight", "0", "--mse-weight", "0",
                           "--weight-decay", "0", "--lr-warmup-steps", "0"])
    built = models.build_models(config, torch.float32, torch.device("cpu"))
    prompts = load_prompts(data / "embeds")
    student = optimisation(built.student_parameters(), config.lr, config, 1)
    fake = optimisation(built.fake_parameters(), config.lr_fake, config, 1)
    before = [p.detach().clone() for p in student.params]
    heads = [] if built.head is None else [p.detach().clone() for p in built.head.parameters()]
    assert (built.head is not None) == (name in ("f-kl", "f-js", "dmd2-gan"))
    losses, accelerator = Losses.from_config(config), Accelerator(cpu=True)
    for step in range(2):
        logs = train_step(accelerator, built, losses, config, batch_of(prompts, step), prompts,
                          student, fake, torch.Generator().manual_seed(step))
        assert logs["skipped/generator"] == logs["skipped/fake"] == 0.0
        assert all(math.isfinite(logs[k]) for k in ("loss/reg", "loss/generator", "loss/fake",
                                                     *(["loss/head"] if heads else [])))
    assert logs["loss/generator"] == logs["loss/reg"]  # nothing else in the objective
    assert any(not torch.equal(a, p) for a, p in zip(before, student.params, strict=True))
    # The head learns in the fake score's update (DMD2), every parameter of it.
    assert all(not torch.equal(a, p) for a, p in zip(heads, built.head.parameters() if heads
                                                      else [], strict=True))


def test_the_cli_trains_with_a_regulariser_and_records_it(data, tmp_path, capsys):
    """--regulariser reaches the run's config.json and each checkpoint's config; a resume that
    changes it is refused (resume.py) with one line naming the flag."""
    run = [*SMALL, "--hq-dir", str(data / "hq"), "--embeds-dir", str(data / "embeds"),
           "--output-dir", str(tmp_path), "--max-steps", "2", "--report-to", "none",
           "--validate-every", "100", "--lr-warmup-steps", "0"]
    assert main([*run, *flags("sid")]) == 0
    assert json.loads((tmp_path / "config.json").read_text())["regulariser"] == "sid"
    (last,) = checkpoints(tmp_path / "checkpoints")
    assert read_state(last)["config"]["regulariser"] == "sid"
    capsys.readouterr()
    assert main([*run, "--max-steps", "3", "--resume", "latest", "--regulariser", "dmd",
                 "--no-use-dasm"]) == 2
    assert "--regulariser sid -> dmd. Drop them" in capsys.readouterr().err


def test_bad_choices_are_one_line_each(capsys):
    with pytest.raises(SystemExit) as exit_info:  # refused at parse time, naming the choices
        parse_config(["--regulariser", "sds"])
    assert exit_info.value.code == 2
    assert "--regulariser" in capsys.readouterr().err
    with pytest.raises(ValueError, match="regulariser must be one of tsd, vsd, dmd, sid"):
        TrainConfig(regulariser="sds")
    with pytest.raises(ValueError, match=r"regulariser sid has no DASM trajectory .*"
                                         r"--no-use-dasm"):
        TrainConfig(regulariser="sid")
    with pytest.raises(ValueError, match=r"tsd_lambda 0\.5 is read by --regulariser tsd only"):
        TrainConfig(regulariser="dmd", tsd_lambda=0.5)
    with pytest.raises(ValueError, match="tsd_space 'epsilon' is read by --regulariser tsd or "
                                         "vsd only, not sim"):
        TrainConfig(regulariser="sim", use_dasm=False, tsd_space="epsilon")
    assert TrainConfig().regulariser == "tsd"  # the paper's
    assert TrainConfig(regulariser="vsd", tsd_space="epsilon").use_dasm


def test_a_resumed_run_with_a_head_matches_the_uninterrupted_one(data, tmp_path):
    """dmd2-gan: the head's weights and its optimiser state are in each checkpoint, so a run
    resumed at step 1 ends bit-identical to the one that ran 2 steps straight."""
    run = [*SMALL, *flags("dmd2-gan"), "--hq-dir", str(data / "hq"), "--embeds-dir",
           str(data / "embeds"), "--max-steps", "2", "--checkpoint-every", "1",
           "--report-to", "none", "--validate-every", "100", "--lr-warmup-steps", "0"]
    assert main([*run, "--output-dir", str(tmp_path / "straight")]) == 0
    _, final = checkpoints(tmp_path / "straight" / "checkpoints")
    assert "head.safetensors" in {f.name for f in final.iterdir()}
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed)
    shutil.rmtree(resumed / "checkpoints" / final.name)
    assert main([*run, "--output-dir", str(resumed), "--resume", "latest"]) == 0
    (_, again) = checkpoints(resumed / "checkpoints")
    a, b = weights(final), weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    moments = [_tensors(read_state(c)["fake_optimizer"]) for c in (final, again)]
    assert len(moments[0]) > 0 and all(torch.equal(x, y) for x, y in zip(*moments, strict=True))


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for k in sorted(tree, key=str) for t in _tensors(tree[k])]
    if isinstance(tree, list | tuple):
        return [t for v in tree for t in _tensors(v)]
    return []
