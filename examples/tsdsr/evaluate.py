"""Evaluate a folder of SR outputs against HR references with the TSD-SR paper's metrics (Sec 4.1).

    python -m examples.tsdsr.evaluate --sr DIR --hr DIR [--metrics psnr,ssim,...] [--out DIR]

Images are paired by identical file name. Writes `metrics.json` (per image, averages, machine,
date) and `metrics.md` (one Table-1-style row) into --out, default `<sr>/../metrics_<sr name>`.
Unreadable images and unpaired names are reported at the end and make the exit status 1; the
other images are still evaluated.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from examples.tsdsr import metrics as metrics_lib
from scoredistill.sr.imageio import list_images, load_image, write_atomic

DEFAULT_METRICS = ("psnr", "ssim")


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
) -> dict:
    """Per-image and average metrics of SR images against same-named HR images, as a JSON-able dict.

    Failures (unreadable files, size mismatches, metric errors) are collected under `failed`
    instead of raised, so one bad file does not cost the whole evaluation.
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
            scores = _score_pair(sr_path, hr_path, per_image_metrics, models, device)
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
    """Write `metrics.json` and `metrics.md` into `out_dir` atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    write_atomic(out_dir / "metrics.json", text.encode())
    write_atomic(out_dir / "metrics.md", markdown_table(report).encode())


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


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 all evaluated, 1 some failed or unpaired)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sr", required=True, type=Path, help="folder of super-resolved images")
    parser.add_argument("--hr", required=True, type=Path, help="folder of reference images")
    parser.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        help=f"comma-separated, from: {', '.join(metrics_lib.METRICS)}",
    )
    parser.add_argument("--out", type=Path, help="report folder; default <sr>/../metrics_<sr>")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)

    names = [m.strip().lower() for m in args.metrics.split(",") if m.strip()]
    try:
        metrics_lib.check_metric_names(names)
    except ValueError as exc:
        parser.error(str(exc))
    for folder, flag in ((args.sr, "--sr"), (args.hr, "--hr")):
        if not folder.is_dir():
            parser.error(f"{flag} {folder} is not a folder")
    out_dir = (args.out or default_out_dir(args.sr)).resolve()
    if out_dir == args.hr.resolve() or out_dir.is_relative_to(args.hr.resolve()):
        parser.error(f"--out {out_dir} is inside the HR folder; refusing to write there")

    report = evaluate_folders(
        args.sr, args.hr, names, device=args.device, progress=not args.no_progress
    )
    write_report(report, out_dir)
    print(markdown_table(report))
    print(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'metrics.md'}")
    issues = problems(report)
    for line in issues:
        print(line, file=sys.stderr)
    if issues:
        print(f"{len(issues)} problem(s); see above", file=sys.stderr)
    return 1 if issues else 0


def _score_pair(
    sr_path: Path,
    hr_path: Path,
    names: list[str],
    models: dict,
    device: torch.device,
) -> dict[str, float]:
    sr = load_image(sr_path).rgb[None].to(device)
    hr = load_image(hr_path).rgb[None].to(device)
    if sr.shape != hr.shape:
        raise ValueError(f"size {tuple(sr.shape[-2:])} differs from HR {tuple(hr.shape[-2:])}")
    scores = {}
    with torch.no_grad():
        for name in names:
            if name in metrics_lib.BUILTIN_METRICS:
                value = metrics_lib.BUILTIN_METRICS[name](sr, hr)
            elif metrics_lib.METRICS[name].kind == "fr":
                value = models[name](sr, hr)
            else:
                value = models[name](sr)
            scores[name] = float(value.reshape(-1)[0])
    return scores


def _mean(values: list[float]) -> float | None:
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
