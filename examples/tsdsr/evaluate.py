"""Evaluate a folder of SR outputs against HR references with the TSD-SR paper's metrics (Sec 4.1).

    python -m examples.tsdsr.evaluate --sr DIR --hr DIR [--metrics psnr,ssim,...] [--out DIR]

Images are paired by identical file name. Writes `metrics.json` (per image, averages, machine,
date), `metrics.md` (one Table-1-style row), `per_image.md` (one row per image) and
`worst_psnr.png` (SR | HR of the 5 images of lowest PSNR) into --out, default
`<sr>/../metrics_<sr name>`; an earlier report there is kept unless --overwrite is given (then
each file is replaced atomically).
Unreadable images and unpaired names are reported at the end and make the exit status 1; the
other images are still evaluated.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from tqdm import tqdm

from examples.tsdsr.evaluation import metrics as metrics_lib
from examples.tsdsr.evaluation.gallery import gallery_png, per_image_table
from scoredistill.cli import (
    EXIT_ITEMS_FAILED,
    EXIT_OK,
    ArgumentParser,
    UserError,
    entry_point,
    existing_dir,
    number,
    writable_dir,
)
from scoredistill.cli import device as device_type
from scoredistill.sr.imageio import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    list_images,
    load_image,
    write_atomic,
)

DEFAULT_METRICS = ("psnr", "ssim", "grid")
# What write_report writes into --out.
REPORT_FILES = ("metrics.json", "metrics.md", "per_image.md", "worst_psnr.png")


@dataclass(frozen=True)
class Pairing:
    """SR/HR files with the same name, and the names found on one side only."""

    pairs: list[tuple[Path, Path]]
    sr_only: list[str]
    hr_only: list[str]


def pair_images(sr_dir: str | os.PathLike, hr_dir: str | os.PathLike) -> Pairing:
    """Pair the image files of two folders by identical file name."""
    sr_files = {p.name: p for p in list_images(sr_dir)}
    hr_files = {p.name: p for p in list_images(hr_dir)}
    common = sorted(sr_files.keys() & hr_files.keys())
    return Pairing(
        pairs=[(sr_files[name], hr_files[name]) for name in common],
        sr_only=sorted(sr_files.keys() - hr_files.keys()),
        hr_only=sorted(hr_files.keys() - sr_files.keys()),
    )


def evaluate_folders(
    sr_dir: str | os.PathLike,
    hr_dir: str | os.PathLike,
    metrics: Sequence[str] = DEFAULT_METRICS,
    device: str | torch.device = "cpu",
    pretrained_model_paths: dict[str, str] | None = None,
    progress: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    grid_period: int = metrics_lib.GRID_PERIOD,
) -> dict:
    """Per-image and average metrics of SR images against same-named HR images, as a JSON-able dict.

    Failures (unreadable files, size mismatches, metric errors) are collected under `failed`
    instead of raised, so one bad file does not cost the whole evaluation. The grid and seam
    measures are None for images they do not apply to, and averaged over the others;
    ``grid_period``: the grid measure's period in px (16 for SD3, 8 for SD 1.x/2.x).
    """
    metrics = list(metrics)
    metrics_lib.check_metric_names(metrics)
    device = torch.device(device)
    pairing = pair_images(sr_dir, hr_dir)
    paths = pretrained_model_paths or {}
    # Create pyiqa models before the loop so a missing pyiqa fails fast, not per image.
    models = {
        name: metrics_lib.create_pyiqa_metric(name, device, paths.get(name))
        for name in metrics
        if name in metrics_lib.PYIQA_METRICS
    }
    per_image_metrics = [m for m in metrics if metrics_lib.METRICS[m].kind != "folder"]

    per_image: dict[str, dict[str, float]] = {}
    failed: dict[str, str] = {}
    bar = tqdm(pairing.pairs, desc="evaluating", unit="img", disable=not progress)
    for sr_path, hr_path in bar:
        try:
            scores = _score_pair(sr_path, hr_path, per_image_metrics, models, device,
                                 max_pixels, grid_period)
            per_image[sr_path.name] = scores
        except (ValueError, RuntimeError) as exc:
            failed[sr_path.name] = str(exc)

    average = {
        name: _mean([scores[name] for scores in per_image.values()]) for name in per_image_metrics
    }
    for name in metrics:
        if metrics_lib.METRICS[name].kind == "folder":
            try:
                average[name] = float(models[name](str(sr_dir), str(hr_dir)))
            except (ValueError, RuntimeError, OSError) as exc:
                failed[f"<{name} over folders>"] = str(exc)
                average[name] = None

    return {
        "sr_dir": str(Path(sr_dir).resolve()),
        "hr_dir": str(Path(hr_dir).resolve()),
        "metrics": metrics,
        "grid_period": grid_period,
        "num_pairs": len(pairing.pairs),
        "num_evaluated": len(per_image),
        "average": average,
        "per_image": per_image,
        "failed": failed,
        "sr_only": pairing.sr_only,
        "hr_only": pairing.hr_only,
        "machine": _machine(device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_report(report: dict, out_dir: str | os.PathLike) -> None:
    """Write `metrics.json`, `metrics.md`, `per_image.md` and `worst_psnr.png` (when PSNR was
    measured on some image) into `out_dir`, each atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    write_atomic(out_dir / "metrics.json", text.encode())
    write_atomic(out_dir / "metrics.md", markdown_table(report).encode())
    write_atomic(out_dir / "per_image.md", per_image_table(report).encode())
    gallery = gallery_png(report)
    if gallery is None:  # an earlier run's gallery would show other images than this report
        (out_dir / "worst_psnr.png").unlink(missing_ok=True)
    else:
        write_atomic(out_dir / "worst_psnr.png", gallery)


def markdown_table(report: dict) -> str:
    """One row per folder, one column per metric with its better direction (paper Table 1 style)."""
    names = report["metrics"]
    arrows = ["↑" if metrics_lib.METRICS[n].higher_is_better else "↓" for n in names]
    header = (
        "| Folder | "
        + " | ".join(f"{n.upper()}{a}" for n, a in zip(names, arrows, strict=True))
        + " |"
    )
    rule = "|---|" + "---:|" * len(names)
    values = [report["average"].get(n) for n in names]
    cells = ["n/a" if v is None else f"{v:.4f}" for v in values]
    row = f"| {Path(report['sr_dir']).name} | " + " | ".join(cells) + " |"
    note = (
        f"\n{report['num_evaluated']} of {report['num_pairs']} image pairs evaluated against "
        f"`{report['hr_dir']}` on {report['date']}.\n"
    )
    if "grid" in names:
        note += (f"GRID: dB of power at the {report['grid_period']} px grid's harmonics over "
                 "their neighbouring frequencies (clean photos: below 1).\n")
    if "seam" in names:
        note += ("SEAM: border-gradient excess at scoredistill-sr's default tile borders "
                 "(0: seamless).\n")
    return "\n".join([header, rule, row]) + "\n" + note


def problems(report: dict) -> list[str]:
    """Human-readable lines for every failed image and unpaired file name in a report."""
    lines = [f"failed: {name}: {reason}" for name, reason in report["failed"].items()]
    lines += [f"no HR image named {name} (SR only)" for name in report["sr_only"]]
    lines += [f"no SR image named {name} (HR only)" for name in report["hr_only"]]
    return lines


def default_out_dir(sr_dir: str | os.PathLike) -> Path:
    """`<sr>/../metrics_<sr name>`: next to the outputs, never inside the HR folder."""
    sr_dir = Path(sr_dir).resolve()
    return sr_dir.parent / f"metrics_{sr_dir.name}"


@entry_point("evaluate")
def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 all evaluated, 1 some failed or unpaired,
    2 a usage error: nothing evaluated)."""
    parser = ArgumentParser(prog="evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sr", required=True, type=existing_dir,
                        help="folder of super-resolved images")
    parser.add_argument("--hr", required=True, type=existing_dir,
                        help="folder of reference images")
    parser.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        help=f"comma-separated, from: {', '.join(metrics_lib.METRICS)}. grid: the grid-artifact "
             "measure (dB, below 1 on clean photos); seam: the border-gradient excess at "
             "scoredistill-sr's default tile borders, for outputs at the size the model worked "
             "at (output short side >= its --process-size)",
    )
    parser.add_argument("--grid-period", type=number(int, low=4), default=metrics_lib.GRID_PERIOD,
                        help="the grid measure's period in px: VAE factor x patch size (16 for "
                             "SD3, 8 for SD 1.x/2.x UNets)")
    parser.add_argument("--out", type=Path, help="report folder; default <sr>/../metrics_<sr>")
    parser.add_argument("--device", type=device_type,
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-pixels", type=number(int, low=1), default=DEFAULT_MAX_PIXELS,
                        help="refuse images of more pixels (decompression bombs)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the report files an earlier run left in --out")
    args = parser.parse_args(argv)

    names = [m.strip().lower() for m in args.metrics.split(",") if m.strip()]
    try:
        metrics_lib.check_metric_names(names)
    except ValueError as exc:
        parser.error(f"argument --metrics: {exc}")
    if not names:
        parser.error("argument --metrics: no metric named")
    if args.grid_period % 2:
        parser.error(f"argument --grid-period: must be even (VAE factor x patch size), got "
                     f"{args.grid_period}")
    if args.sr.resolve() == args.hr.resolve():
        raise UserError(f"--sr and --hr are the same folder ({args.hr}): every image would "
                        "score as identical; give the super-resolved folder as --sr")
    for folder, flag in ((args.sr, "--sr"), (args.hr, "--hr")):
        if not list_images(folder):
            raise UserError(f"{flag} {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    out_dir = (args.out or default_out_dir(args.sr)).resolve()
    if out_dir == args.hr.resolve() or out_dir.is_relative_to(args.hr.resolve()):
        raise UserError(f"--out {out_dir} is inside the HR folder; refusing to write there")
    writable_dir(out_dir, "--out")
    existing = [name for name in REPORT_FILES if (out_dir / name).exists()]
    if existing and not args.overwrite:
        raise UserError(f"--out {out_dir} already holds {', '.join(existing)} (an earlier "
                        "report): give --overwrite to replace them, or another --out")

    try:
        report = evaluate_folders(args.sr, args.hr, names, device=args.device,
                                  progress=not args.no_progress, max_pixels=args.max_pixels,
                                  grid_period=args.grid_period)
    except (metrics_lib.MissingWeights, metrics_lib.UnsafeWeights, ImportError) as exc:
        raise UserError(str(exc).splitlines()[0]) from None
    write_report(report, out_dir)
    print(markdown_table(report))
    written = [name for name in REPORT_FILES if (out_dir / name).exists()]
    print(f"wrote {', '.join(written)} into {out_dir}")
    issues = problems(report)
    for line in issues:
        print(line, file=sys.stderr)
    if issues:
        print(f"{len(issues)} problem(s); see above", file=sys.stderr)
    return EXIT_ITEMS_FAILED if issues else EXIT_OK


def _score_pair(
    sr_path: Path,
    hr_path: Path,
    names: list[str],
    models: dict,
    device: torch.device,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    grid_period: int = metrics_lib.GRID_PERIOD,
) -> dict[str, float | None]:
    sr = load_image(sr_path, max_pixels=max_pixels).rgb[None].to(device)
    hr = load_image(hr_path, max_pixels=max_pixels).rgb[None].to(device)
    if sr.shape != hr.shape:
        raise ValueError(f"size {tuple(sr.shape[-2:])} differs from HR {tuple(hr.shape[-2:])}")
    scores = {}
    with torch.no_grad():
        for name in names:
            if name == "grid":
                scores[name] = metrics_lib.grid_db(sr, grid_period)
                continue
            if name == "seam":
                scores[name] = metrics_lib.seam_excess(sr)
                continue
            if name in metrics_lib.BUILTIN_METRICS:
                value = metrics_lib.BUILTIN_METRICS[name](sr, hr)
            elif metrics_lib.METRICS[name].kind == "fr":
                value = models[name](sr, hr)
            else:
                value = models[name](sr)
            scores[name] = float(value.reshape(-1)[0])
    return scores


def _mean(values: list[float | None]) -> float | None:
    """The mean of the values that are not None (None if none is)."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _machine(device: torch.device) -> dict[str, str]:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


if __name__ == "__main__":
    sys.exit(main())
