"""DMD2's two-time-scale update: N fake-score updates per generator update."""

import pytest
import torch

from examples.tsdsr.train import main
from examples.tsdsr.training import models
from examples.tsdsr.training.config import TrainConfig, parse_config
from scoredistill.sr.loading import load_prompts

pytestmark = pytest.mark.usefixtures("random_tiny_backbone")


def test_fake_only_steps_leave_the_student_and_train_the_fake_score(one_image):
    from accelerate import Accelerator

    from examples.tsdsr.train import optimisation
    from examples.tsdsr.training.step import Losses, train_step

    prompts = load_prompts(one_image / "embeds")
    config = parse_config(["--tiny", "--student-rank", "2", "--fake-rank", "2", "--vae-rank",
                           "2", "--lr-warmup-steps", "0", "--fake-updates-per-generator", "3"])
    built = models.build_models(config, torch.float32, torch.device("cpu"))
    student = optimisation(built.student_parameters(), config.lr, config, 1)
    fake = optimisation(built.fake_parameters(), config.lr_fake, config, 1)
    hq = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    batch = {"hq": hq, "lq": hq.clone(),
             **{k: v.expand(2, *v.shape[1:]) for k, v in prompts["default"].items()}}
    s0 = [p.detach().clone() for p in student.params]
    f0 = [p.detach().clone() for p in fake.params]
    logs = train_step(Accelerator(cpu=True), built, Losses.from_config(config), config, batch,
                      prompts, student, fake, torch.Generator().manual_seed(0),
                      update_generator=False)
    assert "loss/generator" not in logs and logs["skipped/generator"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(s0, student.params, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(f0, fake.params, strict=True))
    assert all(p.grad is None for p in student.params)


def test_the_ratio_is_validated(capsys):
    with pytest.raises(SystemExit) as exit_info:  # refused at parse time, one line
        parse_config(["--tiny", "--fake-updates-per-generator", "0"])
    assert exit_info.value.code == 2
    assert "--fake-updates-per-generator" in capsys.readouterr().err
    with pytest.raises(ValueError, match="fake_updates_per_generator"):
        TrainConfig(fake_updates_per_generator=0)


def test_train_loop_alternates_and_logs_fake_only_steps(one_image, tmp_path):
    assert main(["--tiny", "--hq-dir", str(one_image / "hq"),
                 "--embeds-dir", str(one_image / "embeds"),
                 "--output-dir", str(tmp_path), "--max-steps", "2", "--log-every", "1",
                 "--validate-every", "100", "--report-to", "none", "--student-rank", "2",
                 "--fake-rank", "2", "--vae-rank", "2", "--fake-updates-per-generator",
                 "2"]) == 0
