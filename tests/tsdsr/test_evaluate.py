"""End to end: the TSD-SR evaluation CLI on tiny generated folders."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from examples.tsdsr import evaluate
from examples.tsdsr.metrics import psnr_y, ssim_y
from scoredistill.sr.imageio import load_image

REPO_ROOT = Path(__file__).resolve().parents[2]
SIZE = 24


def _write(path: Path, seed: int, size: int = SIZE) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def folders(tmp_path):
    """SR/HR folders with two good pairs, one corrupt SR file and one name on each side only."""
    sr, hr = tmp_path / "sr", tmp_path / "hr"
    sr.mkdir()
    hr.mkdir()
    for seed, name in enumerate(["a.png", "b b.png", "corrupt.png"]):
        _write(hr / name, seed)
        _write(sr / name, seed + 100)
    (sr / "corrupt.png").write_bytes((sr / "corrupt.png").read_bytes()[:60])
    _write(sr / "sr_only.png", 7)
    _write(hr / "hr_only.png", 8)
    return sr, hr


def _expected(sr: Path, hr: Path, name: str) -> tuple[float, float]:
    x, y = load_image(sr / name).rgb[None], load_image(hr / name).rgb[None]
    return psnr_y(x, y).item(), ssim_y(x, y).item()


def test_cli_evaluates_good_pairs_reports_problems_and_exits_nonzero(folders, tmp_path, capsys):
    sr, hr = folders
    hr_before = sorted(p.name for p in hr.iterdir())
    out = tmp_path / "report"
    code = evaluate.main(["--sr", str(sr), "--hr", str(hr), "--out", str(out), "--no-progress"])
    assert code == 1

    report = json.loads((out / "metrics.json").read_text())
    assert sorted(report["per_image"]) == ["a.png", "b b.png"]
    for name, scores in report["per_image"].items():
        psnr, ssim = _expected(sr, hr, name)
        assert scores == pytest.approx({"psnr": psnr, "ssim": ssim})
    average = np.mean([s["psnr"] for s in report["per_image"].values()])
    assert report["average"]["psnr"] == pytest.approx(average)
    assert list(report["failed"]) == ["corrupt.png"]
    assert "corrupt.png" in report["failed"]["corrupt.png"]
    assert report["sr_only"] == ["sr_only.png"] and report["hr_only"] == ["hr_only.png"]
    assert report["machine"]["torch"] == torch.__version__ and report["date"]

    table = (out / "metrics.md").read_text()
    assert "| Folder | PSNR↑ | SSIM↑ |" in table
    assert f"| sr | {report['average']['psnr']:.4f} | {report['average']['ssim']:.4f} |" in table
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "metrics.md"]
    assert sorted(p.name for p in hr.iterdir()) == hr_before

    stderr = capsys.readouterr().err
    for name in ("corrupt.png", "sr_only.png", "hr_only.png"):
        assert name in stderr


def test_module_runs_as_a_script_with_default_out_dir(folders):
    sr, hr = folders
    (sr / "corrupt.png").unlink()
    (sr / "sr_only.png").unlink()
    (hr / "corrupt.png").unlink()
    (hr / "hr_only.png").unlink()
    result = subprocess.run(
        [sys.executable, "-m", "examples.tsdsr.evaluate", "--sr", str(sr), "--hr", str(hr)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((sr.parent / "metrics_sr" / "metrics.json").read_text())
    assert report["num_evaluated"] == 2 and not report["failed"]


@pytest.mark.parametrize("out", ["hr", "hr/inner"])
def test_cli_refuses_to_write_into_the_hr_folder(folders, tmp_path, out):
    sr, hr = folders
    with pytest.raises(SystemExit) as info:
        evaluate.main(["--sr", str(sr), "--hr", str(hr), "--out", str(tmp_path / out)])
    assert info.value.code == 2
    assert not (hr / "metrics.json").exists() and not (hr / "inner").exists()


def test_cli_rejects_unknown_metrics_and_missing_folders(folders, tmp_path):
    sr, hr = folders
    for argv in (
        ["--sr", str(sr), "--hr", str(hr), "--metrics", "psnr,brisque"],
        ["--sr", str(tmp_path / "nope"), "--hr", str(hr)],
    ):
        with pytest.raises(SystemExit) as info:
            evaluate.main(argv)
        assert info.value.code == 2


def test_evaluate_folders_reports_size_mismatch_as_failure(tmp_path):
    sr, hr = tmp_path / "sr", tmp_path / "hr"
    sr.mkdir()
    hr.mkdir()
    _write(sr / "x.png", 0, size=SIZE)
    _write(hr / "x.png", 1, size=SIZE * 2)
    _write(sr / "y.png", 2)
    _write(hr / "y.png", 3)
    report = evaluate.evaluate_folders(sr, hr, metrics=["psnr"], progress=False)
    assert "differs from HR" in report["failed"]["x.png"]
    assert list(report["per_image"]) == ["y.png"]
    assert report["average"] == {"psnr": report["per_image"]["y.png"]["psnr"]}


def test_evaluate_folders_without_pairs_averages_to_none(tmp_path):
    (tmp_path / "sr").mkdir()
    (tmp_path / "hr").mkdir()
    report = evaluate.evaluate_folders(tmp_path / "sr", tmp_path / "hr", progress=False)
    assert report["average"] == {"psnr": None, "ssim": None}
    evaluate.write_report(report, tmp_path / "out")
    assert "n/a" in (tmp_path / "out" / "metrics.md").read_text()


def test_pyiqa_metrics_fail_fast_without_pyiqa(folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyiqa", None)
    sr, hr = folders
    with pytest.raises(ImportError, match=r"scoredistill\[eval\]"):
        evaluate.evaluate_folders(sr, hr, metrics=["psnr", "lpips"], progress=False)
