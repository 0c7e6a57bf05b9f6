"""TSD-SR training configuration: the release's defaults (spec "Optimisation") and a CLI over them.

    python examples/tsdsr/train.py --pretrained /path/to/sd3-medium --hq-dir DATA --embeds-dir E
    python examples/tsdsr/train.py --tiny                         # the embedded tiny default
    python examples/tsdsr/train.py --config run.yaml --lr 1e-5    # file, then CLI overrides

Precedence: dataclass defaults < ``--tiny`` preset < ``--config`` file < ``--key value`` flags.

jsonargparse makes the flags from the dataclass: one per field, from its type and default (a new
field is a flag with nothing else to write), and turns the strings into ints, floats, None and
tuples; its loader reads the ``--config`` file. Kept here: the recipe's flag spelling, the
precedence, the range checks (BOUNDS, CHOICES: at parse time and on every TrainConfig), unknown
keys with a "did you mean", and one-line errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonargparse
import yaml

from scoredistill.cli import ArgumentParser, UserError, in_range, number
from scoredistill.messages import brief
from scoredistill.optim import OPTIMIZERS

# The choices of --regulariser, in the order the docs' table lists them.
REGULARISERS = ("tsd", "vsd", "dmd", "sid", "sim", "decoupled-dmd", "f-kl", "f-js", "dmd2-gan")
# Those with a DASM trajectory (TSD-SR Sec. 3.4): the direction-term losses (f-distill and
# DMD2 are DMD's direction; their head reads the first point). SiD and SIM differentiate the
# models at one level; decoupled DMD has two levels of its own.
WITH_DASM = frozenset({"tsd", "vsd", "dmd", "f-kl", "f-js", "dmd2-gan"})

@dataclass
class TrainConfig:
    """Every knob of TSD-SR training; defaults are the paper's / release's (CVPR 2025, Alg. 1)."""

    # Models. pretrained=None: the embedded tiny SD3-shaped model (examples/tsdsr/models/tiny.py).
    pretrained: str | None = None  # local SD3(-medium) diffusers folder; never downloaded
    teacher_lora: str | None = None  # optional teacher LoRA file ("use_teacher_lora")
    lpips_backbone: str | None = None  # local torchvision AlexNet state dict; None: random
    student_rank: int = 64
    fake_rank: int = 64
    vae_rank: int = 64
    gradient_checkpointing: bool = True
    # Hold the VAE encoder's and decoder's saved activations in (pinned) host memory until the
    # backward (torch's save_on_cpu): less GPU memory, two PCIe copies a step; same maths.
    offload_vae_activations: bool = False
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
    # Generator objective L_G = lpips_weight LPIPS + mse_weight MSE(z_hat, z) + gamma L_reg.
    # L_reg: TSD (the paper) or another of the library's losses in its place
    # (training/regularisers.py; docs: the recipe guide's table of choices).
    regulariser: str = "tsd"
    lpips_weight: float = 1.0
    mse_weight: float = 1.0  # the release's latent MSE (on); 0 turns it off
    gamma: float = 1.0
    tsd_lambda: float = 0.7
    # The space TSD's differences are taken in: "flow" (SD3's own velocity, the release's) or
    # "epsilon", where TSM's two parts cancel at low noise (docs: "Which space for TSM/TSD").
    tsd_space: str = "flow"
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
    # "adamw8bit": bitsandbytes' 8-bit AdamW (the adam8bit extra), a quarter of AdamW's state
    # for the trained LoRAs (docs: "Plan before you rent a GPU", scoredistill-plan --fit).
    optimizer: str = "adamw"
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
    skip_bad_files: bool = False  # train on the other files when the data check finds bad ones
    tiny: bool = False  # informational: set by the --tiny preset

    def __post_init__(self) -> None:
        check_values(self)
        check_regulariser(self)
        if self.use_dasm and len(self.dasm_weights) != self.dasm_points:
            raise ValueError(f"{self.dasm_points} DASM points need as many weights, got "
                             f"{brief(self.dasm_weights)}")
        if len(self.dasm_bias) != 2 or self.dasm_bias[0] >= self.dasm_bias[1]:
            raise ValueError(f"dasm_bias is a non-empty [low, high) pair, got "
                             f"{brief(self.dasm_bias)}")
        if self.index_low >= self.index_high:
            raise ValueError(f"index_low ({self.index_low}) must be below index_high "
                             f"({self.index_high})")
        if self.resolution % 16:
            raise ValueError(f"resolution must be a multiple of 16 (VAE factor 8 x patch 2), "
                             f"got {self.resolution}")
        if self.use_latents and self.hflip:
            raise ValueError("use_latents reads the latent of the unflipped image: turn hflip "
                             "off (--no-hflip), since the VAE's latent of a flipped image is not "
                             "the flipped latent")


def check_regulariser(config: TrainConfig) -> None:
    """ValueError (one line, naming the field and the fix) for settings the chosen
    ``config.regulariser`` cannot honour: DASM, or a TSD-only option given another value."""
    name = config.regulariser
    if config.use_dasm and name not in WITH_DASM:
        raise ValueError(f"regulariser {name} has no DASM trajectory (only "
                         f"{', '.join(sorted(WITH_DASM))} do): pass --no-use-dasm "
                         "(use_dasm: false)")
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for field, users in (("tsd_lambda", {"tsd"}), ("tsd_space", {"tsd", "vsd"})):
        value = getattr(config, field)
        if name not in users and value != defaults[field]:
            raise ValueError(f"{field} {value!r} is read by --regulariser "
                             f"{' or '.join(sorted(users))} only, not {name}: drop it")


# Allowed values, checked on every TrainConfig and by argparse at parse time (cli.number).
def _same(names: str, **bounds: Any) -> dict[str, dict[str, Any]]:
    return {name: bounds for name in names.split()}


BOUNDS: dict[str, dict[str, Any]] = {
    **_same("student_rank fake_rank vae_rank resolution dasm_points dasm_step lr_num_cycles "
            "max_steps batch_size checkpoint_every validate_every log_every "
            "fake_updates_per_generator", low=1),
    **_same("dataloader_workers lpips_weight mse_weight gamma cfg_scale index_low weight_decay "
            "lr_warmup_steps seed checkpoints_keep dasm_weights", low=0),
    **_same("lr lr_fake adam_eps max_grad_norm", low=0, low_open=True),
    **_same("adam_beta1 adam_beta2", low=0, high=1, high_open=True),
    "tsd_lambda": dict(low=0, high=1),
    "index_high": dict(low=1, high=1000),  # SD3's 1000-step schedule
    "dasm_bias": {},
}
CHOICES: dict[str, tuple[str, ...]] = {
    "fake_weighting": ("none", "sigma_sqrt", "cosmap"),
    "tsd_space": ("flow", "epsilon"),
    "regulariser": REGULARISERS,
    "lr_scheduler": ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                     "constant_with_warmup"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "report_to": ("tensorboard", "wandb", "none"),
    "jpeg_codec": ("diffjpeg", "libjpeg"),
    "optimizer": OPTIMIZERS,
}


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit the field type ``hint`` (None if it does)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _type_problem(value, next(a for a in args if a is not type(None)))
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, tuple):
            return "must be a list"
        problems = [_type_problem(v, args[0]) for v in value]
        return next((f"items {p}" for p in problems if p), None)
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else (
            "must be an integer")
    if hint is float:
        return None if isinstance(value, int | float) and not isinstance(value, bool) else (
            "must be a number")
    if typing.get_origin(hint) is typing.Literal:
        return None if value in args else f"must be one of {', '.join(map(str, args))}"
    return None if isinstance(value, hint) else f"must be a {hint.__name__}"


def check_values(config: TrainConfig) -> None:
    """ValueError naming the first field whose value has the wrong type or is out of range."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        problem = _type_problem(value, hints[f.name])
        if problem is None and f.name in BOUNDS and value is not None:
            check = in_range(**BOUNDS[f.name])
            problem = next((p for p in map(check, value if isinstance(value, tuple) else
                                           (value,)) if p), None)
        if problem is None and f.name in CHOICES and value not in CHOICES[f.name]:
            problem = f"must be one of {', '.join(CHOICES[f.name])}"
        if problem:
            raise ValueError(f"{f.name} {problem}, got {brief(value)}")


TINY_PRESET: dict[str, Any] = dict(
    # The embedded tiny model (pre-fitted by tiny_fit.py) on CPU: small crops, few steps, higher
    # learning rates, fp32 because CPUs lack fp16 kernels. Measured by examples/tsdsr/run_tiny.py
    # on the held-out rocket and motorcycle (wavelet colour fix, PSNR on Y after 300 steps): lr
    # 1e-3 21.42 dB, 3e-4 21.29, 2e-3 21.40; 500 steps at 1e-3 21.39 (it plateaus by step 200).
    # cfg_scale 1: the tiny teacher is fitted prompt-agnostic (its photos have no captions), so
    # guidance would only amplify the noise between its conditional and null predictions.
    # The method is otherwise the paper's: TSD + DASM, gamma 1, lambda 0.7, LPIPS + latent MSE.
    tiny=True, resolution=64, batch_size=2, max_steps=300, lr=1e-3, lr_fake=1e-3, cfg_scale=1.0,
    lr_warmup_steps=20, lr_scheduler="cosine_with_restarts", student_rank=8, fake_rank=8,
    vae_rank=4, mixed_precision="no", gradient_checkpointing=False, checkpoint_every=100,
    validate_every=100, log_every=10, dataloader_workers=0, output_dir="outputs/tsdsr_tiny/train",
)


class _Parser(jsonargparse.ArgumentParser):
    """jsonargparse's parser with the recipe's spelling of a field's flag (``--hq-dir``,
    ``--no-hflip``, ``--dasm-weights 1 0.3``), numbers range-checked as they are parsed
    (BOUNDS, CHOICES) and errors in one line (cli.ArgumentParser)."""

    hints: typing.ClassVar[dict[str, Any]] = {}  # the config class's fields (build_parser)

    def add_argument(self, *args: str, **kwargs: Any) -> argparse.Action:
        name = args[0].removeprefix("--") if args else ""
        if name in self.hints:  # jsonargparse adding a field's flag
            hint, args = self.hints[name], ("--" + name.replace("_", "-"),)
            if hint is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
                del kwargs["type"]
            elif typing.get_origin(hint) is tuple:  # tuple[float, ...], not a JSON list
                kwargs.update(type=typing.get_args(hint)[0], nargs="+")
                del kwargs["action"]
            if kwargs.get("type") in (int, float):
                kwargs["type"] = number(kwargs["type"], **BOUNDS.get(name, {}))
            if name in CHOICES:  # argparse checks the strings
                kwargs.update(type=None, choices=CHOICES[name])
        return super().add_argument(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> typing.NoReturn:
        ArgumentParser.error(self, " ".join(message.split()))  # jsonargparse's span lines


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, jsonargparse.DefaultHelpFormatter):
    """``--help`` keeps the module docstring's layout and names cli.number's type (int)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = super()._get_help_string(action) or ""
        return text.replace("%(type)s", getattr(action.type, "__name__", "%(type)s"))


def build_parser(config_class: type[TrainConfig] = TrainConfig) -> jsonargparse.ArgumentParser:
    """``--config``, ``--tiny`` and a flag per field of ``config_class`` from its type, by
    jsonargparse; parsed with ``defaults=False``, it returns only the flags given."""
    parser = _Parser(prog="train", description=__doc__, allow_abbrev=False,
                     formatter_class=_HelpFormatter)
    parser.add_argument("--config", help="a .json or .yaml file of TrainConfig fields")
    parser.add_argument("--tiny", action="store_true", help="the embedded tiny preset")
    parser.hints = typing.get_type_hints(config_class)
    parser.add_class_arguments(config_class, as_group=False, skip={"tiny"})
    return parser


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Fields from a JSON or YAML file (jsonargparse's loader: JSON is YAML, and YAML 1.1's
    ``1e-5`` is a number; lists stay lists); a missing or malformed file or an unknown key is a
    UserError naming the file and the key. TrainConfig checks the values."""
    path, kind = Path(path), "JSON" if str(path).lower().endswith(".json") else "YAML"
    if path.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise UserError(f"--config {path}: config files are .json, .yaml or .yml")
    try:
        values = jsonargparse.get_loader("yaml")(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--config {path}: cannot read it ({exc})") from None
    except yaml.YAMLError as exc:
        raise UserError(f"--config {path}: not valid {kind}: {' '.join(str(exc).split())}"
                        ) from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of TrainConfig fields, got a "
                        f"{type(values).__name__}")
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = [str(k) for k in values if k not in known]
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1))
                 else k for k in unknown]
        raise UserError(f"--config {path}: unknown key(s) {brief(', '.join(hints))}; the keys "
                        "are TrainConfig's fields (train.py --help lists them as flags)")
    return values


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """TrainConfig from defaults, the ``--tiny`` preset, a ``--config`` file and CLI flags.

    A bad flag exits with one line (status 2); a problem in the file or between values is a
    UserError (a ValueError) naming the file and key or the fields."""
    args = build_parser().parse_args(argv, defaults=False).as_dict()
    file, tiny = args.pop("config", None), args.pop("tiny", False)
    from_file = read_config_file(file) if file is not None else {}
    values = {**(TINY_PRESET if tiny else {}), **from_file, **args}
    try:  # files and nargs give lists where the fields are tuples
        return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except ValueError as exc:
        key = str(exc).split(" ", 1)[0]
        source = f"--config {file}: " if key in from_file and key not in args else ""
        raise UserError(f"{source}{exc}") from None


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as JSON beside a run, so it can be rerun with ``--config``."""
    from scoredistill.sr.imageio import write_atomic

    text = json.dumps(dataclasses.asdict(config), indent=2) + "\n"
    write_atomic(path, text.encode("utf-8"))


if __name__ == "__main__":
    print(json.dumps(dataclasses.asdict(parse_config()), indent=2))
