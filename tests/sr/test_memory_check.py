# ruff: noqa: F811 - the tiny SD3 folder fixture, imported from test_cli, is a parameter
"""``scoredistill-sr``'s memory check before loading, on the tiny SD3 folder: the CLI is made to
believe it runs on CUDA (the device test and the free-memory query patched), the planner runs
for real (fake tensors, CPU)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from test_cli import model_flags, sd3_folder  # noqa: F401 - a fixture

from scoredistill.sr import memory_check
from scoredistill.sr.cli import main
from scoredistill.sr.pipeline import TSDSRPipeline

ARGS = ["--device", "cpu", "--upscale", "2", "--process-size", "32", "--no-progress",
        "--batch-size", "8"]


@pytest.fixture
def inputs(tmp_path) -> Path:
    """Three inputs; the largest (b.png, 24x40) is the one planned."""
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (16, 16), "b.png": (24, 40), "c.png": (20, 20)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    return folder


@pytest.fixture
def ram(monkeypatch) -> list[int]:
    """``ram[0]`` bytes of host memory available (1 PiB unless a test plants less)."""
    available = [2**50]
    monkeypatch.setattr(memory_check, "available_host_memory", lambda: available[0])
    return available


@pytest.fixture
def cuda(monkeypatch, tmp_path, ram):
    """The check applies (as on CUDA) with ``free[0]`` bytes free; plans cached under tmp;
    returns (free, calls to from_pretrained)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(memory_check, "on_cuda", lambda device: True)
    free = [0]
    monkeypatch.setattr(memory_check, "free_memory", lambda device: free[0])
    loads = []
    real = TSDSRPipeline.from_pretrained.__func__

    def load(cls, *args, **kwargs):
        loads.append(args)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(TSDSRPipeline, "from_pretrained", classmethod(load))
    return free, loads


def _run(sd3_folder, inputs, tmp_path, *extra):
    out = tmp_path / "out"
    return main([str(inputs), "-o", str(out), *model_flags(sd3_folder), *ARGS, *extra]), out


def _planned(sd3_folder, flags: str, field: str = "peak") -> int:
    """The planner's peak (or host bytes) for the CLI run with ``flags`` (the settings part of
    the message)."""
    def pair(name):
        return tuple(int(v) for v in re.search(rf"--{name}-tile (\d+) (\d+)", flags).groups())

    tiles = memory_check.TileConfig(*pair("latent"), *pair("encoder"), *pair("decoder"))
    batch = int(re.search(r"--batch-size (\d+)", flags)[1])
    vae_batch = int(re.search(r"--vae-batch-size (\d+)", flags)[1])
    run = memory_check.Run(str(sd3_folder), 24, 40, 3, 2.0, 32, torch.float32,
                           False)
    return getattr(memory_check.planned(run, memory_check.Settings(batch, vae_batch, tiles)),
                   field)


DEFAULT = ("--batch-size 8 --vae-batch-size 8 --latent-tile 64 8 --encoder-tile 1024 64 "
           "--decoder-tile 224 16")


def test_an_over_budget_run_is_refused_naming_settings_that_fit(sd3_folder, inputs, tmp_path,
                                                                cuda, capsys):
    free, loads = cuda
    full = _planned(sd3_folder, DEFAULT)
    small = _planned(sd3_folder, DEFAULT.replace("size 8", "size 1"))
    assert small < full  # the planted budget lies between them
    free[0] = (full + small) // 2
    code, out = _run(sd3_folder, inputs, tmp_path)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    size = memory_check.size
    assert f"would need {size(full)} on cpu" in err and f"but {size(free[0])} is free" in err \
        and "largest input 24x40 px" in err and "--force" in err, err
    fit = re.search(r"settings that fit: (.*?) \(planned", err)[1]
    assert _planned(sd3_folder, fit) <= free[0] < full  # they fit; the run's own do not
    assert not loads and not list(out.glob("*.png"))  # nothing loaded, nothing written


def test_a_fitting_run_goes_through(sd3_folder, inputs, tmp_path, cuda, capsys):
    free, loads = cuda
    free[0] = _planned(sd3_folder, DEFAULT)  # exactly enough
    code, out = _run(sd3_folder, inputs, tmp_path)
    assert code == 0, capsys.readouterr().err
    assert len(loads) == 1 and sorted(p.name for p in out.glob("*.png")) == [
        "a.png", "b.png", "c.png"]


# Tiles small enough that the tiny VAE runs in tiles, so its waiting tiles take host memory.
SMALL = ["--encoder-tile", "32", "4", "--decoder-tile", "4", "1"]


def test_a_run_whose_tiles_overfill_the_host_ram_is_refused(sd3_folder, inputs, tmp_path,
                                                             cuda, ram, capsys):
    free, loads = cuda
    flags = DEFAULT.replace("1024 64", "32 4").replace("224 16", "4 1")
    free[0] = _planned(sd3_folder, flags)  # the card has room: the host is what refuses
    host = _planned(sd3_folder, flags, "host")
    assert host > 0 and _planned(sd3_folder, DEFAULT, "host") == 0  # untiled VAE: none
    ram[0] = host - 1
    code, out = _run(sd3_folder, inputs, tmp_path, *SMALL)
    err = capsys.readouterr().err.strip()
    size = memory_check.size
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"would need {size(host)} of host memory" in err and \
        f"but {size(ram[0])} is available" in err and "--force" in err, err
    assert not loads and not list(out.glob("*.png"))
    ram[0] = host  # exactly enough
    code, out = _run(sd3_folder, inputs, tmp_path, *SMALL)
    assert code == 0, capsys.readouterr().err
    assert len(loads) == 1 and len(list(out.glob("*.png"))) == 3


def test_plans_cached_without_host_memory_are_traced_again(sd3_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    run = memory_check.Run(str(sd3_folder), 24, 40, 3, 2.0, 32, torch.float32, False)
    settings = memory_check.Settings(2, 2, memory_check.TileConfig())
    fresh = memory_check.planned(run, settings)
    cache = json.loads(memory_check.cache_file().read_text())
    (key, _), = cache.items()
    memory_check.cache_file().write_text(json.dumps({key: [1, "decoder"]}))  # the old form
    assert memory_check.planned(run, settings) == fresh


def test_force_goes_past_the_refusal_without_planning(sd3_folder, inputs, tmp_path, cuda,
                                                      monkeypatch):
    free, loads = cuda
    free[0] = 1
    monkeypatch.setattr(memory_check, "planned", lambda *a: pytest.fail("planned with --force"))
    code, out = _run(sd3_folder, inputs, tmp_path, "--force")
    assert code == 0 and len(loads) == 1 and len(list(out.glob("*.png"))) == 3


def test_nothing_fits_names_the_floor_and_other_ways(sd3_folder, inputs, tmp_path, cuda,
                                                     capsys):
    cuda[0][0] = 1
    code, _ = _run(sd3_folder, inputs, tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and "no setting down to --batch-size 1 --vae-batch-size 1" in err, err


def test_no_check_on_the_cpu(sd3_folder, inputs, tmp_path, monkeypatch):
    monkeypatch.setattr(memory_check, "free_memory", lambda device: pytest.fail("queried"))
    monkeypatch.setattr(memory_check, "planned", lambda *a: pytest.fail("planned on the CPU"))
    assert _run(sd3_folder, inputs, tmp_path)[0] == 0


def test_plans_are_cached(sd3_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    traced = []
    real = memory_check._trace
    monkeypatch.setattr(memory_check, "_trace", lambda *a: traced.append(a) or real(*a))
    run = memory_check.Run(str(sd3_folder), 24, 40, 3, 2.0, 32, torch.float32,
                           False)
    settings = memory_check.Settings(2, 2, memory_check.TileConfig())
    assert memory_check.planned(run, settings) == memory_check.planned(run, settings)
    assert len(traced) == 1 and memory_check.cache_file().is_file()


def test_largest_image_reads_headers_upright(tmp_path):
    Image.new("RGB", (30, 10)).save(tmp_path / "wide.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter: 12 x 40 stored is 40 x 12 upright
    Image.new("RGB", (40, 12)).save(tmp_path / "turned.jpg", exif=exif)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    paths = sorted(tmp_path.iterdir())
    assert memory_check.largest_image(paths, None) == (40, 12)
