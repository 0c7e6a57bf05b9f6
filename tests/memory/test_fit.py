"""scoredistill-plan train --fit: the card sizes it reads, the search (with a stand-in planner of
known peaks and FLOPs), the refusal when nothing fits, the recipe command it prints, the 8-bit
optimiser's derived peak against a trace, and the presets' planned peaks (issue 24)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from scoredistill.memory import SPECS, TrainOptions, plan_train
from scoredistill.memory.cli import main
from scoredistill.memory.fit import (
    fit,
    optimiser_saving,
    options_from_recipe,
    parse_memory,
    rank_levels,
    recipe_args,
)
from scoredistill.memory.trace import GIB, Plan

TINY = TrainOptions(size=64, dtype=torch.float32)
PRESETS = Path(__file__).resolve().parents[2] / "examples" / "tsdsr" / "configs"


@pytest.mark.parametrize("text, gib", [("24GB", 24), ("24GiB", 24), ("16g", 16), ("24 GB", 24),
                                       ("12.5gb", 12.5), ("24576MiB", 24), ("80G", 80)])
def test_card_sizes(text, gib):
    assert parse_memory(text) == gib * GIB


@pytest.mark.parametrize("text", ["24", "24TB", "GB", "0GB", "-8GB", "24 G B"])
def test_other_sizes_are_one_line(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", f"--fit={text}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "--fit" in err[-1] and "24GB" in err[-1], err


class Stand:
    """A planner of known results: 4 GiB of weights at the LoRA ranks 64 (2 GiB + 2 GiB x rank /
    64) plus 6 GiB of activations per sample (3 with checkpointing), 2 GiB (1) less with the
    VAE's offloaded; 10 TFLOP per sample (14 with checkpointing's recompute) + 1 GFLOP a
    step."""

    def __init__(self) -> None:
        self.calls: list[TrainOptions] = []

    def __call__(self, spec, opts: TrainOptions) -> Plan:
        self.calls.append(opts)
        per_sample = (3 if opts.checkpointing else 6) - (
            (1 if opts.checkpointing else 2) if opts.offload_vae_activations else 0)
        weights = 2 * GIB + 2 * GIB * opts.student_rank // 64
        total = weights + per_sample * GIB * opts.batch
        flops = int(1e9 + opts.batch * (14e12 if opts.checkpointing else 10e12))
        return Plan({"Total": total, "Activation": total - weights}, [], flops, 0)


@pytest.mark.parametrize("card, best", [
    (24, (False, 3)),  # 10, 16, 22 GiB fit a 22 GiB target: the largest batch, no recompute
    (12, (False, 1)),
    (11, (True, 1)),   # 10 GiB fits the card but not the card less 2 GiB of headroom
    (9, (True, 1)),    # 7 GiB; the offload (8 GiB without checkpointing) is not searched
    (8, (True, 1, True)),  # nothing fits without the offload: 6 GiB with it
])
def test_fewest_flops_per_sample_under_the_target(card, best):
    stand = Stand()
    result = fit(SPECS["tiny"], TINY, card * GIB, plan=stand)
    assert result.best is not None and result.target == (card - 2) * GIB
    o = result.best.opts
    assert (o.checkpointing, o.batch, *([True] if o.offload_vae_activations else [])) == best
    # The offload is the last resort: planned only where nothing fits without it; the ranks
    # stay as asked wherever something fits at them.
    assert any(c.offload_vae_activations for c in stand.calls) == (card == 8)
    assert {c.student_rank for c in stand.calls} == {64} and not result.best.lowered
    assert result.best.opts.optimizer == "adamw"  # 8-bit saves ~1 MB here: never needed
    assert result.best.peak <= result.target
    assert result.plan == stand(None, result.best.opts)  # the winner's own trace is shown
    if card == 24:
        # Checkpointing cannot win (14 > 10 TFLOP per sample): batch 1 only, then pruned.
        assert [o.batch for o in stand.calls if o.checkpointing] == [1]


def test_nothing_fits_is_one_line_naming_the_smallest_peak(monkeypatch, capsys):
    import scoredistill.memory.fit as fit_module

    monkeypatch.setattr(fit_module, "plan_train", Stand())
    code = main(["train", "--model", "tiny", "--size", "64", "--dtype", "fp32", "--fit", "6GB"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    # The smallest: checkpointing on, the VAE's activations offloaded and the ranks at 8:
    # 2.25 + 2 GiB against a 4 GiB target.
    assert "nothing fits, with LoRA ranks down to 8/8/8" in err[0], err
    assert "smallest peak found is 4.25 GiB" in err[0], err
    # 8-bit AdamW's saving (about 1 MB here) makes it the smallest where bitsandbytes is in.
    assert re.search(r"\(checkpointing on, batch 1, adamw(8bit)?, VAE offload, ranks 8/8/8\)",
                     err[0]), err


def test_lower_ranks_only_where_nothing_fits_at_the_asked_ones(monkeypatch, capsys):
    import scoredistill.memory.fit as fit_module

    pytest.importorskip("jsonargparse", reason="the recipe's parser (train extra)")
    from examples.tsdsr.training.config import parse_config

    stand = Stand()
    monkeypatch.setattr(fit_module, "plan_train", stand)
    # A 5 GiB target: 6 GiB at ranks 64 at best; 3 + 2 GiB at ranks 32 with checkpointing and
    # the offload. Ranks 16 are never planned.
    assert main(["train", "--model", "tiny", "--size", "64", "--dtype", "fp32", "--fit",
                 "7GB"]) == 0
    assert [r for r in (64, 32, 16) if any(c.student_rank == r for c in stand.calls)] == [64, 32]
    out = capsys.readouterr().out
    assert "Nothing fits at LoRA ranks 64/64/64: lowered to 32/32/32" in out
    command = out.split("python examples/tsdsr/train.py ")[1].split()
    assert options_from_recipe(parse_config(command)) == dataclasses.replace(
        TINY, student_rank=32, fake_rank=32, vae_rank=32, checkpointing=True,
        offload_vae_activations=True)


@pytest.mark.parametrize("asked, levels", [
    ((64, 64, 64), [(64, 64, 64), (32, 32, 32), (16, 16, 16), (8, 8, 8)]),
    ((64, 64, 16), [(64, 64, 16), (32, 32, 8)]),
    ((4, 4, 4), [(4, 4, 4)]),
])
def test_rank_levels_halve_together_down_to_8(asked, levels):
    base = TrainOptions(student_rank=asked[0], fake_rank=asked[1], vae_rank=asked[2])
    assert [(o.student_rank, o.fake_rank, o.vae_rank) for o in rank_levels(base)] == levels


def test_the_printed_command_runs_the_pick(monkeypatch, capsys):
    import scoredistill.memory.fit as fit_module

    pytest.importorskip("jsonargparse", reason="the recipe's parser (train extra)")
    from examples.tsdsr.training.config import parse_config

    monkeypatch.setattr(fit_module, "plan_train", Stand())
    assert main(["train", "--model", "tiny", "--size", "64", "--dtype", "fp32", "--fit",
                 "24GB"]) == 0
    out = capsys.readouterr().out
    command = out.split("python examples/tsdsr/train.py ")[1].split()
    config = parse_config(command)
    assert options_from_recipe(config) == dataclasses.replace(TINY, batch=3)


@pytest.mark.parametrize("opts", [
    TrainOptions(),
    TrainOptions(size=256, batch=3, checkpointing=True, optimizer="adamw8bit", dasm=False,
                 lpips=False, student_rank=16, fake_rank=8, vae_rank=4, cfg_scale=3.0,
                 dtype=torch.float16, offload_vae_activations=True),
])
def test_recipe_args_round_trip(opts):
    pytest.importorskip("jsonargparse", reason="the recipe's parser (train extra)")
    from examples.tsdsr.training.config import parse_config

    assert options_from_recipe(parse_config(recipe_args(opts))) == opts


@pytest.fixture(scope="module")
def tiny_plans():
    pytest.importorskip("lpips", reason="the train step's LPIPS (train extra)")
    pytest.importorskip("bitsandbytes", reason="the adam8bit extra")
    return {kind: plan_train(SPECS["tiny"], dataclasses.replace(TINY, optimizer=kind))
            for kind in ("adamw", "adamw8bit")}


def test_the_plan_holds_adamws_state(tiny_plans):
    # Every step after the first holds AdamW's two fp32 moments of each trained weight.
    from scoredistill.memory.backbones import build_meta
    from scoredistill.memory.steps import train_models

    meta = build_meta(SPECS["tiny"])
    train_models(meta, SPECS["tiny"], TINY)
    trained = sum(p.numel() for m in (meta.transformer, meta.vae) for p in m.parameters()
                  if p.requires_grad)
    assert tiny_plans["adamw"].peak["Optstate"] >= 2 * 4 * trained


def test_8bit_peak_is_adamws_less_the_state_it_saves(tiny_plans):
    saving = optimiser_saving(SPECS["tiny"], TINY)
    assert saving > 0
    assert tiny_plans["adamw8bit"].total == tiny_plans["adamw"].total - saving


@pytest.mark.slow
@pytest.mark.parametrize("name, bound_gib", [("24gb", 22), ("16gb", 14), ("12gb", 10)])
def test_presets_fit_their_cards(name, bound_gib):
    # SD3-medium at real size, traced on fake tensors: minutes per preset.
    pytest.importorskip("lpips", reason="the train step's LPIPS (train extra)")
    pytest.importorskip("jsonargparse", reason="the recipe's parser (train extra)")
    from examples.tsdsr.training.config import parse_config

    config = parse_config(["--config", str(PRESETS / f"{name}.yaml")])
    opts = options_from_recipe(config)
    assert (opts.size, opts.student_rank, opts.fake_rank, opts.vae_rank) == (512, 64, 64, 64)
    assert opts.dasm and opts.lpips and opts.cfg_scale == 7.5  # the paper's method
    if opts.optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes", reason="the preset's 8-bit AdamW (adam8bit extra)")
    plan = plan_train(SPECS["sd3-medium"], opts)
    assert plan.total <= bound_gib * GIB, plan.total / GIB


def test_without_bitsandbytes_8bit_is_left_out_and_said_so(monkeypatch, capsys):
    import scoredistill.memory.fit as fit_module

    monkeypatch.setattr(fit_module, "eight_bit_available", lambda: False)
    monkeypatch.setattr(fit_module, "plan_train", Stand())
    assert main(["train", "--model", "tiny", "--size", "64", "--dtype", "fp32", "--fit",
                 "24GB"]) == 0
    out = capsys.readouterr().out
    assert "8-bit AdamW not searched: bitsandbytes is not installed" in out
    assert "adamw8bit" not in out.split("python examples/tsdsr/train.py ")[0]


def test_fit_refuses_the_knobs_it_searches(capsys):
    code = main(["train", "--model", "tiny", "--fit", "24GB", "--offload-vae-activations"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--offload-vae-activations" in err[0], err
