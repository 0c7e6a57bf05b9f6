"""``scoredistill-sr`` on a local SD3-layout folder of the tiny model: every input kind, bad
files reported and skipped, and a folder split across two processes (torchrun, CPU)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from examples.tsdsr.models.tiny import random_backbone
from scoredistill.sr.cli import main

ROOT = Path(__file__).resolve().parents[2]
RNG = np.random.default_rng(0)
FAST = ["--process-size", "32", "--no-progress", "--upscale", "2"]


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory) -> Path:
    """The random tiny backbone saved as a diffusers SD3 folder, with the release's prompt
    files (``embeds/prompt_embeds.pt``, ``embeds/pool_embeds.pt``)."""
    folder = tmp_path_factory.mktemp("sd3")
    parts = random_backbone()
    parts.transformer.save_pretrained(folder / "transformer")
    parts.vae.save_pretrained(folder / "vae")
    (folder / "embeds").mkdir()
    torch.save(parts.cond["prompt_embeds"], folder / "embeds" / "prompt_embeds.pt")
    torch.save(parts.cond["pooled_projections"], folder / "embeds" / "pool_embeds.pt")
    return folder


def model_flags(folder: Path) -> list[str]:
    return ["--pretrained", str(folder), "--embeds", str(folder / "embeds")]


def write(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def inputs(tmp_path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    write(folder / "a.png", RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    write(folder / "b.png", RNG.integers(0, 256, (16, 16, 4), dtype=np.uint8))
    write(folder / "c.jpg", RNG.integers(0, 256, (12, 16), dtype=np.uint8))
    write(folder / "d.png", RNG.integers(0, 65536, (16, 12), dtype=np.uint16))
    write(folder / "e.png", RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    write(folder / "small.png", RNG.integers(0, 256, (4, 30, 3), dtype=np.uint8))
    return folder


def test_bad_files_are_reported_and_skipped(sd3_folder, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(inputs), "-o", str(out), *FAST, *model_flags(sd3_folder),
                 "--batch-size", "4", "--profile"]) == 1
    captured = capsys.readouterr()
    failed = [line for line in captured.err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2
    assert any("broken.png" in line for line in failed)
    assert any("small.png" in line and "at least 8 px" in line for line in failed)
    assert "5 image(s) written" in captured.out and "transformer" in captured.out
    modes = {p.name: (Image.open(p).size, Image.open(p).mode) for p in out.iterdir()}
    assert modes == {"a.png": ((48, 40), "RGB"), "b.png": ((32, 32), "RGBA"),
                     "c.png": ((32, 24), "L"), "d.png": ((24, 32), "I;16"),
                     "e.png": ((48, 40), "RGB")}


def test_help_shows_the_speed_flags(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--compile", "--batch-size", "--cuda-graphs", "--fp8", "--channels-last"):
        assert flag in text


def test_fp8_on_the_cpu_is_a_clear_error(sd3_folder, inputs, tmp_path, capsys):
    assert main([str(inputs), "-o", str(tmp_path / "o"), *FAST, *model_flags(sd3_folder),
                 "--fp8", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--fp8" in err[0] and "FP8 needs a CUDA GPU" in err[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_split_a_folder_and_match_one_process(sd3_folder, inputs, tmp_path):
    (inputs / "broken.png").unlink()
    (inputs / "small.png").unlink()
    flags = [*FAST, *model_flags(sd3_folder), "--batch-size", "1"]
    assert main([str(inputs), "-o", str(tmp_path / "one"), *flags]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
           "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "scoredistill.sr.cli", str(inputs), "-o", str(tmp_path / "two"), *flags]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    # Five files, sorted: rank 0 takes a, c, e and rank 1 takes b, d; each says so once.
    assert "[rank 0/2] 3 image(s) written" in done.stdout
    assert "[rank 1/2] 2 image(s) written" in done.stdout
    one, two = (sorted(p.name for p in (tmp_path / d).iterdir()) for d in ("one", "two"))
    assert one == two == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    for name in one:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def _stat(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_ctrl_c_then_skip_existing_does_only_the_missing_files(sd3_folder, inputs, tmp_path,
                                                               monkeypatch, capsys):
    """Ctrl-C after two images: complete files only, exit 130; the rerun with --skip-existing
    writes the other three and leaves the two untouched; without it, the rerun is refused."""
    from scoredistill.sr import files

    (inputs / "broken.png").unlink()
    (inputs / "small.png").unlink()
    out = tmp_path / "out"
    argv = [str(inputs), "-o", str(out), *FAST, *model_flags(sd3_folder), "--batch-size", "1"]
    real_output, done = files._output, []

    def interrupt_at_the_third(sr, image):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(1)
        return real_output(sr, image)

    monkeypatch.setattr(files, "_output", interrupt_at_the_third)
    try:
        status = main(argv)
    except KeyboardInterrupt:  # would stop pytest itself
        status = "KeyboardInterrupt escaped"
    assert status == 130
    assert "--skip-existing" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]  # no temp files
    before = _stat(out)
    monkeypatch.setattr(files, "_output", real_output)
    assert main(argv) == 2
    assert "2 output file(s) already exist" in capsys.readouterr().err
    assert _stat(out) == before
    assert main([*argv, "--skip-existing"]) == 0
    assert "skipping 2 existing output(s)" in capsys.readouterr().out
    after = _stat(out)
    assert sorted(after) == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    assert {k: after[k] for k in before} == before


def test_an_internal_error_fails_one_image_with_its_type(sd3_folder, inputs, tmp_path,
                                                         monkeypatch, capsys, caplog):
    """A bug hit by two images: both reported with the exception's type, the traceback logged
    once, the other images written."""
    from scoredistill.sr import files

    (inputs / "broken.png").unlink()
    (inputs / "small.png").unlink()
    real = files.load_image

    def load(path, **kw):
        if Path(path).name in ("b.png", "d.png"):
            raise ZeroDivisionError("division by zero")
        return real(path, **kw)

    monkeypatch.setattr(files, "load_image", load)
    out = tmp_path / "out"
    assert main([str(inputs), "-o", str(out), *FAST, *model_flags(sd3_folder)]) == 1
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2 and all("ZeroDivisionError" in f and "internal error" in f
                                    for f in failed)
    assert sum(r.exc_info is not None for r in caplog.records) == 1
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png", "e.png"]


def test_version_and_defaults_in_help(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"scoredistill-sr {version('scoredistill')}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 4, or the --model folder's)", "(default: 512,",
                  "(default: wavelet,", "(default: 1,", "(default: 64 8)",
                  "--skip-existing", "--overwrite"):
        assert shown in text
    assert "(default: None)" not in text and "(default: False)" not in text


class RunsCode:
    """Pickles as a call of os.mkdir(marker): what a crafted prompt file could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_pickled_embeds_are_refused_without_suggesting_unsafe_loading(tmp_path):
    from scoredistill.sr.loading import read_embeds

    (tmp_path / "emb").mkdir()
    torch.save({"embeds": RunsCode(tmp_path / "ran")}, tmp_path / "emb" / "prompt_embeds.pt")
    torch.save(torch.zeros(1, 64), tmp_path / "emb" / "pool_embeds.pt")
    with pytest.raises(ValueError, match="refusing to load") as info:
        read_embeds(tmp_path / "emb")
    assert "weights_only" not in str(info.value) and not (tmp_path / "ran").exists()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A model folder (save_pretrained) of the tiny backbone with its own default options."""
    from scoredistill.sr.loading import load_model
    from scoredistill.sr.pipeline import SROptions, TSDSRPipeline

    pipe = TSDSRPipeline(load_model(random_backbone()),
                         options=SROptions(upscale=2.0, process_size=32, color="adain"))
    return pipe.save_pretrained(tmp_path_factory.mktemp("model") / "m")


def test_model_folder_alone_runs_with_its_saved_options(model_dir, tmp_path):
    """--model needs nothing else; the folder's options are the defaults, and a flag given
    replaces its own field only (compared with the pipeline the folder loads into)."""
    from scoredistill.sr.pipeline import TSDSRPipeline

    src = write(tmp_path / "x.png", RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    out = tmp_path / "out"
    assert main([str(src), "-o", str(out), "--model", str(model_dir), "--no-progress"]) == 0
    got = np.asarray(Image.open(out / "x.png"))
    assert got.shape == (40, 48, 3)  # the folder's upscale 2, not the default 4
    want = TSDSRPipeline.from_pretrained(model_dir)(Image.open(src), output_type="np").images[0]
    assert np.abs(got.astype(float) - np.round(want * 255)).max() <= 1
    assert main([str(src), "-o", str(tmp_path / "o3"), "--model", str(model_dir),
                 "--no-progress", "--upscale", "3", "--strength", "0.5"]) == 0
    assert Image.open(tmp_path / "o3" / "x.png").size == (72, 60)


@pytest.mark.parametrize("extra", [["--pretrained", "{sd3}"], ["--lora", "{sd3}"],
                                   ["--embeds", "{sd3}"]])
def test_model_folder_refuses_other_model_flags(model_dir, sd3_folder, tmp_path, capsys, extra):
    src = write(tmp_path / "x.png", RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    argv = [str(src), "-o", str(tmp_path / "o"), "--model", str(model_dir),
            *(a.format(sd3=sd3_folder) for a in extra)]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model" in err[0] and extra[0] in err[0]


def test_no_model_at_all_is_one_line(tmp_path, capsys):
    src = write(tmp_path / "x.png", RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    with pytest.raises(SystemExit) as exc:
        main([str(src), "-o", str(tmp_path / "o")])
    assert exc.value.code == 2
    assert "--model" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_folder_that_is_no_model_folder_names_the_flag(sd3_folder, tmp_path, capsys):
    src = write(tmp_path / "x.png", RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    assert main([str(src), "-o", str(tmp_path / "o"), "--model", str(sd3_folder)]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("scoredistill-sr: error: --model") and "scoredistill_sr.json" in line


def test_compare_writes_before_after_pictures_and_guards_them(model_dir, tmp_path, capsys):
    """--compare: <out>/compare/<stem>.png is side_by_side(input, the SR output as written);
    an existing picture is refused like an existing output."""
    from scoredistill.sr.compare import side_by_side

    src = write(tmp_path / "x.png", RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    out = tmp_path / "out"
    argv = [str(src), "-o", str(out), "--model", str(model_dir), "--no-progress", "--compare"]
    assert main(argv) == 0
    sr = torch.from_numpy(np.array(Image.open(out / "x.png"))).permute(2, 0, 1) / 255
    lq = torch.from_numpy(np.array(Image.open(src))).permute(2, 0, 1) / 255
    picture = np.asarray(Image.open(out / "compare" / "x.png")).astype(float)
    want = side_by_side(lq, sr).permute(1, 2, 0).numpy() * 255
    assert picture.shape == (80, 96, 3) and np.abs(picture - want).max() <= 1.01
    (out / "x.png").unlink()  # the picture alone still counts as an existing output
    assert main(argv) == 2
    assert "compare/x.png" in capsys.readouterr().err
