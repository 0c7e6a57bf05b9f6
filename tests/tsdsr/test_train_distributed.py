"""train.py as two processes (torchrun, gloo on CPU): gradients are averaged over processes, so
both end with the same weights although each was fed different images; with --fsdp the
transformer is sharded, trains as the replicated run does, and resumes exactly."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from examples.tsdsr.precompute import precompute
from scoredistill.cli import EXIT_PREEMPTED
from scoredistill.sr.imageio import save_png

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")
WORKER = Path(__file__).with_name("distributed_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(data: Path, out: Path, *extra: str, status: int = 0, **env: str) -> None:
    """Train with two processes; each must end with exit status ``status``."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
           "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER),
           "--tiny", "--hq-dir", str(data / "hq"), "--embeds-dir", str(data / "embeds"),
           "--output-dir", str(out), "--max-steps", "4", "--checkpoint-every", "2",
           "--validate-every", "100", "--report-to", "none", "--student-rank", "2",
           "--fake-rank", "2", "--vae-rank", "2", "--batch-size", "1", *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in (0, 1):
        found = json.loads((out / f"rank-{rank}.json").read_text())["status"]
        assert found == status, (rank, found, done.stderr[-4000:])


def rank_file(out: Path, rank: int) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    fed = json.loads((out / f"rank-{rank}.json").read_text())["fed"]
    with safe_open(str(out / f"rank-{rank}.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, fed  # noqa: SIM118


def checkpoint(out: Path, step: int) -> dict[str, torch.Tensor]:
    folder = out / "checkpoints" / f"step-{step:08d}"
    return {f"{f.name}:{k}": v for f in sorted(folder.glob("*.safetensors"))
            for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("ddp")
    g = torch.Generator().manual_seed(0)
    (data / "hq").mkdir()
    for name in "abcd":
        save_png(torch.rand(3, 64, 64, generator=g), data / "hq" / f"{name}.png")
    precompute(data / "hq", data / "embeds")
    return data


@pytest.fixture(scope="module")
def runs(ddp_data):
    data = ddp_data
    launch(data, data / "replicated")
    # Checkpointing recomputes each block's forward: under FSDP that gathers it again.
    launch(data, data / "fsdp", "--fsdp", "--gradient-checkpointing")
    return data


def test_two_processes_stay_in_sync_on_different_batches(runs):
    (w0, fed0), (w1, fed1) = (rank_file(runs / "replicated", r) for r in (0, 1))
    assert len(fed0) == len(fed1) == 4
    assert fed0 != fed1  # each process drew its own images ...
    assert w0.keys() == w1.keys() and len(w0) > 0
    for k in w0:  # ... yet, with gradients averaged over both, the weights are the same
        assert torch.equal(w0[k], w1[k]), k


def test_fsdp_shards_the_transformer_and_trains_as_the_replicated_run(runs):
    whole, _ = rank_file(runs / "replicated", 0)
    (s0, _), (s1, _) = (rank_file(runs / "fsdp", r) for r in (0, 1))
    split = 0
    for k, w in whole.items():
        joined = torch.cat([s0[k], s1[k]])
        if joined.shape == w.shape:  # a transformer LoRA tensor: each rank holds a part
            split += 1
            torch.testing.assert_close(joined, w, rtol=0, atol=1e-6)
        else:  # the VAE encoder's LoRA is replicated
            for shard in (s0[k], s1[k]):
                torch.testing.assert_close(shard, w, rtol=0, atol=1e-6)
    assert 0 < split < len(whole)
    fsdp, replicated = checkpoint(runs / "fsdp", 4), checkpoint(runs / "replicated", 4)
    assert fsdp.keys() == replicated.keys()  # whole tensors in the files, same names
    for k, v in replicated.items():
        torch.testing.assert_close(fsdp[k], v, rtol=0, atol=1e-6)


def test_fsdp_resume_matches_the_uninterrupted_run(runs, tmp_path):
    out = tmp_path / "resumed"
    shutil.copytree(runs / "fsdp" / "checkpoints" / "step-00000002",
                    out / "checkpoints" / "step-00000002")
    launch(runs, out, "--fsdp", "--gradient-checkpointing", "--resume", "latest")
    resumed, uninterrupted = checkpoint(out, 4), checkpoint(runs / "fsdp", 4)
    assert resumed.keys() == uninterrupted.keys()
    for k, v in uninterrupted.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=1e-6)
    state = load_file(out / "checkpoints" / "step-00000004" / "state.safetensors")
    reference = load_file(runs / "fsdp" / "checkpoints" / "step-00000004" / "state.safetensors")
    for k, v in reference.items():  # Adam's moments were re-sharded and kept
        torch.testing.assert_close(state[k], v, rtol=0, atol=1e-6)


def test_a_signal_to_one_process_stops_both_at_the_same_step(ddp_data, tmp_path):
    """SIGTERM reaches only rank 1, during step 3: both ranks finish step 3, stop with status 75
    and leave one checkpoint of step 3 (rank 0 writes it), equal on both ranks' weights."""
    out = tmp_path / "preempted"
    launch(ddp_data, out, status=EXIT_PREEMPTED, SIGTERM_AT="1:3")
    (w0, fed0), (w1, fed1) = (rank_file(out, r) for r in (0, 1))
    assert len(fed0) == len(fed1) == 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000002", "step-00000003"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    state = json.loads((out / "checkpoints" / "step-00000003" / "state.json").read_text())
    assert state["step"] == 3


def test_a_locked_output_dir_stops_every_process(ddp_data, tmp_path):
    """Another run holds the folder: process 0 is refused, and process 1, which takes no lock
    itself, stops with it instead of waiting for process 0 forever."""
    from examples.tsdsr.training.preflight import lock_output_dir

    out = tmp_path / "locked"
    out.mkdir()
    fd = lock_output_dir(out)
    try:
        launch(ddp_data, out, status=2)
    finally:
        os.close(fd)
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize(("env", "argv", "message"), [
    ({"WORLD_SIZE": "2"}, [], "launched as 2 processes, but accelerate set up 1"),
    ({}, ["--fsdp"], "--fsdp shards over processes"),
])
def test_launches_that_would_not_run_as_asked_are_refused(tmp_path, monkeypatch, capsys, env,
                                                          argv, message):
    from examples.tsdsr.train import main

    for key, value in env.items():  # WORLD_SIZE: as torchrun on CPUs without ACCELERATE_USE_CPU
        monkeypatch.setenv(key, value)
    assert main(["--tiny", "--output-dir", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
