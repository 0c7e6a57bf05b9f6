"""The tiny TSD-SR pipeline end to end, no weights needed: precompute -> train -> infer -> evaluate.

    python -m examples.tsdsr.run_tiny [--steps 200] [--out outputs/tsdsr_tiny]

Pre-fits (or loads from cache) the embedded tiny SD3-shaped backbone, trains the student on
scikit-image's bundled photos, super-resolves the held-out photos (``DRAWS`` Real-ESRGAN
degradations of each, fixed seeds) with the untrained and the trained student via infer.py (AdaIN
colour fix, the release's evaluation setting), and writes ``metrics.md`` (PSNR/SSIM on Y, LPIPS with
a RANDOM AlexNet backbone, the grid-artifact measure), ``metrics.json`` (the same, per image),
the SR folders, ``overview.png`` (one row per held-out pair: LQ | bicubic | untrained | trained |
HQ) and ``model/``, the trained student as a model folder that ``scoredistill-sr --model`` runs
on your own images (the command is printed at the end), under ``--out``. Exits 1 if the trained
student is not better than the untrained one on both held-out PSNR and SSIM. LPIPS is reported, not
checked: with random weights it is no perceptual metric (it ranks the untrained student's smooth
output above bicubic).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from examples.tsdsr import infer
from examples.tsdsr.data import DegradationConfig, degrade, upsample_lq
from examples.tsdsr.data.tiny_data import HELD_OUT, write_tiny_data
from examples.tsdsr.evaluate import evaluate_folders
from examples.tsdsr.models.backbone import fitted_backbone
from examples.tsdsr.train import main as train_main
from examples.tsdsr.training.checkpoint import checkpoints
from examples.tsdsr.training.models import make_lpips
from scoredistill.sr.imageio import list_images, load_image, save_png, write_atomic
from scoredistill.sr.loading import Backbone
from scoredistill.sr.pipeline import SROptions, TSDSRPipeline

# The release evaluates with AdaIN (its inference default is wavelet). Measured on the held-out
# pairs after 300 steps: AdaIN 22.11 dB / SSIM 0.553, wavelet 22.02 / 0.541, none 20.81 / 0.530.
COLOR_FIX = "adain"
# Degradations per held-out photo. Real-ESRGAN's draws range from mild to destroying (bicubic
# of rocket: 23.96 to 25.88 dB over these four), so with one draw per photo whether the student
# beat bicubic was up to the seeds (trained minus bicubic: +0.17 dB on one draw each, -0.08 on
# these four).
DRAWS = 4


def write_pairs(photos_dir: Path, hq_dir: Path, lq_dir: Path, draws: int = DRAWS,
                seed: int = 0) -> None:
    """``draws`` fixed x4 Real-ESRGAN LQ of each photo, as ``<stem>_<k>.png`` in ``lq_dir``, and
    the photo under the same name in ``hq_dir`` (the evaluation pairs files by name)."""
    for folder in (hq_dir, lq_dir):
        folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(list_images(photos_dir)):
        hq = load_image(path).rgb
        for k in range(draws):
            g = torch.Generator().manual_seed(seed + draws * i + k)
            save_png(hq, hq_dir / f"{path.stem}_{k}.png")
            save_png(degrade(hq[None], DegradationConfig(), g).lq[0],
                     lq_dir / f"{path.stem}_{k}.png")


@torch.no_grad()
def mean_lpips(sr_dir: Path, hr_dir: Path) -> float:
    """LPIPS (random AlexNet backbone: a relative number only) averaged over paired files."""
    model = make_lpips(None)
    values = [float(model(load_image(sr_dir / p.name).rgb[None] * 2 - 1,
                          load_image(p).rgb[None] * 2 - 1).mean()) for p in list_images(hr_dir)]
    return sum(values) / len(values)


def write_bicubic(lq_dir: Path, hq_dir: Path, out_dir: Path) -> None:
    """The x4 bicubic upsampling of each LQ to its HQ's size: the no-model reference row."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for hq in list_images(hq_dir):
        size = tuple(load_image(hq).rgb.shape[-2:])
        save_png(upsample_lq(load_image(lq_dir / hq.name).rgb[None], size=size)[0],
                 out_dir / hq.name)


def write_overview(path: Path, lq_dir: Path, hq_dir: Path, columns: Sequence[Path]) -> None:
    """One image of every held-out pair, a row each: the LQ (nearest-neighbour to the HQ's size,
    so its pixels show), the ``columns`` folders' images, then the HQ; rows padded white to the
    widest."""
    rows = []
    for hq in list_images(hq_dir):
        target = load_image(hq).rgb
        lq = torch.nn.functional.interpolate(load_image(lq_dir / hq.name).rgb[None],
                                             size=tuple(target.shape[-2:]), mode="nearest")[0]
        rows.append(torch.cat([lq, *(load_image(c / hq.name).rgb for c in columns), target],
                              dim=-1))
    width = max(r.shape[-1] for r in rows)
    save_png(torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[-1]), value=1.0)
                        for r in rows], dim=-2), path)


def save_model(backbone: Backbone, lora: Path, embeds: Path | None, folder: Path) -> Path:
    """The student of checkpoint ``lora`` as a model folder (:meth:`TSDSRPipeline.save_pretrained`)
    with the demo's evaluation options as its defaults."""
    pipe = TSDSRPipeline.from_pretrained(backbone, lora=lora, embeds=embeds,
                                         options=SROptions(process_size=128, color=COLOR_FIX))
    return pipe.save_pretrained(folder, overwrite=True)


def cli_line(model_dir: Path) -> str:
    """The command that runs the saved model on a user's own images."""
    return f"scoredistill-sr --model {model_dir} YOUR_IMAGES -o YOUR_OUTPUT_DIR"


def score(sr_dir: Path, hq_dir: Path) -> dict:
    """evaluate.py's report (per image and average PSNR/SSIM on Y) of ``sr_dir`` against
    ``hq_dir``, its average with the random-AlexNet LPIPS added."""
    report = evaluate_folders(sr_dir, hq_dir, progress=False)
    report["average"]["lpips_random_alexnet"] = mean_lpips(sr_dir, hq_dir)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/tsdsr_tiny"))
    parser.add_argument("--steps", type=int, default=None, help="default: the tiny preset's")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    fitted_backbone()  # fitted and cached here (once per machine), so it is timed on its own
    fit_s = time.perf_counter() - start
    _, photos_dir = write_tiny_data(args.out / "train" / "data")
    val_dir, lq_dir = args.out / "held_out_hq", args.out / "held_out_lq"
    write_pairs(photos_dir, val_dir, lq_dir)
    steps = [] if args.steps is None else ["--max-steps", str(args.steps)]
    train_start = time.perf_counter()
    status = train_main(["--tiny", "--output-dir", str(args.out / "train"), "--resume",
                         "latest", *steps])
    if status:  # a usage error, or stopped by a signal (75): rerunning resumes
        return status
    train_s = time.perf_counter() - train_start
    embeds = args.out / "train" / "embeds"
    write_bicubic(lq_dir, val_dir, args.out / "sr_bicubic")
    rows = {"bicubic (no model)": score(args.out / "sr_bicubic", val_dir)}
    for name, lora in (("untrained", None), ("trained", checkpoints(args.out / "train"
                                                                   / "checkpoints")[-1])):
        sr_dir = args.out / f"sr_{name}"
        cli = [str(lq_dir), "--out", str(sr_dir), "--embeds", str(embeds), "--process-size",
               "128", "--color-fix", COLOR_FIX, "--no-progress", "--overwrite",
               *(["--lora", str(lora)] if lora else [])]
        if infer.main(cli) != 0:
            return 1
        rows[name] = score(sr_dir, val_dir)
    write_overview(args.out / "overview.png", lq_dir, val_dir,
                   [args.out / f"sr_{n}" for n in ("bicubic", "untrained", "trained")])
    model_dir = save_model(fitted_backbone(), checkpoints(args.out / "train" / "checkpoints")[-1],
                           embeds, args.out / "model")
    table = ["| held-out SR | PSNR (Y) ↑ | SSIM (Y) ↑ | LPIPS (random AlexNet) ↓ | grid (dB) ↓ |",
             "|---|---:|---:|---:|---:|"]
    for name, report in rows.items():
        mean = report["average"]
        grid = "n/a" if mean.get("grid") is None else f"{mean['grid']:.2f}"
        table.append(f"| {name} | {mean['psnr']:.3f} | {mean['ssim']:.4f} | "
                     f"{mean['lpips_random_alexnet']:.4f} | {grid} |")
    text = "\n".join(table) + (
        f"\n\n{len(HELD_OUT)} held-out photos ({', '.join(HELD_OUT)}), {DRAWS} x4 Real-ESRGAN "
        f"LQ each; overview.png: LQ | bicubic | untrained | trained | HQ. Grid: the power at the "
        f"16 px period's harmonics over their neighbours (about 0 dB without a grid). Tiny "
        f"backbone pre-fit (or cache load) {fit_s:.0f} s, training {train_s:.0f} s, total "
        f"{time.perf_counter() - start:.0f} s.\n")
    write_atomic(args.out / "metrics.md", text.encode())
    write_atomic(args.out / "metrics.json", (json.dumps(rows, indent=1) + "\n").encode())
    print(text)
    before, after, bicubic = ((rows[n]["average"]["psnr"], rows[n]["average"]["ssim"])
                              for n in ("untrained", "trained", "bicubic (no model)"))
    print(f"held-out PSNR {before[0]:.3f} -> {after[0]:.3f} dB (bicubic {bicubic[0]:.3f}), "
          f"SSIM {before[1]:.4f} -> {after[1]:.4f} (bicubic {bicubic[1]:.4f})")
    print(f"the trained model is saved in {model_dir}; run it on your own images with\n"
          f"  {cli_line(model_dir)}")
    if not (after[0] > before[0] and after[1] > before[1]):
        print("FAILED: the trained student did not improve on the untrained one", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
