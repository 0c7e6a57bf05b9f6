"""Checkpoint state as JSON + safetensors: optimizer state dicts round-trip, nothing is pickled."""

import errno
import os

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
    write_error,
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


def fake_checkpoint(root, step, complete=True, **state):
    """A checkpoint folder with every file (small tensors, ``state`` added to the step);
    ``complete=False``: no state."""
    folder = root / f"step-{step:08d}"
    folder.mkdir(parents=True)
    if complete:
        write_state({"step": step, **state}, folder)
        for name in (*LORA_FILES, VAE_FILE):
            save_file({"w": torch.zeros(4)}, str(folder / name))
    return folder


def test_resume_latest_is_the_newest_complete_checkpoint(tmp_path):
    for step in (10, 2, 40, 4):  # created out of order; step 40 is unfinished (no state file)
        fake_checkpoint(tmp_path, step, complete=step != 40)
    (tmp_path / ".tmp-step-00000050-7").mkdir()  # a save killed midway
    assert [p.name for p in checkpoints(tmp_path)] == [
        "step-00000002", "step-00000004", "step-00000010"]
    assert resolve("latest", tmp_path) == tmp_path / "step-00000010"
    assert resolve("latest", tmp_path / "none") is None
    assert resolve(str(tmp_path / "step-00000004"), tmp_path) == tmp_path / "step-00000004"
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resolve(str(tmp_path / "step-00000040"), tmp_path)


CHECKPOINT_FILES = sorted((*LORA_FILES, VAE_FILE, *STATE_FILES))


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_damaged_file_makes_latest_fall_back(name, tmp_path, caplog):
    """Whichever file of the newest checkpoint was cut short (a full disk, a copy interrupted),
    --resume latest takes the one before and names the file."""
    assert len(CHECKPOINT_FILES) == 5  # the student's two LoRAs, the fake's, the state's two
    fake_checkpoint(tmp_path, 1)
    newest = fake_checkpoint(tmp_path, 2)
    data = (newest / name).read_bytes()
    (newest / name).write_bytes(data[:len(data) // 2])
    assert resolve("latest", tmp_path) == tmp_path / "step-00000001"
    assert f"skipping damaged checkpoint step-00000002 ({newest / name}" in caplog.text


def test_every_checkpoint_damaged_is_refused(tmp_path):
    for step, name in ((1, VAE_FILE), (2, STATE_FILES[0])):
        folder = fake_checkpoint(tmp_path, step)
        (folder / name).write_bytes(b"cut")
    with pytest.raises(UserError, match="every checkpoint in .* is damaged "
                                        r"\(step-00000002, step-00000001;"):
        resolve("latest", tmp_path)


def test_write_errors_are_recognised_from_os_and_safetensors():
    from safetensors import SafetensorError

    assert write_error(OSError(errno.ENOSPC, "No space left on device")) == (
        "No space left on device")
    # What safetensors 0.8 raised when a 64 KiB tmpfs filled up.
    full = SafetensorError("Error while serializing: I/O error: No space left on device "
                           "(os error 28)")
    assert write_error(full) == os.strerror(errno.ENOSPC)
    assert write_error(SafetensorError("Error while serializing: invalid dtype")) is None
    assert write_error(RuntimeError("a bug")) is None
