"""Fidelity against realism over ``--strength`` on ``make demo``'s held-out pairs.

``z_hat = z_L - s * v(z_L, 1000, c)``: s = 0 is the input's own VAE reconstruction (of the
bicubic upsampling), s = 1 the trained one-step model. For each s, the model folder ``make
demo`` saves super-resolves the demo's held-out LQ images (the same Real-ESRGAN draws it scores)
with its own options, and each output is scored against its HQ: PSNR and SSIM on Y (as pyiqa)
and the grid-artifact measure (:func:`scoredistill.sr.artifacts.grid_score`, 16 px period), on
the outputs rounded to 8 bits as the saved files hold them.
Writes ``sr_strength.{md,json,png}``.

    make demo && python -m benchmarks.sr_strength   # CPU, seconds after the demo
    python -m benchmarks.sr_strength --quick         # a random tiny model, smoke run
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks import options
from benchmarks.report import command_line, write_report
from benchmarks.tiny_sr_headroom import demo_pairs
from examples.tsdsr.data.tiny_data import HELD_OUT
from examples.tsdsr.evaluation.metrics import psnr_y, ssim_y
from scoredistill import cli
from scoredistill.sr.artifacts import grid_score
from scoredistill.sr.model_folder import CONFIG_FILE, is_model_folder
from scoredistill.sr.pipeline import TSDSRPipeline

PROG = "benchmarks.sr_strength"
DEFAULT_MODEL = Path("outputs/tsdsr_tiny/model")
COLUMNS = ["strength", "PSNR (Y)", "SSIM (Y)", "grid dB", "images"]


@torch.no_grad()
def sweep(pipe: TSDSRPipeline, pairs: list[tuple[str, Any, Any]], strengths: list[float]
          ) -> list[dict[str, Any]]:
    """Mean PSNR, SSIM and grid measure over ``pairs`` at each strength, one row each."""
    rows = []
    for s in strengths:
        # Rounded to 8 bits, as the PNG files users get (and evaluate.py scores) hold them: the
        # grid measure reads ~0.5 dB higher on the float outputs of the demo's model, whose
        # rounding noise fills the bins beside the harmonics.
        sr = [(pipe(lq, strength=s, output_type="pt").images[0][None] * 255).round() / 255
              for _, lq, _ in pairs]
        hq = [h for _, _, h in pairs]
        psnr = [float(psnr_y(x, h)) for x, h in zip(sr, hq, strict=True)]
        ssim = [float(ssim_y(x, h)) for x, h in zip(sr, hq, strict=True)]
        grid = [float(grid_score(x)[0]) for x in sr]
        rows.append({"strength": s, "PSNR (Y)": sum(psnr) / len(psnr),
                     "SSIM (Y)": sum(ssim) / len(ssim), "grid dB": sum(grid) / len(grid),
                     "images": len(pairs), "per image": {
                         name: {"psnr": p, "ssim": q, "grid": r}
                         for (name, _, _), p, q, r in zip(pairs, psnr, ssim, grid, strict=True)}})
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [r["strength"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3), layout="constrained")
    for ax, key in zip(axes, ("PSNR (Y)", "SSIM (Y)", "grid dB"), strict=True):
        ax.plot(s, [r[key] for r in rows], marker="o")
        ax.set(xlabel="strength s", title=key)
    fig.suptitle("make demo's held-out pairs: z_hat = z_L - s v")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = options.parser(PROG, __doc__)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help=f"a model folder (default {DEFAULT_MODEL}, which make demo writes)")
    parser.add_argument("--strengths", type=cli.number(float, low=0, high=1), nargs="+",
                        default=[0.0, 0.25, 0.5, 0.75, 1.0])
    options.add_quick(parser, "smoke run: a random tiny model, strengths 0 and 1, one pair")
    options.add_docs_assets(parser)
    args = options.parse(parser, argv)
    options.refuse_with_quick(args, {"model": "--model", "strengths": "--strengths"},
                              "a random tiny model at strengths 0 and 1 on one pair")
    if not args.quick and not is_model_folder(args.model):
        raise cli.UserError(f"--model {args.model} is no model folder (no {CONFIG_FILE}): run "
                            "`make demo` first, or give a folder TSDSRPipeline.save_pretrained "
                            "wrote")
    args.out = options.out_dir(args)
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    torch.set_num_threads(1)
    pairs = demo_pairs(seed=0)
    if args.quick:
        from examples.tsdsr.models.tiny import random_backbone
        from scoredistill.sr.pipeline import SROptions

        pipe = TSDSRPipeline.from_pretrained(random_backbone(),
                                             options=SROptions(process_size=128, color="adain"))
        model = Path(tempfile.mkdtemp(prefix="scoredistill-strength-")) / "model"
        pipe.save_pretrained(model)
        pairs, strengths = pairs[:1], [0.0, 1.0]
    else:
        model, strengths = args.model, sorted(args.strengths)
    pipe = TSDSRPipeline.from_pretrained(model)
    rows = sweep(pipe, pairs, strengths)
    plot(rows, args.out / "sr_strength.png")
    options.to_docs(args.out / "sr_strength.png", args.docs_assets and not args.quick)
    notes = (f"Model folder {model} (options {pipe.options}); {len(pairs)} held-out pairs "
             f"({', '.join(HELD_OUT)}, Real-ESRGAN x4 draws, make demo's seeds). Grid: 10 log10 "
             "of the power at the 16 px period's harmonics over their neighbours (about 0 dB "
             "without a grid, above 1 dB a visible one). Plot: sr_strength.png.")
    return write_report("sr_strength", "Fidelity against realism over the strength s",
                        rows, meta={"model": str(model), "strengths": strengths}, notes=notes,
                        columns=COLUMNS, out_dir=args.out,
                        command=command_line(PROG, argv))


if __name__ == "__main__":
    raise SystemExit(options.entry(main, PROG)())
