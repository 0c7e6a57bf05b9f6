"""Checkpoint state as JSON + safetensors: optimizer state dicts round-trip, nothing is pickled."""

import pytest
import torch
from safetensors.torch import save_file

from examples.tsdsr.training.checkpoint import (
    LORA_FILES,
    STATE_FILES,
    VAE_FILE,
    checkpoints,
    read_state,
    resolve,
    write_state,
)
from scoredistill.cli import UserError


def test_optimizer_and_scheduler_state_round_trip_without_pickle(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 / (step + 1))
    for _ in range(2):
        sum(p.square().sum() for p in params).backward()
        opt.step()
        sched.step()
    state = {"opt": opt.state_dict(), "sched": sched.state_dict(), "step": 7,
             "skipped": {"generator": 1}, "scaler": None}
    write_state(state, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(STATE_FILES)
    back = read_state(tmp_path)
    assert back["step"] == 7 and back["skipped"] == {"generator": 1} and back["scaler"] is None
    assert set(back["opt"]["state"]) == {0, 1}  # parameter indices stay ints
    for i in (0, 1):
        for k, v in opt.state_dict()["state"][i].items():
            assert torch.equal(back["opt"]["state"][i][k], v)
    fresh = torch.optim.AdamW(params, lr=1e-3)
    fresh.load_state_dict(back["opt"])  # what resume does
    assert fresh.param_groups[0]["betas"] == [0.9, 0.99]
    assert back["sched"]["last_epoch"] == sched.state_dict()["last_epoch"] == 2


def test_unstorable_values_are_refused(tmp_path):
    with pytest.raises(TypeError, match="cannot store a object"):
        write_state({"x": object()}, tmp_path)


def test_resume_latest_is_the_newest_complete_checkpoint(tmp_path):
    for step in (10, 2, 40, 4):  # created out of order; step 40 is unfinished (no state file)
        folder = tmp_path / f"step-{step:08d}"
        folder.mkdir()
        if step != 40:
            write_state({"step": step}, folder)
            for name in (*LORA_FILES, VAE_FILE):
                save_file({"w": torch.zeros(1)}, str(folder / name))
    (tmp_path / ".tmp-step-00000050-7").mkdir()  # a save killed midway
    assert [p.name for p in checkpoints(tmp_path)] == [
        "step-00000002", "step-00000004", "step-00000010"]
    assert resolve("latest", tmp_path) == tmp_path / "step-00000010"
    assert resolve("latest", tmp_path / "none") is None
    assert resolve(str(tmp_path / "step-00000004"), tmp_path) == tmp_path / "step-00000004"
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resolve(str(tmp_path / "step-00000040"), tmp_path)
