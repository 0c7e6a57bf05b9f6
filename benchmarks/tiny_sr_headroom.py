"""How far a plain regressor gets past bicubic on ``make demo``'s task: the student's headroom.

``make demo`` trains the TSD-SR student on thirteen small photos for 300 steps and ends about
level with bicubic on held-out PSNR. This asks whether any model could do clearly better there:
a residual CNN (pixel L1, Adam) trained on the demo's training photos, with a fresh Real-ESRGAN
degradation of every crop at every step, scored with bicubic on the demo's own held-out pairs
(``run_tiny.write_pairs``: the same LQ images) every ``--every`` steps, PSNR and SSIM on Y.
One row per training-photo side and checkpoint; 8 crops of 64 px a step (the student's batch is
2), so by step 400 it has seen over 5x the crops the student sees in its 300 steps.

    python -m benchmarks.tiny_sr_headroom --quick    # CPU smoke run, seconds
    python -m benchmarks.tiny_sr_headroom            # CPU, one thread, ~15 min
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from benchmarks import options
from benchmarks.report import command_line, write_report
from examples.tsdsr.data import DegradationConfig, degrade, upsample_lq
from examples.tsdsr.data.tiny_data import HELD_OUT, TRAIN, photo, write_tiny_data
from examples.tsdsr.evaluation.metrics import psnr_y, ssim_y
from examples.tsdsr.models.tiny_fit import random_crops
from examples.tsdsr.run_tiny import write_pairs
from scoredistill import cli
from scoredistill.sr.imageio import list_images, load_image

PROG = "benchmarks.tiny_sr_headroom"
COLUMNS = ["training photos", "step", "bicubic PSNR", "CNN PSNR", "CNN - bicubic dB",
           "bicubic SSIM", "CNN SSIM", "train s"]


def residual_cnn(width: int = 32, depth: int = 5) -> nn.Module:
    """``depth`` 3x3 conv + ReLU layers, then a 3x3 conv to RGB: the residual added to bicubic."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv2d(3 if i == 0 else width, width, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.Conv2d(width, 3, 3, padding=1))


def demo_pairs(seed: int) -> list[tuple[str, Tensor, Tensor]]:
    """The demo's held-out ``(name, LQ (1, 3, h, w), HQ (1, 3, 4h, 4w))`` in [0, 1], as
    ``run_tiny`` writes them (its seed 0: the LQ images ``make demo`` scores)."""
    with tempfile.TemporaryDirectory() as tmp:
        _, photos = write_tiny_data(tmp)
        hq_dir, lq_dir = Path(tmp) / "pairs_hq", Path(tmp) / "pairs_lq"
        write_pairs(photos, hq_dir, lq_dir, seed=seed)
        return [(path.name, load_image(lq_dir / path.name).rgb[None], load_image(path).rgb[None])
                for path in list_images(hq_dir)]


def held_out_pairs(seed: int) -> list[tuple[Tensor, Tensor]]:
    """The demo's held-out (bicubic-upsampled LQ, HQ) pairs, each (1, 3, H, W) in [0, 1]."""
    return [(upsample_lq(lq, size=tuple(hq.shape[-2:])), hq) for _, lq, hq in demo_pairs(seed)]


@torch.no_grad()
def scores(model: nn.Module | None, pairs: list[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """Mean (PSNR, SSIM) on Y over ``pairs`` of bicubic (``model`` None) or bicubic + residual."""
    psnr, ssim = [], []
    for lq, hq in pairs:
        sr = lq if model is None else (lq + model(lq)).clamp(0, 1)
        psnr.append(float(psnr_y(sr, hq)))
        ssim.append(float(ssim_y(sr, hq)))
    return sum(psnr) / len(psnr), sum(ssim) / len(ssim)


def train_and_score(side: int, steps: int, every: int, pairs: list[tuple[Tensor, Tensor]],
                    seed: int) -> list[dict[str, Any]]:
    """Rows for one training-photo side: the CNN against bicubic every ``every`` steps."""
    images = [photo(name, side) for name in TRAIN]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = residual_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    bicubic = scores(None, pairs)
    rows, spent = [], 0.0
    for step in tqdm(range(1, steps + 1), desc=f"CNN, {side} px photos", unit="step"):
        start = time.perf_counter()
        hq = (random_crops(images, 8, 64, g) + 1) / 2
        lq = upsample_lq(degrade(hq, DegradationConfig(), g).lq, size=(64, 64))
        loss = F.l1_loss(lq + model(lq), hq)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        spent += time.perf_counter() - start
        if step % every == 0 or step == steps:
            cnn = scores(model, pairs)
            rows.append({"training photos": f"{side} px", "step": step,
                         "bicubic PSNR": bicubic[0], "CNN PSNR": cnn[0],
                         "CNN - bicubic dB": cnn[0] - bicubic[0], "bicubic SSIM": bicubic[1],
                         "CNN SSIM": cnn[1], "train s": spent})
    return rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = options.parser(PROG, __doc__)
    parser.add_argument("--sides", type=cli.number(int, low=64), nargs="+",
                        default=[128, 256], help="short side of the training photos, at least "
                                                 "the 64 px crops (the demo's: 128)")
    parser.add_argument("--steps", type=options.COUNT, default=1600)
    parser.add_argument("--every", type=options.COUNT, default=400,
                        help="score on the held-out pairs every this many steps")
    parser.add_argument("--seed", type=options.NON_NEGATIVE, default=0)
    options.add_quick(parser, "smoke run: 128 px, 4 steps, scored every 2")
    args = options.parse(parser, argv)
    options.refuse_with_quick(args, {"sides": "--sides", "steps": "--steps", "every": "--every"},
                              "128 px photos for 4 steps, scored every 2")
    if args.quick:
        args.sides, args.steps, args.every = [128], 4, 2
    args.out = options.out_dir(args)
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    torch.set_num_threads(1)
    out_dir = args.out
    pairs = held_out_pairs(seed=0)  # run_tiny's seed: the demo's LQ images
    rows = [row for side in args.sides
            for row in train_and_score(side, args.steps, args.every, pairs, args.seed)]
    notes = (f"Held out: {', '.join(HELD_OUT)} at 128 px, {len(pairs) // len(HELD_OUT)} "
             "Real-ESRGAN draws each (the LQ images `make demo` scores). CNN: 5 conv layers of "
             "width 32 + ReLU, residual on the bicubic input; pixel L1, Adam 1e-3, 8 random 64 px "
             "crops a step, degraded afresh; one CPU thread. `make demo`'s student, for "
             "comparison, trains 300 steps at batch 2.")
    return write_report("tiny_sr_headroom", "A plain regressor against bicubic on the tiny demo's "
                        "held-out pairs", rows, meta={"sides": args.sides, "steps": args.steps,
                                                      "seed": args.seed},
                        notes=notes, columns=COLUMNS, out_dir=out_dir,
                        command=command_line("benchmarks.tiny_sr_headroom", argv))


if __name__ == "__main__":
    raise SystemExit(options.entry(main, PROG)())
