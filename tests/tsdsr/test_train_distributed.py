"""train.py as two processes (torchrun, gloo on CPU): gradients are averaged over processes, so
both end with the same weights although each was fed different images."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from examples.tsdsr.imageio import save_png
from examples.tsdsr.precompute import precompute

WORKER = Path(__file__).with_name("distributed_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read(path: Path) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["fed"])  # noqa: SIM118


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_processes_stay_in_sync_on_different_batches(tmp_path):
    g = torch.Generator().manual_seed(0)
    (tmp_path / "hq").mkdir()
    for name in "abcd":
        save_png(torch.rand(3, 64, 64, generator=g), tmp_path / "hq" / f"{name}.png")
    precompute(tmp_path / "hq", tmp_path / "embeds")
    out = tmp_path / "out"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
           "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER),
           "--tiny", "--hq-dir", str(tmp_path / "hq"), "--embeds-dir", str(tmp_path / "embeds"),
           "--output-dir", str(out), "--max-steps", "3", "--checkpoint-every", "3",
           "--validate-every", "100", "--report-to", "none", "--student-rank", "2",
           "--fake-rank", "2", "--vae-rank", "2", "--batch-size", "1"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    (w0, fed0), (w1, fed1) = read(out / "rank-0.safetensors"), read(out / "rank-1.safetensors")
    assert len(fed0) == len(fed1) == 3
    assert fed0 != fed1  # each process drew its own images ...
    assert w0.keys() == w1.keys() and len(w0) > 0
    for k in w0:  # ... yet, with gradients averaged over both, the weights are the same
        assert torch.equal(w0[k], w1[k]), k
    assert (out / "checkpoints" / "step-00000003" / "transformer.safetensors").is_file()


def test_a_launch_accelerate_does_not_distribute_is_refused(tmp_path, monkeypatch):
    from examples.tsdsr.train import main

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun on CPUs without ACCELERATE_USE_CPU
    with pytest.raises(SystemExit, match="launched as 2 processes, but accelerate set up 1"):
        main(["--tiny", "--output-dir", str(tmp_path)])
