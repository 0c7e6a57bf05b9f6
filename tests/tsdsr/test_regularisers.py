"""--regulariser: TSD-SR's generator trained with another score-distillation loss in place of TSD
(examples/tsdsr/training/regularisers.py), on the tiny preset on the CPU."""

import json
import math

import pytest
import torch

from examples.tsdsr.models.tiny import random_backbone
from examples.tsdsr.precompute import precompute
from examples.tsdsr.train import main, optimisation
from examples.tsdsr.training import models
from examples.tsdsr.training.checkpoint import checkpoints, read_state
from examples.tsdsr.training.config import TrainConfig, parse_config
from examples.tsdsr.training.regularisers import REGULARISERS, WITH_DASM, Regulariser
from examples.tsdsr.training.step import Losses, train_step
from scoredistill import (
    CFG,
    DASMSampler,
    DecoupledDMDLoss,
    DMDLoss,
    SiDLoss,
    SIMLoss,
    TSDLoss,
    UniformIndex,
    VSDLoss,
)
from scoredistill.sr.imageio import save_png
from scoredistill.sr.loading import load_prompts

SMALL = ["--tiny", "--student-rank", "2", "--fake-rank", "2", "--vae-rank", "2"]


def flags(name):
    """The flags that train with ``name`` (DASM off where it has none)."""
    return ["--regulariser", name, *([] if name in WITH_DASM else ["--no-use-dasm"])]


@pytest.fixture(autouse=True)
def random_tiny_backbone(monkeypatch):
    monkeypatch.setattr(models, "load_backbone", lambda pretrained, dtype, device:
                        random_backbone("tiny", dtype=dtype, device=device))


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
    """Per choice, the regulariser's gradient equals its library loss called by hand (index
    range and DASM from the config; the fake score guided for TSD/VSD only); all differ."""
    index = UniformIndex(50, 950)
    dasm = DASMSampler(4, 50, (1.0, 0.3, 0.3, 0.3), (-25, 25))
    expected = {  # name: (loss, fake guided)
        "tsd": (TSDLoss(lam=0.7, space="flow", dasm=dasm, index_sampler=index), True),
        "vsd": (VSDLoss(space="flow", dasm=dasm, index_sampler=index), True),
        "dmd": (DMDLoss(dasm=dasm, index_sampler=index), False),
        "sid": (SiDLoss(alpha=1.0, index_sampler=index), False),
        "sim": (SIMLoss(c=1.0, index_sampler=index), False),
        "decoupled-dmd": (DecoupledDMDLoss(dm_index_sampler=index, ca_index_sampler=index),
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
    batch = batch_of(load_prompts(data / "embeds"))
    cond = {k: batch[k] for k in ("prompt_embeds", "pooled_projections")}
    z_hat, z = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    grads = {}
    for name in REGULARISERS:
        reg = Regulariser.from_config(parse_config([*SMALL, *flags(name), "--cfg-scale", "2"]))
        out = reg(z_hat, cond, z, teacher=roles.teacher, fake=roles.fake, cfg_scale=2.0,
                  null=null, generator=torch.Generator().manual_seed(0))
        loss, guided = expected[name]
        fake = CFG(roles.fake, 2.0, null) if guided else roles.fake
        ref = loss(z_hat, cond, **loss.select_inputs(teacher=CFG(roles.teacher, 2.0, null),
                                                     fake=fake, z=z),
                   generator=torch.Generator().manual_seed(0))
        assert out.grad.abs().sum() > 0, name
        torch.testing.assert_close(out.grad, ref.grad, msg=name)
        grads[name] = out.grad
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
    losses, accelerator = Losses.from_config(config), Accelerator(cpu=True)
    for step in range(2):
        logs = train_step(accelerator, built, losses, config, batch_of(prompts, step), prompts,
                          student, fake, torch.Generator().manual_seed(step))
        assert logs["skipped/generator"] == logs["skipped/fake"] == 0.0
        assert all(math.isfinite(logs[k]) for k in ("loss/reg", "loss/generator", "loss/fake"))
    assert logs["loss/generator"] == logs["loss/reg"]  # nothing else in the objective
    assert any(not torch.equal(a, p) for a, p in zip(before, student.params, strict=True))


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
