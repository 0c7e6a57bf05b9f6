"""The tiny TSD-SR pipeline end to end, no weights needed: precompute -> train -> infer -> evaluate.

    python -m examples.tsdsr.run_tiny [--steps 200] [--out outputs/tsdsr_tiny]

Trains the embedded tiny SD3-shaped model on scikit-image's bundled photos, super-resolves the
held-out photos (Real-ESRGAN-degraded, fixed seed) with the untrained and the trained student via
infer.py, and writes ``metrics.md`` (PSNR/SSIM on Y, LPIPS with a RANDOM AlexNet backbone) and
the images under ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from examples.tsdsr import infer
from examples.tsdsr.checkpoint import checkpoints
from examples.tsdsr.data import DegradationConfig, degrade
from examples.tsdsr.evaluate import evaluate_folders
from examples.tsdsr.imageio import list_images, load_image, save_png, write_atomic
from examples.tsdsr.train import main as train_main
from examples.tsdsr.training.models import make_lpips
from examples.tsdsr.training.tiny_data import write_tiny_data


def write_lq(hq_dir: Path, lq_dir: Path, seed: int = 0) -> None:
    """x4 Real-ESRGAN LQ of every held-out HQ image, one fixed draw each."""
    lq_dir.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(list_images(hq_dir)):
        g = torch.Generator().manual_seed(seed + i)
        save_png(degrade(load_image(path).rgb[None], DegradationConfig(), g).lq[0],
                 lq_dir / path.name)


@torch.no_grad()
def mean_lpips(sr_dir: Path, hr_dir: Path) -> float:
    """LPIPS (random AlexNet backbone: a relative number only) averaged over paired files."""
    model = make_lpips(None)
    values = [float(model(load_image(sr_dir / p.name).rgb[None] * 2 - 1,
                          load_image(p).rgb[None] * 2 - 1).mean()) for p in list_images(hr_dir)]
    return sum(values) / len(values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/tsdsr_tiny"))
    parser.add_argument("--steps", type=int, default=None, help="default: the tiny preset's")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    _, val_dir = write_tiny_data(args.out / "train" / "data")
    lq_dir = args.out / "held_out_lq"
    write_lq(val_dir, lq_dir)
    steps = [] if args.steps is None else ["--max-steps", str(args.steps)]
    train_main(["--tiny", "--output-dir", str(args.out / "train"), "--resume", "latest", *steps])
    embeds = args.out / "train" / "embeds"
    rows = []
    for name, lora in (("untrained", None), ("trained", checkpoints(args.out / "train"
                                                                   / "checkpoints")[-1])):
        sr_dir = args.out / f"sr_{name}"
        cli = [str(lq_dir), "--out", str(sr_dir), "--embeds", str(embeds), "--process-size",
               "128", "--no-progress", *(["--lora", str(lora)] if lora else [])]
        if infer.main(cli) != 0:
            return 1
        report = evaluate_folders(sr_dir, val_dir, progress=False)
        rows.append((name, report["average"]["psnr"], report["average"]["ssim"],
                     mean_lpips(sr_dir, val_dir)))
    table = ["| student | PSNR (Y) | SSIM (Y) | LPIPS (random AlexNet) |", "|---|---|---|---|"]
    table += [f"| {n} | {p:.3f} | {s:.4f} | {lp:.4f} |" for n, p, s, lp in rows]
    text = "\n".join(table) + f"\n\nheld-out images: {len(list_images(val_dir))}; total " \
                              f"{time.perf_counter() - start:.0f} s\n"
    write_atomic(args.out / "metrics.md", text.encode())
    print(text)
    (before, after) = rows
    print(f"held-out PSNR {before[1]:.3f} -> {after[1]:.3f} dB, LPIPS {before[3]:.4f} -> "
          f"{after[3]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
