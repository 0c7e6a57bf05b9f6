"""TrainConfig: the release's defaults, the tiny preset, config files and CLI overrides."""

import json

import pytest

from examples.tsdsr.training.config import TINY_PRESET, TrainConfig, build_parser, parse_config


def test_defaults_are_the_papers():
    c = parse_config([])
    assert (c.lr, c.lr_fake, c.weight_decay, c.adam_eps, c.max_grad_norm) == (
        5e-6, 1e-6, 1e-4, 1e-8, 1.0)
    assert (c.adam_beta1, c.adam_beta2, c.seed, c.batch_size, c.max_steps) == (
        0.9, 0.999, 43, 2, 200_000)
    assert (c.cfg_scale, c.tsd_lambda, c.gamma, c.index_low, c.index_high) == (
        7.5, 0.7, 1.0, 50, 950)
    assert c.use_dasm and (c.dasm_points, c.dasm_step) == (4, 50)
    assert c.dasm_weights == (1.0, 0.3, 0.3, 0.3) and c.dasm_bias == (-25, 25)
    assert (c.lr_scheduler, c.lr_warmup_steps, c.mixed_precision) == (
        "cosine_with_restarts", 3000, "fp16")
    assert (c.student_rank, c.fake_rank, c.vae_rank, c.resolution) == (64, 64, 64, 512)


def test_file_then_cli_overrides(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"lr": 1e-4, "use_dasm": False, "dasm_weights": [1, 0.5]}))
    c = parse_config(["--config", str(path), "--lr", "2e-4", "--tiny"])
    assert c.lr == 2e-4  # CLI beats the file
    assert not c.use_dasm and c.dasm_weights == (1, 0.5)  # file beats the preset
    assert c.resolution == TINY_PRESET["resolution"] and c.tiny


def test_yaml_and_boolean_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("use_dasm: false\nhflip: false\n")
    assert parse_config(["--config", str(path), "--use-dasm"]).use_dasm
    assert not parse_config(["--config", str(path)]).hflip
    assert not parse_config(["--no-gradient-checkpointing"]).gradient_checkpointing


def test_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(ValueError, match="learning_rate"):
        parse_config(["--config", str(bad)])
    with pytest.raises(SystemExit):  # argparse: "--use-dasm false" is not a valid bool flag
        build_parser().parse_args(["--use-dasm", "false"])
    with pytest.raises(ValueError, match="weights"):
        TrainConfig(dasm_weights=(1.0,))


def test_jpeg_codec_option():
    assert parse_config([]).jpeg_codec == "diffjpeg"  # Real-ESRGAN's simulated JPEG
    assert parse_config(["--jpeg-codec", "libjpeg"]).jpeg_codec == "libjpeg"
    with pytest.raises(SystemExit) as exit_info:  # refused at parse time, one line
        parse_config(["--jpeg-codec", "pillow"])
    assert exit_info.value.code == 2
    with pytest.raises(ValueError, match="jpeg_codec must be one of diffjpeg, libjpeg"):
        TrainConfig(jpeg_codec="pillow")


def test_tsd_space_reaches_the_loss_and_is_checked():
    """--tsd-space picks TSDLoss's space; the release's velocity space is the default."""
    from examples.tsdsr.training.config import TrainConfig
    from examples.tsdsr.training.step import Losses

    assert Losses.from_config(TrainConfig()).regulariser.loss.space == "flow"
    assert Losses.from_config(TrainConfig(tsd_space="epsilon")).regulariser.loss.space == "epsilon"
    with pytest.raises(ValueError, match="tsd_space must be one of flow, epsilon"):
        TrainConfig(tsd_space="eps")
