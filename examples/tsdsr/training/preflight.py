"""What train.py checks before any model loads: every path it was given, the output folder and
the experiment tracker. Each problem is a UserError naming the flag."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from examples.tsdsr.training.config import TrainConfig
from scoredistill.cli import UserError, writable_dir
from scoredistill.sr.loading import PROMPTS_FILE, check_sd3_folder

TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_paths(config: TrainConfig) -> None:
    """Folders and files named by ``config`` exist and have what the run reads from them."""
    for name in ("hq_dir", "lq_dir", "val_hq_dir", "val_lq_dir", "embeds_dir", "pretrained"):
        value = getattr(config, name)
        if value is not None and not Path(value).is_dir():
            what = "is a file, not a folder" if Path(value).exists() else "does not exist"
            raise UserError(f"{_flag(name)} {value} {what}")
    for name in ("teacher_lora", "lpips_backbone"):
        value = getattr(config, name)
        if value is not None and not Path(value).is_file():
            raise UserError(f"{_flag(name)} {value}: no such file")
    if config.pretrained is not None:
        try:
            check_sd3_folder(config.pretrained)
        except FileNotFoundError as exc:
            raise UserError(str(exc)) from None
    if config.embeds_dir is not None and not (Path(config.embeds_dir) / PROMPTS_FILE).is_file():
        raise UserError(f"--embeds-dir {config.embeds_dir} has no {PROMPTS_FILE}: run "
                        f"python -m examples.tsdsr.precompute --hq-dir {config.hq_dir} "
                        f"--out {config.embeds_dir} first")
    writable_dir(config.output_dir, "--output-dir")


def check_tracker(report_to: str) -> None:
    """The ``--report-to`` tracker's package imports (else training would log nowhere)."""
    modules = TRACKER_MODULES.get(report_to, ())
    if modules and not any(importlib.util.find_spec(m) for m in modules):
        raise UserError(f"--report-to {report_to}: {modules[0]} is not installed; pip install "
                        f"{modules[0]}, or pass --report-to none (or another tracker)")
