"""``scoredistill-plan train --fit 24GB``: the recipe's configuration with the fewest FLOPs per
sample whose planned peak fits a card, and the ``examples/tsdsr/train.py`` command that runs it.

Knobs searched: gradient checkpointing (off, on), batch (1, 2, ...), the optimiser (AdamW or
bitsandbytes' 8-bit AdamW), and, only where nothing fits without it, the VAE's saved activations
held in host memory (``--offload-vae-activations``): it adds no FLOPs, so a FLOP count would
always prefer it, but it copies those activations over PCIe twice a step, time the count does
not see and no GPU has measured here, so it is searched last. Only where nothing fits at the
given LoRA ranks are they halved (all three together, down to 8), and the result says so: a
lower rank is a change of the method (fewer trained parameters), not of its memory. Held as
given, because they change the method: DASM, LPIPS, CFG and the crop size. Not searched: the
fake-score updates per generator update, since neither the peak nor FLOPs per generator update
can fall with more of them (the generator's step, where the peak is, runs unchanged on the steps
that update it, and every extra update adds a fake-score step). Every peak is a trace
(:func:`~scoredistill.memory.steps.plan_train`) but one: the 8-bit optimiser's, which is the
AdamW trace less the optimiser state it saves, exact because the state is held through the whole
step (checked against a trace by the tests), and the winner is traced again as it runs.

Pruning (each trace costs minutes at SD3-medium size): the peak grows with the batch, so a
setting's batches stop at the first that does not fit; checkpointing only adds FLOPs (the
recomputed forward of every sample), so it is searched past batch 1 only while its FLOPs per
sample could still beat the best fit without it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .backbones import SPECS, BackboneSpec, build_meta
from .steps import TrainOptions, plan_train, train_models
from .trace import GIB, Plan

HEADROOM = 2 * GIB
"""Left free on the card by default: what the plan does not count (the CUDA context, cuBLAS and
cuDNN workspaces, the caching allocator's fragmentation; report.NOT_COUNTED). A 24 GB card
gets a 22 GiB target, issue 24's bound for the 24 GB preset."""

MIXED_PRECISION = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "no"}
"""The planner's weight dtype -> the recipe's ``mixed_precision``."""

MIN_RANK = 8
"""The lowest LoRA rank the search halves down to."""

_UNITS = {"g": GIB, "gb": GIB, "gib": GIB, "m": 2**20, "mb": 2**20, "mib": 2**20}


_TRACES: dict[tuple[str, Callable[..., Plan]], dict[TrainOptions, Plan]] = {}
"""Traces kept for the process: a second search (another card) reuses the first's."""


def parse_memory(text: str) -> int:
    """Bytes of a card's memory written ``24GB``, ``24GiB``, ``16g``, ``24 GB`` or ``24000MiB``.

    GB and GiB are both read as GiB (2**30 bytes): a GPU's memory is sold in powers of two (a
    "24 GB" RTX 4090 has 24 GiB). ValueError naming the accepted forms otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]+)\s*", text)
    if not match or match[2].lower() not in _UNITS or float(match[1]) <= 0:
        raise ValueError(f"expected a memory size such as 24GB, 24GiB, 16g or 24000MiB, got "
                         f"{text!r}")
    return int(float(match[1]) * _UNITS[match[2].lower()])


@dataclass(frozen=True)
class Candidate:
    """One configuration the search planned: its options, peak bytes, FLOPs per step."""

    opts: TrainOptions
    peak: int
    flops: int
    lowered: bool = False  # the LoRA ranks are lower than those asked for

    @property
    def flops_per_sample(self) -> float:
        """FLOPs per training sample (per step / batch)."""
        return self.flops / self.opts.batch

    def label(self) -> str:
        """The knobs the search moves, in words."""
        o = self.opts
        return (f"checkpointing {'on' if o.checkpointing else 'off'}, batch {o.batch}, "
                f"{o.optimizer}" + (", VAE offload" if o.offload_vae_activations else "")
                + (f", ranks {ranks(o)}" if self.lowered else ""))


@dataclass(frozen=True)
class Fit:
    """The search's result: the target (card less headroom), every candidate planned, the best
    (None if nothing fits), its trace, and the seconds the search took."""

    card: int
    target: int
    tried: list[Candidate]
    best: Candidate | None
    plan: Plan | None
    seconds: float
    eight_bit: bool = True  # whether 8-bit AdamW was searched (bitsandbytes installed)

    def smallest(self) -> Candidate:
        """The candidate with the smallest peak."""
        return min(self.tried, key=lambda c: c.peak)


def ranks(opts: TrainOptions) -> str:
    """The LoRA ranks, student/fake/VAE."""
    return f"{opts.student_rank}/{opts.fake_rank}/{opts.vae_rank}"


def rank_levels(base: TrainOptions) -> list[TrainOptions]:
    """``base``, then its LoRA ranks halved together while the lowest stays at least
    :data:`MIN_RANK` (or, for ranks already under it, ``base`` only)."""
    levels = [base]
    while min(r := (levels[-1].student_rank, levels[-1].fake_rank, levels[-1].vae_rank)) \
            >= 2 * MIN_RANK:
        levels.append(dataclasses.replace(levels[-1], student_rank=r[0] // 2,
                                          fake_rank=r[1] // 2, vae_rank=r[2] // 2))
    return levels


def eight_bit_available() -> bool:
    """Whether bitsandbytes (8-bit AdamW, the ``adam8bit`` extra) is installed."""
    return importlib.util.find_spec("bitsandbytes") is not None


def optimiser_saving(spec: BackboneSpec, opts: TrainOptions) -> int:
    """Bytes of optimiser state 8-bit AdamW saves over AdamW on the recipe's trained LoRAs
    (both roles), from both optimisers' state on fake copies of those weights."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from scoredistill.optim import adamw, state_bytes, warm

    from .trace import Placeholders

    meta = build_meta(spec)
    train_models(meta, spec, dataclasses.replace(opts, checkpointing=False))  # adds the LoRAs
    trained = [p for m in (meta.transformer, meta.vae) for p in m.parameters() if p.requires_grad]
    sizes = {}
    with FakeTensorMode(), Placeholders():
        for kind in ("adamw", "adamw8bit"):
            params = [torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype)) for p in trained]
            optimiser = adamw(kind, params, lr=1e-6)
            warm(optimiser)
            sizes[kind] = state_bytes(optimiser)
    return sizes["adamw"] - sizes["adamw8bit"]


def fit(spec: BackboneSpec, base: TrainOptions, card: int, headroom: int = HEADROOM,
        max_batch: int = 16, plan: Callable[[BackboneSpec, TrainOptions], Plan] | None = None
        ) -> Fit:
    """Search checkpointing, batch and optimiser around ``base`` (its other knobs held) for the
    fewest FLOPs per sample with a peak at most ``card - headroom`` bytes; ties go to the larger
    batch (GPU throughput), then to AdamW (exact moments). Where nothing fits, the VAE offload,
    then lower LoRA ranks (:func:`rank_levels`). ``plan``: plan_train, or a stand-in with its
    signature (tests)."""
    start, target = time.perf_counter(), card - headroom
    if target <= 0:
        raise ValueError(f"a {card / GIB:g} GiB card less {headroom / GIB:g} GiB of headroom "
                         "leaves nothing to plan")
    # 8-bit AdamW's saving is read from bitsandbytes' own state: without it the knob is left
    # out (and said so), since the command would not run here either.
    eight_bit = eight_bit_available()
    plan = plan or plan_train
    traces = _TRACES.setdefault((repr(spec), plan), {})

    def traced(opts: TrainOptions) -> Plan:
        if opts not in traces:
            traces[opts] = plan(spec, opts)
        return traces[opts]

    tried: list[Candidate] = []
    for level in rank_levels(base):
        if any(c.peak <= target for c in tried):
            break  # lower ranks are the last resort
        saving, lowered = optimiser_saving(spec, level) if eight_bit else 0, level != base
        for offload in (False, True):
            if any(c.peak <= target for c in tried):
                break  # the offload is the last resort at these ranks
            around = dataclasses.replace(level, offload_vae_activations=offload)
            for checkpointing in (False, True):
                for batch in range(1, max_batch + 1):
                    opts = dataclasses.replace(around, checkpointing=checkpointing,
                                               batch=batch, optimizer="adamw")
                    if checkpointing and batch > 1 and _cannot_win(traces, around, tried,
                                                                   target, max_batch):
                        break
                    p = traced(opts)
                    tried.append(Candidate(opts, p.total, p.flops, lowered))
                    if eight_bit:
                        tried.append(Candidate(dataclasses.replace(opts, optimizer="adamw8bit"),
                                               p.total - saving, p.flops, lowered))
                    if tried[-1].peak > target:
                        break  # and every larger batch: the peak grows with it
    fits = [c for c in tried if c.peak <= target]
    best = min(fits, key=_rank, default=None)
    winner = None if best is None else traced(best.opts)
    return Fit(card, target, tried, best, winner, time.perf_counter() - start, eight_bit)


def _rank(c: Candidate) -> tuple[float, int, bool]:
    # FLOPs per sample to 4 significant digits (what is done once per step is a rounding
    # error), then the larger batch, then AdamW.
    return float(f"{c.flops_per_sample:.3e}"), -c.opts.batch, c.opts.optimizer != "adamw"


def _cannot_win(traces: Mapping[TrainOptions, Plan], base: TrainOptions,
                tried: list[Candidate], target: int, max_batch: int) -> bool:
    """Whether no batch with checkpointing on can beat the best fit without it.

    FLOPs are affine in the batch, ``F0 + b F1`` (F0: what is done once per step), read from the
    traces at batch 1 and 2 without checkpointing; checkpointing adds ``b R`` (the recomputed
    forward of each sample; R from batch 1). So with it, FLOPs per sample are at least
    ``F0 / max_batch + F1 + R``."""
    off = [traces.get(dataclasses.replace(base, checkpointing=False, batch=b,
                                          optimizer="adamw")) for b in (1, 2)]
    on = traces.get(dataclasses.replace(base, checkpointing=True, batch=1, optimizer="adamw"))
    fits = [c for c in tried if c.peak <= target and not c.opts.checkpointing
            and c.opts.offload_vae_activations == base.offload_vae_activations]
    if None in off or on is None or not fits:
        return False
    f1 = off[1].flops - off[0].flops
    f0, recompute = off[0].flops - f1, on.flops - off[0].flops
    return f0 / max_batch + f1 + recompute >= min(c.flops_per_sample for c in fits)


def recipe_args(opts: TrainOptions, pretrained: str = "/path/to/sd3-medium") -> list[str]:
    """``examples/tsdsr/train.py`` flags that train with ``opts`` (the recipe's spelling)."""
    if opts.dtype not in MIXED_PRECISION:
        raise ValueError(f"the recipe's mixed precision has no {opts.dtype}")
    args = ["--pretrained", pretrained, "--resolution", str(opts.size),
            "--batch-size", str(opts.batch),
            "--gradient-checkpointing" if opts.checkpointing else "--no-gradient-checkpointing",
            "--optimizer", opts.optimizer, "--mixed-precision", MIXED_PRECISION[opts.dtype],
            "--student-rank", str(opts.student_rank), "--fake-rank", str(opts.fake_rank),
            "--vae-rank", str(opts.vae_rank), "--cfg-scale", f"{opts.cfg_scale:g}"]
    if opts.offload_vae_activations:
        args.append("--offload-vae-activations")
    if not opts.dasm:
        args.append("--no-use-dasm")
    if not opts.lpips:
        args += ["--lpips-weight", "0"]
    return args


def options_from_recipe(config: Mapping[str, Any] | Any) -> TrainOptions:
    """The planner's options of a recipe config (a TrainConfig or a mapping of its fields):
    the inverse of :func:`recipe_args` on the knobs that change memory."""
    get = config.get if isinstance(config, Mapping) else lambda k: getattr(config, k)
    dtypes = {v: k for k, v in MIXED_PRECISION.items()}
    return TrainOptions(size=get("resolution"), batch=get("batch_size"),
                        dtype=dtypes[get("mixed_precision")], student_rank=get("student_rank"),
                        fake_rank=get("fake_rank"), vae_rank=get("vae_rank"),
                        dasm=get("use_dasm"), cfg_scale=get("cfg_scale"),
                        lpips=bool(get("lpips_weight")),
                        checkpointing=get("gradient_checkpointing"),
                        optimizer=get("optimizer"),
                        offload_vae_activations=get("offload_vae_activations"))


def memory_size(text: str) -> int:
    """An argparse ``type``: :func:`parse_memory`."""
    import argparse

    try:
        return parse_memory(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def fit_command(args: Any, spec: BackboneSpec, base: TrainOptions) -> int:
    """``scoredistill-plan train --fit SIZE``: print the search, the winner's plan and the
    recipe's command line; UserError naming the smallest peak found when nothing fits."""
    from scoredistill.cli import UserError

    from .report import render

    if (args.batch != 1 or args.checkpointing or args.optimizer != "adamw"
            or args.offload_vae_activations):
        raise UserError("--fit searches --batch, --checkpointing, --optimizer and "
                        "--offload-vae-activations itself: leave them out")
    if getattr(args, "design", "ours") != "ours":
        raise UserError("--fit searches the recipe's knobs (--design ours); the release's "
                        "design has no recipe here to run")
    card, headroom = args.fit, int(args.headroom * GIB)
    try:
        result = fit(spec, base, card, headroom)
    except ValueError as exc:
        raise UserError(f"--fit {card / GIB:g}GiB --headroom {args.headroom:g}: {exc}") from None
    head = (f"--fit: {args.model} at {base.size} px, ranks {base.student_rank}/{base.fake_rank}/"
            f"{base.vae_rank}, DASM {'on' if base.dasm else 'off'}, LPIPS "
            f"{'on' if base.lpips else 'off'}, CFG {base.cfg_scale:g}, {args.dtype}; target "
            f"{result.target / GIB:.2f} GiB (a {card / GIB:g} GiB card less {args.headroom:g} "
            f"GiB headroom); searched in {result.seconds:.0f} s"
            + ("" if result.eight_bit else "; 8-bit AdamW not searched: bitsandbytes is not "
               "installed (pip install 'scoredistill[adam8bit]')"))
    if result.best is None:
        low = result.smallest()
        raise UserError(f"{head}: nothing fits, with LoRA ranks down to "
                        f"{ranks(rank_levels(base)[-1])}; the smallest peak found is "
                        f"{low.peak / GIB:.2f} GiB ({low.label()}): lower --size, or plan a "
                        "larger card")
    width = max(len(c.label()) for c in result.tried) + 2
    lines = [head]
    if result.best.lowered:
        lines.append(f"Nothing fits at LoRA ranks {ranks(base)}: lowered to "
                     f"{ranks(result.best.opts)}, which changes the method (fewer trained "
                     "parameters), not only its memory")
    lines += ["", f"  {'configuration':<{width}}{'peak GiB':>10}{'TFLOP/sample':>14}"]
    for c in result.tried:
        mark = "  <- best" if c == result.best else (
            "" if c.peak <= result.target else "  over")
        lines.append(f"  {c.label():<{width}}{c.peak / GIB:>10.2f}"
                     f"{c.flops_per_sample / 1e12:>14.2f}{mark}")
    model = args.model if args.model not in SPECS else f"/path/to/{args.model}"
    command = " ".join(["python examples/tsdsr/train.py", *recipe_args(result.best.opts, model),
                        "--hq-dir DATA/hq --embeds-dir DATA/embeds"])
    assert result.plan is not None
    lines += ["", render(f"Best: {result.best.label()} (traced)", result.plan), "",
              "Run it (add your data folders and other flags):", "", f"  {command}"]
    print("\n".join(lines))
    return 0

