"""TSD-SR training configuration: the release's defaults (spec "Optimisation") and a CLI over them.

    python examples/tsdsr/train.py --pretrained /path/to/sd3-medium --hq-dir DATA --embeds-dir E
    python examples/tsdsr/train.py --tiny                         # the embedded tiny default
    python examples/tsdsr/train.py --config run.yaml --lr 1e-5    # file, then CLI overrides

Precedence: dataclass defaults < ``--tiny`` preset < ``--config`` file < ``--key value`` flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    """Every knob of TSD-SR training; defaults are the paper's / release's (CVPR 2025, Alg. 1)."""

    # Models. pretrained=None: the embedded tiny SD3-shaped model (examples/tsdsr/tiny.py).
    pretrained: str | None = None  # local SD3(-medium) diffusers folder; never downloaded
    teacher_lora: str | None = None  # optional teacher LoRA file ("use_teacher_lora")
    lpips_backbone: str | None = None  # local torchvision AlexNet state dict; None: random
    student_rank: int = 64
    fake_rank: int = 64
    vae_rank: int = 64
    gradient_checkpointing: bool = True
    # Data: HQ folder (captions as .txt beside images), optional stored LQ, precomputed embeds.
    hq_dir: str | None = None
    lq_dir: str | None = None  # None: Real-ESRGAN degradation on the fly
    # JPEG codec of that degradation: Real-ESRGAN's simulated "diffjpeg" or Pillow's "libjpeg".
    jpeg_codec: str = "diffjpeg"
    embeds_dir: str | None = None  # precompute.py's output; required (text encoders never load)
    val_hq_dir: str | None = None
    val_lq_dir: str | None = None  # None: degraded once with a fixed seed
    resolution: int = 512
    hflip: bool = True
    # Read z = E(x_H) from precompute.py --latents instead of encoding each crop, as the release
    # does: needs HQ images pre-cropped to `resolution` and no flips (E is not flip-equivariant).
    use_latents: bool = False
    dataloader_workers: int = 2
    # Generator objective L_G = lpips_weight LPIPS + mse_weight MSE(z_hat, z) + gamma L_TSD.
    lpips_weight: float = 1.0
    mse_weight: float = 1.0  # the release's latent MSE (on); 0 turns it off
    gamma: float = 1.0
    tsd_lambda: float = 0.7
    cfg_scale: float = 7.5
    index_low: int = 50  # TSD and fake-score indices ~ U{index_low, ..., index_high - 1}
    index_high: int = 950
    use_dasm: bool = True  # the paper's full method; the release's example command turns it off
    dasm_points: int = 4
    dasm_step: int = 50
    dasm_weights: tuple[float, ...] = (1.0, 0.3, 0.3, 0.3)
    dasm_bias: tuple[int, ...] = (-25, 25)  # half-open [low, high)
    fake_weighting: str = "none"  # SD3 loss weighting of the fake-score loss (no random factor)
    # DMD2's two-time-scale update (Yin et al. 2024, Sec. 4.1): the generator updates on every
    # N-th step only, the fake score on every step (DMD2: 5 on ImageNet, 10 on SDXL; TSD-SR: 1).
    fake_updates_per_generator: int = 1
    # Optimisation (release defaults).
    lr: float = 5e-6
    lr_fake: float = 1e-6
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-4
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler: str = "cosine_with_restarts"
    lr_warmup_steps: int = 3000
    lr_num_cycles: int = 1
    max_steps: int = 200_000
    batch_size: int = 2  # per process
    mixed_precision: str = "fp16"  # LoRA weights stay fp32; the frozen base is cast
    fsdp: bool = False  # shard the transformer (base + LoRAs) over processes with FSDP2; bf16/fp32
    seed: int = 43
    # Bookkeeping.
    output_dir: str = "outputs/tsdsr"
    checkpoint_every: int = 5000
    checkpoints_keep: int = 3
    resume: str | None = None  # "latest" or a checkpoint folder
    validate_every: int = 1000
    log_every: int = 10
    report_to: str = "tensorboard"  # tensorboard | wandb | none
    tiny: bool = False  # informational: set by the --tiny preset

    def __post_init__(self) -> None:
        if self.use_dasm and len(self.dasm_weights) != self.dasm_points:
            raise ValueError(f"{self.dasm_points} DASM points need as many weights, got "
                             f"{self.dasm_weights}")
        if self.fake_updates_per_generator < 1:
            raise ValueError("fake_updates_per_generator must be >= 1, got "
                             f"{self.fake_updates_per_generator}")
        if len(self.dasm_bias) != 2:
            raise ValueError(f"dasm_bias is a [low, high) pair, got {self.dasm_bias}")
        if self.use_latents and self.hflip:
            raise ValueError("use_latents reads the latent of the unflipped image: turn hflip "
                             "off (--no-hflip), since the VAE's latent of a flipped image is not "
                             "the flipped latent")
        if self.jpeg_codec not in ("diffjpeg", "libjpeg"):
            raise ValueError(f"jpeg_codec must be diffjpeg or libjpeg, got {self.jpeg_codec!r}")
        if self.report_to not in ("tensorboard", "wandb", "none"):
            raise ValueError(f"report_to must be tensorboard, wandb or none, got {self.report_to}")


TINY_PRESET: dict[str, Any] = dict(
    # The embedded tiny model (pre-fitted by tiny_fit.py) on CPU: small crops, few steps, higher
    # learning rates, fp32 because CPUs lack fp16 kernels. Measured by examples/tsdsr/run_tiny.py
    # (held-out PSNR and LPIPS must improve): lr 3e-4 beat 1e-3 (24.1 vs 23.9 dB after 300 steps).
    # cfg_scale 1: the tiny teacher is fitted prompt-agnostic (its photos have no captions), so
    # guidance would only amplify the noise between its conditional and null predictions.
    # The method is otherwise the paper's: TSD + DASM, gamma 1, lambda 0.7, LPIPS + latent MSE.
    tiny=True, resolution=64, batch_size=2, max_steps=300, lr=3e-4, lr_fake=1e-3, cfg_scale=1.0,
    lr_warmup_steps=20, lr_scheduler="cosine_with_restarts", student_rank=8, fake_rank=8,
    vae_rank=4, mixed_precision="no", gradient_checkpointing=False, checkpoint_every=100,
    validate_every=100, log_every=10, dataloader_workers=0, output_dir="outputs/tsdsr_tiny/train",
)


def _scalar_type(hint: Any) -> type:
    # `str | None` -> str; tuple[float, ...] -> float (the element type, read with nargs="+").
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _scalar_type(args[0])
    if typing.get_origin(hint) is tuple:
        return args[0]
    return hint


def build_parser() -> argparse.ArgumentParser:
    """``--config``, ``--tiny`` and one ``--key`` flag per TrainConfig field (no defaults set)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a .json or .yaml file of TrainConfig fields")
    parser.add_argument("--tiny", action="store_true", help="the embedded tiny preset")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "tiny":
            continue
        flag, hint = "--" + f.name.replace("_", "-"), hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"default {default!r}"
        # SUPPRESS: only flags given on the command line reach the config (file values survive).
        if hint is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(hint) is tuple:
            parser.add_argument(flag, dest=f.name, type=_scalar_type(hint), nargs="+",
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=_scalar_type(hint),
                                default=argparse.SUPPRESS, help=help_text)
    return parser


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Fields from a JSON or YAML file; unknown keys are an error naming them."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    elif path.suffix.lower() == ".json":
        values = json.loads(text)
    else:
        raise ValueError(f"{path}: config files are .json, .yaml or .yml")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown config keys {unknown}")
    return values


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """TrainConfig from defaults, the ``--tiny`` preset, a ``--config`` file and CLI flags."""
    args = vars(build_parser().parse_args(argv))
    file, tiny = args.pop("config"), args.pop("tiny")
    values: dict[str, Any] = dict(TINY_PRESET) if tiny else {}
    if file is not None:
        values.update(read_config_file(file))
    values.update(args)
    hints = typing.get_type_hints(TrainConfig)
    for name, value in values.items():  # JSON/YAML/argparse give lists; the fields are tuples
        if typing.get_origin(hints[name]) is tuple and value is not None:
            values[name] = tuple(value)
    return TrainConfig(**values)


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as JSON beside a run, so it can be rerun with ``--config``."""
    from scoredistill.sr.imageio import write_atomic

    text = json.dumps(dataclasses.asdict(config), indent=2) + "\n"
    write_atomic(path, text.encode("utf-8"))


if __name__ == "__main__":
    print(json.dumps(dataclasses.asdict(parse_config()), indent=2))
