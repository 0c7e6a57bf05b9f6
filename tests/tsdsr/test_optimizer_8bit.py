"""The recipe's --optimizer adamw8bit: bitsandbytes' 8-bit AdamW trains the tiny model on CPU,
its state is 8-bit, checkpoints and resumes; without bitsandbytes it is one line (issue 24)."""

import sys

import pytest
import torch

pytest.importorskip("lpips", reason="the recipe needs the train extra")
pytest.importorskip("bitsandbytes", reason="the adam8bit extra: pip install -e '.[adam8bit]'")

from examples.tsdsr.train import main, optimisation
from examples.tsdsr.training.config import parse_config
from scoredistill.optim import state_bytes

SMALL = ["--student-rank", "2", "--fake-rank", "2", "--vae-rank", "2", "--report-to", "none",
         "--validate-every", "100", "--log-every", "1"]


pytestmark = pytest.mark.usefixtures("random_tiny_backbone")


def test_the_8bit_state_is_a_quarter_of_adamws():
    weight = torch.nn.Parameter(torch.randn(64, 1024))  # >= 4096 elements: 8-bit moments
    sizes = {}
    for kind in ("adamw", "adamw8bit"):
        config = parse_config(["--tiny", "--optimizer", kind])
        opt = optimisation([weight], 1e-3, config, 1).optimizer
        weight.grad = torch.randn_like(weight)
        opt.step()
        sizes[kind] = state_bytes(opt)
    # Two fp32 moments vs two uint8 ones (+ blockwise scales and the shared 256-entry maps).
    assert sizes["adamw"] >= 2 * 4 * weight.numel()
    assert sizes["adamw8bit"] < 0.3 * sizes["adamw"], sizes


def test_trains_checkpoints_and_resumes_with_8bit_adamw(one_image, tmp_path):
    flags = ["--tiny", "--hq-dir", str(one_image / "hq"), "--embeds-dir", str(one_image / "embeds"),
             "--output-dir", str(tmp_path), "--optimizer", "adamw8bit", *SMALL]
    assert main([*flags, "--max-steps", "2", "--checkpoint-every", "2"]) == 0
    assert main([*flags, "--max-steps", "3", "--resume", "latest"]) == 0
    assert (tmp_path / "checkpoints" / "step-00000003").is_dir()


def test_without_bitsandbytes_it_is_one_line(one_image, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    code = main(["--tiny", "--hq-dir", str(one_image / "hq"),
                "--embeds-dir", str(one_image / "embeds"),
                "--output-dir", str(tmp_path), "--optimizer", "adamw8bit", *SMALL])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "adamw8bit" in err[0] and "pip install" in err[0]
    assert not (tmp_path / "checkpoints").exists()


def test_fsdp_with_8bit_adamw_is_refused_in_one_line():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from examples.tsdsr.train import check_parallelism
    from scoredistill.cli import UserError

    launched = SimpleNamespace(num_processes=2, distributed_type=DistributedType.MULTI_GPU)
    config = parse_config(["--tiny", "--fsdp", "--mixed-precision", "bf16", "--optimizer",
                           "adamw8bit"])
    with pytest.raises(UserError, match="--fsdp with --optimizer adamw8bit"):
        check_parallelism(config, launched)
    check_parallelism(parse_config(["--tiny", "--fsdp", "--mixed-precision", "bf16"]), launched)
