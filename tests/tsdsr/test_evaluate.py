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
from examples.tsdsr.evaluation.metrics import psnr_y, ssim_y
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
        assert scores == pytest.approx({"psnr": psnr, "ssim": ssim, "grid": None})
    average = np.mean([s["psnr"] for s in report["per_image"].values()])
    assert report["average"]["psnr"] == pytest.approx(average)
    assert list(report["failed"]) == ["corrupt.png"]
    assert "corrupt.png" in report["failed"]["corrupt.png"]
    assert report["sr_only"] == ["sr_only.png"] and report["hr_only"] == ["hr_only.png"]
    assert report["machine"]["torch"] == torch.__version__ and report["date"]

    table = (out / "metrics.md").read_text()
    assert "| Folder | PSNR↑ | SSIM↑ |" in table
    assert f"| sr | {report['average']['psnr']:.4f} | {report['average']['ssim']:.4f} |" in table
    assert sorted(p.name for p in out.iterdir()) == sorted(evaluate.REPORT_FILES)
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
    assert evaluate.main(["--sr", str(sr), "--hr", str(hr), "--out", str(tmp_path / out)]) == 2
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
    assert report["average"] == {"psnr": None, "ssim": None, "grid": None}
    evaluate.write_report(report, tmp_path / "out")
    assert "n/a" in (tmp_path / "out" / "metrics.md").read_text()


def test_pyiqa_metrics_fail_fast_without_pyiqa(folders, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyiqa", None)
    sr, hr = folders
    with pytest.raises(ImportError, match=r"scoredistill\[eval\]"):
        evaluate.evaluate_folders(sr, hr, metrics=["psnr", "lpips"], progress=False)


# --- issue 23 (measures): the grid column, the per-image table and the worst-PSNR gallery ------

NOISE = (0.0, 0.02, 0.04, 0.01, 0.08, 0.03, 0.06)  # per SR image; the grid one gets 0.005


@pytest.fixture
def photo_folders(tmp_path):
    """HR: scikit-image photos (128 px short side); SR: each with its own noise, one with a
    16 px grid planted (`grid.png`)."""
    pytest.importorskip("skimage", reason="the photos are scikit-image's bundled ones")
    from examples.tsdsr.data.tiny_data import TRAIN, photo
    from tests.sr.test_artifacts import with_grid

    sr, hr = tmp_path / "sr", tmp_path / "hr"
    sr.mkdir()
    hr.mkdir()
    g = torch.Generator().manual_seed(0)
    names = [*TRAIN[:len(NOISE)], "grid"]
    for name, sigma in zip(names, (*NOISE, 0.005), strict=True):
        clean = photo(name if name != "grid" else "astronaut", 128)
        noisy = (clean + sigma * torch.randn(clean.shape, generator=g)).clamp(0, 1)
        if name == "grid":
            noisy = with_grid(noisy[None], 0.05)[0]
        for folder, image in ((hr, clean), (sr, noisy)):
            array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(array).save(folder / f"{name}.png")
    return sr, hr


def test_report_has_grid_column_per_image_table_and_worst_psnr_gallery(photo_folders, tmp_path):
    sr, hr = photo_folders
    out = tmp_path / "report"
    assert evaluate.main(["--sr", str(sr), "--hr", str(hr), "--out", str(out),
                          "--no-progress"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    per_image = report["per_image"]
    assert report["metrics"] == ["psnr", "ssim", "grid"] and report["grid_period"] == 16
    assert per_image["grid.png"]["grid"] > 1.0  # the planted grid is flagged ...
    assert all(s["grid"] < 1.0 for n, s in per_image.items() if n != "grid.png")  # ... alone
    assert report["average"]["grid"] == pytest.approx(np.mean([s["grid"]
                                                               for s in per_image.values()]))

    table = (out / "per_image.md").read_text().splitlines()
    assert table[0] == "| Image | PSNR↑ | SSIM↑ | GRID↓ |"
    assert table[2:] == [f"| {n} | {s['psnr']:.4f} | {s['ssim']:.4f} | {s['grid']:.4f} |"
                         for n, s in sorted(per_image.items())]

    # The 5 lowest PSNRs, recomputed from the files, lowest first; each row shows its SR | HR.
    psnr = {p.name: _expected(sr, hr, p.name)[0] for p in sr.iterdir()}
    worst = sorted(psnr, key=psnr.get)[:5]
    gallery = np.asarray(Image.open(out / "worst_psnr.png").convert("RGB"))
    top = 0
    for name in worst:
        sr_pixels, hr_pixels = (np.asarray(Image.open(d / name).convert("RGB")) for d in (sr, hr))
        h, w = sr_pixels.shape[:2]
        row = gallery[top + 18:top + 18 + h]
        assert (row[:, :w] == sr_pixels).all() and (row[:, w:2 * w] == hr_pixels).all(), name
        assert (gallery[top:top + 18] < 128).any()  # the caption's text
        top += 18 + h
    assert gallery.shape[0] == top


def test_gallery_caption_order_follows_psnr(photo_folders):
    from examples.tsdsr.evaluation.gallery import worst_by_psnr

    sr, hr = photo_folders
    report = evaluate.evaluate_folders(sr, hr, metrics=["psnr"], progress=False)
    worst = worst_by_psnr(report)
    psnr = {p.name: _expected(sr, hr, p.name)[0] for p in sr.iterdir()}
    assert [n for n, _ in worst] == sorted(psnr, key=psnr.get)[:5]
    assert [v for _, v in worst] == pytest.approx(sorted(psnr.values())[:5])


def test_report_without_psnr_writes_no_gallery_and_drops_a_stale_one(folders, tmp_path):
    sr, hr = folders
    out = tmp_path / "report"
    out.mkdir()
    (out / "worst_psnr.png").write_bytes(b"an earlier run's gallery")
    report = evaluate.evaluate_folders(sr, hr, metrics=["ssim"], progress=False)
    evaluate.write_report(report, out)
    assert not (out / "worst_psnr.png").exists()
    assert (out / "per_image.md").read_text().splitlines()[0] == "| Image | SSIM↑ |"


def test_seam_metric_sees_steps_at_the_default_tile_borders():
    from examples.tsdsr.evaluation.metrics import seam_excess

    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 32, 32, generator=g), size=1024,
                                             mode="bicubic", align_corners=False).clamp(0, 1)
    stepped = smooth.clone()
    stepped[..., 384:640, :] = (stepped[..., 384:640, :] + 0.1).clamp(0, 1)  # two tile borders
    assert abs(seam_excess(smooth)) < 0.25 < seam_excess(stepped)
    assert seam_excess(smooth[..., :512, :512]) is None  # within one tile: nothing to measure


@pytest.mark.parametrize("period", ["15", "2", "x"])
def test_cli_refuses_a_bad_grid_period(folders, period, capsys):
    sr, hr = folders
    with pytest.raises(SystemExit) as info:
        evaluate.main(["--sr", str(sr), "--hr", str(hr), "--grid-period", period])
    assert info.value.code == 2
    assert "--grid-period" in capsys.readouterr().err


def test_grid_average_skips_images_too_small_for_it(photo_folders):
    from examples.tsdsr.evaluation.gallery import per_image_table

    sr, hr = photo_folders
    _write(sr / "small.png", 1)  # 24 px: under 4 periods of 16
    _write(hr / "small.png", 2)
    report = evaluate.evaluate_folders(sr, hr, progress=False)
    grids = {name: scores["grid"] for name, scores in report["per_image"].items()}
    assert grids.pop("small.png") is None and len(grids) == 8
    assert report["average"]["grid"] == pytest.approx(np.mean(list(grids.values())))
    small = report["per_image"]["small.png"]
    assert f"| small.png | {small['psnr']:.4f} | {small['ssim']:.4f} | n/a |" in (
        per_image_table(report))
