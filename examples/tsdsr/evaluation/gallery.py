"""evaluate.py's per-image table and its gallery of the images of lowest PSNR (SR | HR)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from examples.tsdsr.evaluation.metrics import METRICS
from scoredistill.sr.imageio import load_image

WORST_COUNT = 5
MAX_ROW_HEIGHT = 512
"""Taller images are shown downscaled to this height (the gallery stays a few MB)."""
CAPTION_HEIGHT = 18


def per_image_table(report: dict) -> str:
    """Markdown: one row per evaluated image (by name), one column per per-image metric."""
    names = [n for n in report["metrics"] if METRICS[n].kind != "folder"]
    arrows = ["↑" if METRICS[n].higher_is_better else "↓" for n in names]
    lines = ["| Image | " + " | ".join(f"{n.upper()}{a}" for n, a in zip(names, arrows,
                                                                           strict=True)) + " |",
             "|---|" + "---:|" * len(names)]
    for image, scores in sorted(report["per_image"].items()):
        cells = ["n/a" if scores[n] is None else f"{scores[n]:.4f}" for n in names]
        lines.append(f"| {_cell(image)} | " + " | ".join(cells) + " |")
    lines += [f"| {_cell(image)} | failed: {_cell(reason)} |" + " |" * (len(names) - 1)
              for image, reason in sorted(report["failed"].items())]
    return "\n".join(lines) + "\n"


def worst_by_psnr(report: dict, count: int = WORST_COUNT) -> list[tuple[str, float]]:
    """The ``count`` evaluated images of lowest PSNR, lowest first (ties by name); empty when
    PSNR was not measured."""
    if "psnr" not in report["metrics"]:
        return []
    scored = sorted((scores["psnr"], name) for name, scores in report["per_image"].items())
    return [(name, psnr) for psnr, name in scored[:count]]


def gallery_png(report: dict, count: int = WORST_COUNT) -> bytes | None:
    """PNG of the ``count`` images of lowest PSNR, one row each: SR | HR, captioned with the
    rank, name and PSNR; None when there is none (no image evaluated, or no PSNR)."""
    worst = worst_by_psnr(report, count)
    if not worst:
        return None
    rows = [_row(Path(report["sr_dir"]) / name, Path(report["hr_dir"]) / name,
                 f"{rank}. {name}   PSNR {psnr:.2f} dB   (SR | HR)")
            for rank, (name, psnr) in enumerate(worst, start=1)]
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    top = 0
    for row in rows:
        sheet.paste(row, (0, top))
        top += row.height
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def _row(sr_path: Path, hr_path: Path, caption: str) -> Image.Image:
    """A caption band over SR | HR (both scaled to at most MAX_ROW_HEIGHT px high)."""
    sr, hr = (_pil(p) for p in (sr_path, hr_path))
    row = Image.new("RGB", (sr.width + hr.width, CAPTION_HEIGHT + sr.height), "white")
    ImageDraw.Draw(row).text((4, 3), caption, fill="black")
    row.paste(sr, (0, CAPTION_HEIGHT))
    row.paste(hr, (sr.width, CAPTION_HEIGHT))
    return row


def _pil(path: Path) -> Image.Image:
    rgb = load_image(path).rgb  # (3, H, W) in [0, 1], as evaluate.py scored it
    image = Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    if image.height > MAX_ROW_HEIGHT:
        width = max(1, round(image.width * MAX_ROW_HEIGHT / image.height))
        image = image.resize((width, MAX_ROW_HEIGHT), Image.Resampling.LANCZOS)
    return image


def _cell(text: str) -> str:
    """``text`` safe inside a markdown table cell (one line, no column separator)."""
    return " ".join(str(text).split()).replace("|", "\\|")
