"""Every benchmark's command line inside the project's error policy (scoredistill.cli): a bad
flag is one line on stderr, ``benchmarks.<name>: error: ...`` naming the flag, exit status 2,
no traceback, before any work starts; a flag that --quick would override is refused, not
silently overridden."""

from __future__ import annotations

import importlib
import json
import signal

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("skimage")

from benchmarks import options

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
UNWRITABLE = "{tmp}/a_file/results"  # a folder under a file: refused even for root

# (benchmark module, arguments, the flag the one-line error must name). {tmp} is a fresh
# folder holding a_file (a file), empty/ (a folder), not.json (not JSON) and other.json (a
# results JSON of no benchmark). Each row has --out (or --no-docs-assets) so that a regression
# that starts work never writes into the committed results.
ROWS = [
    ("compare_losses", ["--steps", "0"], "--steps"),
    ("compare_losses", ["--seeds", "-1"], "--seeds"),
    ("compare_losses", ["--recon-weight", "nan"], "--recon-weight"),
    ("compare_losses", ["--out", UNWRITABLE], "--out"),
    ("compare_losses", ["--out", "{tmp}/a_file"], "--out"),
    ("compare_losses", ["--from-json", "{tmp}/missing.json"], "--from-json"),
    ("compare_losses", ["--from-json", "{tmp}/not.json"], "--from-json"),
    ("compare_losses", ["--from-json", "{tmp}/other.json"], "--from-json"),
    ("compare_losses", ["--from-json", "{tmp}/other.json", "--steps", "5"], "--steps"),
    ("natural_patches", ["--steps", "0"], "--steps"),
    ("natural_patches", ["--seeds", "nan"], "--seeds"),
    ("natural_patches", ["--out", UNWRITABLE], "--out"),
    ("natural_patches", ["--from-json", "{tmp}/other.json"], "--from-json"),
    ("natural_patches", ["--from-json", "{tmp}/other.json", "--quick"], "--quick"),
    ("inference", ["--config", "sd3-large"], "--config"),
    ("inference", ["--device", "tpu:0"], "--device"),
    pytest.param("inference", ["--device", "cuda"], "--device", marks=NO_CUDA),
    ("inference", ["--sizes", "60"], "--sizes"),
    ("inference", ["--batches", "1", "0"], "--batches"),
    ("inference", ["--warmup", "-1"], "--warmup"),
    ("inference", ["--repeats", "0"], "--repeats"),
    ("inference", ["--tol", "0"], "--tol"),
    ("inference", ["--peak-tflops", "-5"], "--peak-tflops"),
    ("inference", ["--compile-budget-s", "inf"], "--compile-budget-s"),
    ("inference", ["--threads", "0"], "--threads"),
    ("inference", ["--quick", "--repeats", "5"], "--repeats"),
    ("inference", ["--quick", "--compile-mode", "max-autotune"], "--compile-mode"),
    ("inference", ["--no-compile", "--compile-budget-s", "5"], "--compile-budget-s"),
    ("inference", ["--out", UNWRITABLE], "--out"),
    ("memory_plan", ["--jobs", "0", "--out", "{tmp}/o"], "--jobs"),
    ("memory_plan", ["--out", UNWRITABLE], "--out"),
    ("memory_plan", ["--plan", "--out", "{tmp}/o"], "--plan"),
    ("sr_strength", ["--model", "{tmp}/empty", "--out", "{tmp}/o"], "--model"),
    ("sr_strength", ["--strengths", "0", "1.5", "--out", "{tmp}/o"], "--strengths"),
    ("sr_strength", ["--quick", "--strengths", "0.5"], "--strengths"),
    ("sr_throughput", ["--folder", "{tmp}/missing"], "--folder"),
    ("sr_throughput", ["--folder", "{tmp}/empty", "--count", "2"], "--folder"),
    ("sr_throughput", ["--folder", "{tmp}/empty", "--generated"], "--generated"),
    ("sr_throughput", ["--count", "0"], "--count"),
    ("sr_throughput", ["--folder-side", "30"], "--folder-side"),
    ("sr_throughput", ["--large", "-64"], "--large"),
    ("sr_throughput", ["--upscale", "0"], "--upscale"),
    ("sr_throughput", ["--batch-size", "0"], "--batch-size"),
    ("sr_throughput", ["--ways", "turbo"], "--ways"),
    ("sr_throughput", ["--quick", "--ways", "eager", "compiled"], "--ways"),
    pytest.param("sr_throughput", ["--device", "cuda"], "--device", marks=NO_CUDA),
    ("sr_throughput", ["--out", UNWRITABLE], "--out"),
    ("tiled_vae", ["--sizes", "100"], "--sizes"),
    ("tiled_vae", ["--encoder-tile", "30", "8"], "--encoder-tile"),
    ("tiled_vae", ["--decoder-tile", "0", "2"], "--decoder-tile"),
    ("tiled_vae", ["--repeats", "0"], "--repeats"),
    ("tiled_vae", ["--quick", "--warmup", "2"], "--warmup"),
    ("tiled_vae", ["--config", "sdxl"], "--config"),
    pytest.param("tiled_vae", ["--device", "cuda"], "--device", marks=NO_CUDA),
    ("tiled_vae", ["--out", UNWRITABLE], "--out"),
    ("tiny_sr_headroom", ["--sides", "32"], "--sides"),
    ("tiny_sr_headroom", ["--steps", "0"], "--steps"),
    ("tiny_sr_headroom", ["--every", "0"], "--every"),
    ("tiny_sr_headroom", ["--seed", "-1"], "--seed"),
    ("tiny_sr_headroom", ["--quick", "--steps", "10"], "--steps"),
    ("tiny_sr_headroom", ["--quick", "--sides", "256"], "--sides"),
    ("tiny_sr_headroom", ["--out", UNWRITABLE], "--out"),
    ("train_step", ["--batch", "0"], "--batch"),
    ("train_step", ["--latent", "7"], "--latent"),
    ("train_step", ["--grad-tol", "0"], "--grad-tol"),
    ("train_step", ["--quick", "--warmup", "5"], "--warmup"),
    ("train_step", ["--config", "sd3-large"], "--config"),
    ("train_step", ["--dtype", "fp8"], "--dtype"),
    pytest.param("train_step", ["--device", "cuda"], "--device", marks=NO_CUDA),
    ("train_step", ["--out", UNWRITABLE], "--out"),
    ("train_step_flux", ["--grad-tol", "0"], "--grad-tol"),
    ("train_step_flux", ["--quick", "--repeats", "4"], "--repeats"),
    ("train_step_flux", ["--latent", "0"], "--latent"),
    ("train_step_flux", ["--config", "flux-schnell"], "--config"),
]


@pytest.fixture
def tmp(tmp_path):
    (tmp_path / "a_file").write_text("a file, not a folder")
    (tmp_path / "empty").mkdir()
    (tmp_path / "not.json").write_text("not JSON")
    (tmp_path / "other.json").write_text(json.dumps({"title": "x", "machine": {}, "rows": []}))
    return tmp_path


@pytest.fixture(autouse=True)
def refuse_within_seconds():
    """A row whose benchmark starts working (the flag was not refused) fails here, not after
    minutes of benchmark."""
    def stop(*_):
        raise TimeoutError("the benchmark started work instead of refusing the flag")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def run_cli(name: str, argv: list[str]) -> int:
    """The benchmark as ``python -m benchmarks.<name> argv`` runs it (its __main__ line)."""
    module = importlib.import_module(f"benchmarks.{name}")
    try:
        return options.entry(module.main, module.PROG)(argv)
    except SystemExit as exc:  # argparse's errors
        return exc.code


@pytest.mark.parametrize(("name", "argv", "flag"), ROWS)
def test_a_bad_flag_is_one_line_naming_it_and_exit_2(name, argv, flag, tmp, capsys):
    argv = [a.format(tmp=tmp) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp / "out")]
    if name in ("compare_losses", "natural_patches"):
        argv.append("--no-docs-assets")
    status = run_cli(name, argv)
    err = capsys.readouterr().err.strip()
    assert status == 2, (status, err)
    assert len(err.splitlines()) == 1 and err.startswith(f"benchmarks.{name}: error: "), err
    assert flag in err, err
    assert not (tmp / "out").exists() or not any((tmp / "out").iterdir())  # no work began


def test_the_main_block_exits_2_without_a_traceback(tmp):
    """Once through a real ``python -m``: the exit status and stderr a user sees."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--quick",
                           "--repeats", "2", "--out", str(tmp / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        "benchmarks.train_step: error: --repeats conflicts with --quick, which runs 1 warm-up "
        "and 3 timed steps: drop --quick or --repeats"]


def test_given_tells_flags_from_defaults():
    parser = options.parser("prog", "doc")
    options.add_timing(parser, warmup=1, repeats=3)
    args = options.parse(parser, ["--warmup", "1"])  # given with its default value: still given
    assert args.given == {"warmup"} and (args.warmup, args.repeats) == (1, 3)
