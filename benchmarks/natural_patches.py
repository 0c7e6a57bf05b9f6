"""Distillation losses on natural-patch super-resolution with an exact teacher and posterior.

Problem (:class:`scoredistill.patches.PatchSR`): HQ 8x8 patches (grey 64-D, or colour 192-D)
from a full-covariance Gaussian mixture fitted by EM to the photos bundled with scikit-image;
LQ a 2x average pool plus noise. The teacher is exact, and so is the posterior p(x_HQ | y_LQ).
The one-step generator, fake score and learned teacher (an MLP fitted by flow matching to
samples of the mixture) are trained exactly as in :mod:`benchmarks.compare_losses`, with one
budget for every loss; the paper's claims are tested by paired comparisons across seeds
(:mod:`benchmarks.paired_stats`) and their verdicts written from the numbers.

    python -m benchmarks.natural_patches --quick            # grey, small, ~2 min
    python -m benchmarks.natural_patches                    # grey 64-D, 5 seeds
    python -m benchmarks.natural_patches --colour           # colour 192-D, 5 seeds
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

import scoredistill
from benchmarks import compare_losses, options
from benchmarks.compare_losses import (
    CONDITIONAL_LOSSES,
    NEW,
    QUICK_NEW,
    TEACHER_FEATURE_LOSSES,
    cost_notes,
    mean_curves,
    run_one,
    timing,
)
from benchmarks.paired_stats import Claim, judge
from benchmarks.patch_metrics import METRIC_LABELS, PatchEval, save_bars, save_patches
from benchmarks.report import (
    command_line,
    markdown_table,
    write_json,
    write_markdown,
    write_report,
)
from benchmarks.toy_metrics import DirectionProbe, mean_std, train_learned_teacher
from scoredistill import DASMSampler, SDSLoss, TSDLoss, TSMLoss, VSDLoss, cli
from scoredistill.patches import PatchSR
from scoredistill.toy import ToyTrainer

PROG = "benchmarks.natural_patches"


def dasm(n: int) -> DASMSampler:
    """The paper's DASM with ``n`` points (first weight 1, the rest 0.3)."""
    return DASMSampler(num_points=n, weights=(1.0,) + (0.3,) * (n - 1))


# One line per compared loss; every one is trained with the exact and with the learned teacher,
# in this order (a run stopped early has the first rows complete).
LOSSES: dict[str, Any] = {
    "recon only": None,
    "+ VSD": VSDLoss(),
    "+ TSD (eps)": TSDLoss(space="epsilon"),
    "+ TSD (flow)": TSDLoss(),
    "+ TSM (eps)": TSMLoss(space="epsilon"),
    "+ TSM (flow)": TSMLoss(),
    "+ TSD+DASM (eps)": TSDLoss(space="epsilon", dasm=dasm(4)),
    "+ TSD+DASM (flow)": TSDLoss(dasm=dasm(4)),
    "+ SDS": SDSLoss(),
}
# Losses other engineers add to the library take part as soon as they exist there.
LOSSES.update({f"+ {name[:-4]}": getattr(scoredistill, name)()
               for name in ("DMDLoss",) if hasattr(scoredistill, name)})
# Issue 25's methods, as compare_losses runs them (SiD, SIM, DMD2 with its head; the GAN weight
# scaled to the patch's dimension there).
LOSSES.update({name: compare_losses.LOSSES[name] for name in NEW if name in compare_losses.LOSSES})
# CSD and decoupled DMD (CONDITIONAL_LOSSES) distill the exact LQ-conditional teacher
# (PatchSR's posterior denoiser), so they run with the exact teacher only: the learned teacher
# is unconditional. f-distill (TEACHER_FEATURE_LOSSES) reads the teacher's features: the
# learned teacher only, the exact one has no hidden layer.
# The reference TSD row for the new methods: epsilon space (flow-space TSD diverged on colour
# patches with the exact teacher).
TSD_REFERENCE = "+ TSD (eps)"
# The sweeps of TSD+DASM's lambda and N (release settings otherwise), exact teacher only, in
# epsilon space: in flow space every setting diverged (the grey run of 2026-11-30 08:23 UTC), so
# a sweep there compares divergences.
SWEEP: dict[str, Any] = {
    **{f"TSD+DASM (eps) λ={lam}": TSDLoss(space="epsilon", lam=lam, dasm=dasm(4))
       for lam in (0.3, 0.5, 0.9)},
    **{f"TSD+DASM (eps) N={n}": TSDLoss(space="epsilon", dasm=dasm(n)) for n in (2, 6)},
}
SWEEP_DEFAULT = "+ TSD+DASM (eps)"
METRICS = tuple(METRIC_LABELS)
PLOT_EVERY_S = 300.0
IMAGE_RUNS = ("recon only", "+ VSD", "+ TSD (eps)", "+ TSD+DASM (eps)", "+ TSD+DASM (flow)")


@dataclass(frozen=True)
class Budget:
    """One budget for every loss; the problem's size; what is evaluated."""

    colour: bool = False
    components: int = 32
    fit_patches: int = 30_000
    em_iters: int = 30
    seeds: int = 5
    steps: int = 120
    batch: int = 128
    hidden: int = 256
    lr: float = 1e-3
    fake_lr: float = 1e-3
    fake_warmup: int = 100
    # The MSE pulls to the posterior mean with a gradient ~20x the distillation terms' (sigma^2
    # weighting, measured on the toy problem too): keep the regulariser dominant.
    recon_weight: float = 0.05
    reg_weight: float = 1.0
    teacher_steps: int = 800
    probes: int = 2
    eval_n: int = 2048
    sweep: bool = True
    all_rows: bool = True  # False: of the issue-25 rows only compare_losses.QUICK_NEW


# 192-D: the grey run's steps and learned teacher; half its batch and evaluation set (each run
# ~3x a grey run's cost per sample), no sweep. ~25 min on one core of a 2-core EPYC.
COLOUR = Budget(colour=True, fit_patches=16_000, em_iters=15, batch=64, eval_n=1024, sweep=False)
QUICK = Budget(components=8, fit_patches=4000, em_iters=8, seeds=2, steps=40, batch=64,
               hidden=128, fake_warmup=30, teacher_steps=150, probes=1, eval_n=512, sweep=False,
               all_rows=False)


def claims(losses: dict[str, Any]) -> list[Claim]:
    """The paper's claims and the benchmark's question, as paired comparisons."""
    out = []
    for t in ("exact", "learned"):
        for sp in ("flow", "eps"):
            tsd, tsdd = f"+ TSD ({sp})", f"+ TSD+DASM ({sp})"
            out += [
                Claim(f"{t} teacher: TSD ({sp}) more realistic than VSD (Eq. 5 vs 3)", "swd",
                      (t, tsd), (t, "+ VSD")),
                Claim(f"{t} teacher: TSD ({sp}) more faithful than VSD", "mse_hq",
                      (t, tsd), (t, "+ VSD")),
                Claim(f"{t} teacher: DASM helps TSD ({sp}) (Sec. 3.4)", "swd", (t, tsdd),
                      (t, tsd)),
            ]
        out += [
            Claim(f"{t} teacher: TSM in eps space closer to HQ than in flow space", "mse_hq",
                  (t, "+ TSM (eps)"), (t, "+ TSM (flow)")),
            Claim(f"{t} teacher: TSD+DASM eps more realistic than flow", "swd",
                  (t, "+ TSD+DASM (eps)"), (t, "+ TSD+DASM (flow)")),
            Claim(f"{t} teacher: VSD more realistic than reconstruction alone", "swd",
                  (t, "+ VSD"), (t, "recon only")),
            Claim(f"{t} teacher (Fig. 3): on the blurry start the teacher points to the HQ "
                  "better from z_t than from z_hat_t", "cos_hq_start",
                  (t, "recon only"), (t, "recon only"), better="higher",
                  metric_b="cos_hat_start"),
        ]
    return out


def other_claims(methods: bool = False) -> list[Claim]:
    """The losses outside the paper (DMD, CSD) against VSD, or (``methods``) issue 25's
    against VSD and against `TSD_REFERENCE`: two Holm families, so the newer methods take no
    power from the older comparisons (`judge` skips rows that did not run: CSD and decoupled
    DMD have no learned-teacher row, f-distill no exact-teacher row)."""
    pairs = ([(name, ref) for name in NEW for ref in ("+ VSD", TSD_REFERENCE)] if methods
             else [(name, "+ VSD") for name in ("+ DMD", "+ CSD")])
    return [Claim(f"{t} teacher: {name[2:]} {what} than {ref[2:]}", metric, (t, name), (t, ref))
            for t in ("exact", "learned") for name, ref in pairs
            for metric, what in (("swd", "more realistic"), ("mse_hq", "more faithful"))]


def _per_seed(runs: list[dict[str, Any]], key: str) -> list[float]:
    return [r["metrics"][key] if r["metrics"] is not None else math.nan for r in runs]


def summarise(teacher: str, name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A table row: mean ± std over the seeds that finished, per-seed values kept."""
    ok = [r for r in runs if r["metrics"] is not None]
    row: dict[str, Any] = {"teacher": teacher, "loss": name, "seeds": f"{len(ok)}/{len(runs)}"}
    for m in METRICS:
        mu, sd = mean_std([r["metrics"][m] for r in ok])
        row[f"{m}_mean"], row[f"{m}_std"], row[m] = mu, sd, f"{mu:.4g} ± {sd:.2g}"
        row[f"{m}_per_seed"] = _per_seed(runs, m)
    curves = mean_curves([r["curve"] for r in ok or runs])
    for key in ("cos_hat", "cos_hq", "tsm_align_flow", "tsm_align_epsilon"):
        row[f"{key}_start"], row[f"{key}_end"] = curves[key][0], curves[key][-1]
        for edge, i in (("start", 0), ("end", -1)):
            row[f"{key}_{edge}_per_seed"] = [r["curve"][i][key] for r in runs]
    row["cos z_hat_t / z_t (start → end)"] = (
        f"{curves['cos_hat'][0]:.2f} / {curves['cos_hq'][0]:.2f} → "
        f"{curves['cos_hat'][-1]:.2f} / {curves['cos_hq'][-1]:.2f}")
    row["TSM align flow / eps (end)"] = (f"{curves['tsm_align_flow'][-1]:+.2f} / "
                                         f"{curves['tsm_align_epsilon'][-1]:+.2f}")
    row.update(timing(runs))
    return row


# Three tables of at most six columns (the docs theme gives each column at least 100 px and
# the page ~690): realism, fidelity, the direction probes.
COLUMNS = ("teacher", "loss", "seeds", "post_nll", "prior_nll", "swd")
FIDELITY_COLUMNS = ("teacher", "loss", "detail", "mse_hq", "mse_pmean")
PROBE_COLUMNS = ("teacher", "loss", "cos z_hat_t / z_t (start → end)",
                 "TSM align flow / eps (end)")
PROBE_HEADERS = {"cos z_hat_t / z_t (start → end)": "cos ẑ_t / z_t (start → end)",
                 "TSM align flow / eps (end)": "TSM align flow / eps"}
VERDICT_COLUMNS = ("verdict", "claim", "metric", "effect")  # the verdict first: it matters


def run_all(problem: PatchSR, budget: Budget, evaluator: PatchEval,
            on_row: Callable[[list[dict[str, Any]], dict[str, torch.Tensor], int, int], None]
            ) -> None:
    """Every (teacher, loss) run for every seed, row by row: the exact teacher's rows, then the
    learned teacher's, then the sweep, each with all its seeds before the next, so that a run
    stopped early leaves complete rows. After each row ``on_row(rows, images, rows_done,
    rows_planned)`` gets the table so far and seed 0's example outputs."""
    probe = DirectionProbe(problem, n=min(512, budget.eval_n))
    plan = [("exact", n, loss) for n, loss in {**LOSSES, **CONDITIONAL_LOSSES}.items()]
    plan += [("learned", n, loss) for n, loss in {**LOSSES, **TEACHER_FEATURE_LOSSES}.items()]
    plan = [p for p in plan if budget.all_rows or p[1] not in NEW or p[1] in QUICK_NEW]
    plan += [("exact", n, loss) for n, loss in SWEEP.items()] if budget.sweep else []
    warm: dict[int, ToyTrainer] = {}
    learned: dict[int, torch.nn.Module] = {}
    rows: list[dict[str, Any]] = []
    images: dict[str, torch.Tensor] = {}
    start = time.perf_counter()
    for i, (teacher, name, loss) in enumerate(plan):
        runs = []
        for seed in range(budget.seeds):
            if seed not in warm:  # same generator init, data stream and fake score for all rows
                warm[seed] = ToyTrainer(problem, None, batch=budget.batch, lr=budget.lr,
                                        fake_lr=budget.fake_lr, seed=seed, hidden=budget.hidden)
                warm[seed].warm_up_fake(budget.fake_warmup)
            if teacher == "learned" and seed not in learned:
                learned[seed] = train_learned_teacher(problem, budget.teacher_steps,
                                                      seed=1000 + seed, batch=256,
                                                      hidden=budget.hidden)
            outputs: list[torch.Tensor] = []

            def evaluate(gen: torch.nn.Module, keep: list[torch.Tensor] = outputs
                         ) -> dict[str, float]:
                with torch.no_grad():
                    keep.append(gen(evaluator.lq))
                return evaluator(keep[-1])

            model = problem.teacher if teacher == "exact" else learned[seed]
            runs.append(run_one(warm[seed], loss, model, probe, budget, evaluate))
            if seed == 0 and teacher == "exact" and name in IMAGE_RUNS and outputs:
                images[name] = problem.to_images(outputs[-1][:12]).float()
        rows.append(summarise(teacher, name, runs))
        print(f"{teacher} / {name} done after {time.perf_counter() - start:.0f} s", flush=True)
        on_row(rows, images, i + 1, len(plan))


def judge_rows(rows: list[dict[str, Any]], sweep: bool) -> dict[str, list[dict[str, Any]]]:
    """The verdicts, one Holm family each, of the paper's claims, of DMD and CSD, of issue 25's
    methods and (if ``sweep``) of the sweep, from the table's rows (their per-seed values), under
    the report's keys."""
    per_seed = {(r["teacher"], r["loss"]): {k[: -len("_per_seed")]: v for k, v in r.items()
                                            if k.endswith("_per_seed")} for r in rows}
    swept = [Claim(f"default ({SWEEP_DEFAULT}: λ=0.7, N=4) more realistic than {n}", "swd",
                   ("exact", SWEEP_DEFAULT), ("exact", n)) for n in SWEEP]
    return {"verdicts": judge(claims(LOSSES), per_seed),
            "other_verdicts": judge(other_claims(), per_seed),
            "method_verdicts": judge(other_claims(methods=True), per_seed),
            "sweep_verdicts": judge(swept, per_seed) if sweep else []}


def check(rows: list[dict[str, Any]], refs: dict[str, dict[str, float]]) -> None:
    """What must hold whatever the losses do (the Monte-Carlo check runs before training)."""
    for r in rows:
        if r["loss"] == "recon only":
            assert r["seeds"].startswith(str(len(r["mse_hq_per_seed"]))), r["seeds"]
        assert all(math.isfinite(r[f"{m}_mean"]) for m in METRICS) or r["seeds"][0] == "0", r
    ceiling, pmean = (refs["exact posterior sample (ceiling)"],
                      refs["exact posterior mean (MSE optimum)"])
    # The posterior mean is the MSE optimum: E||G - x||^2 = E||m - x||^2 + E||G - m||^2.
    for r in rows:
        gap = r["mse_hq_mean"] - (pmean["mse_hq"] + r["mse_pmean_mean"])
        assert abs(gap) < 0.05 * r["mse_hq_mean"] + 3 * r["mse_hq_std"] + 1e-3, (r["loss"], gap)
    # An exact posterior sample is realistic: far below reconstruction alone in sliced W2.
    recon = [r for r in rows if r["loss"] == "recon only" and r["teacher"] == "exact"]
    assert all(ceiling["swd"] < r["swd_mean"] for r in recon), (ceiling, recon)


def monte_carlo_check(problem: PatchSR, evaluator: PatchEval, n_prior: int = 100_000,
                      min_ess: float = 500.0) -> dict[str, float]:
    """The exact teacher equals the Monte-Carlo posterior mean E[x0 | x_t]: self-normalised
    importance sampling from the prior at the least noisy of a few levels (schedule index 600,
    500, ... 50; index 0 is pure noise) where its effective sample size exceeds ``min_ess``."""
    g = torch.Generator().manual_seed(5)
    prior = problem.prior.sample(n_prior, g)
    x0 = evaluator.hq[:4].double()
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    for index in (600, 500, 400, 300, 200, 100, 50):
        t, a, s = scoredistill.index_alpha_sigma(problem.teacher.schedule, torch.tensor([index]))
        a, s = float(a), float(s)
        x_t = a * x0 + s * noise
        logw = -0.5 * (x_t[:, None] - a * prior).square().sum(-1) / s**2  # (4, n_prior)
        w = (logw - logw.max(1, keepdim=True).values).exp()
        ess = w.sum(1) ** 2 / w.square().sum(1)
        if float(ess.min()) > min_ess:
            break
    else:
        raise AssertionError(f"importance sampling too poor to check (ESS {ess.tolist()})")
    mc = (w @ prior) / w.sum(1, keepdim=True)
    exact = problem.prior.denoise(x_t, torch.full((4,), a, dtype=torch.float64),
                                  torch.full((4,), s, dtype=torch.float64))
    se = float(prior.std(0).max()) / ess.sqrt()
    worst = float(((mc - exact).abs().max(1).values / se).max())
    assert worst < 6, f"exact denoiser differs from Monte-Carlo by {worst:.1f} standard errors"
    teacher = problem.teacher(x_t.float(), t.repeat(4))  # the ScoreModel, flow prediction
    torch.testing.assert_close(teacher, ((x_t - a * exact) / s - exact).float(), atol=1e-3,
                               rtol=1e-3)
    return {"mc_index": index, "mc_sigma": s, "mc_min_ess": float(ess.min()),
            "mc_worst_error_in_se": worst}


def notes(report: dict[str, Any]) -> str:
    """The text under the table, from the report's JSON content alone (so a re-render of a
    committed run, ``--from-json``, writes it again unchanged)."""
    budget, mc, done = report["budget"], report["monte_carlo"], report["rows_done"]
    kind = "colour" if budget["colour"] else "grey"
    # Runs before these were stored used PatchSR's defaults: 8x8 patches, its noise.
    problem = report.get("problem") or {
        "dim": 64 * (3 if budget["colour"] else 1),
        "noise_std": next(f.default for f in fields(PatchSR) if f.name == "noise_std")}
    planned = report.get("rows_planned", done)
    status = (f"**Partial: {done} of {planned} rows finished (each with all its seeds); "
              "claims on missing rows are not tested yet.** " if report["partial"] else "")
    refs = report["references"]  # transposed: one row per metric, one column per reference
    ref_rows = [{"metric": m, **{n: f"{v[m]:.4g}" for n, v in refs.items()}} for m in METRICS]
    verdicts, others, sweep = (report["verdicts"], report["other_verdicts"],
                               report["sweep_verdicts"])
    methods = report.get("method_verdicts", [])  # runs before issue 25's rows have none
    return (
        status + f"Problem: {problem['dim']}-D {kind} 8x8 patches, mixture of "
        f"{budget['components']} full-covariance Gaussians fitted by EM to "
        f"{budget['fit_patches']} patches of the photos bundled with scikit-image; LQ = 2x "
        f"average pool + N(0, {problem['noise_std']}^2) (standardised units). Budget: "
        f"{budget['seeds']} seeds x {budget['steps']} generator steps, batch {budget['batch']}, "
        f"MLP width {budget['hidden']}, Adam lr {budget['lr']}, objective "
        f"{budget['recon_weight']} x MSE + {budget['reg_weight']} x L_reg (recon only: 1 x MSE), "
        f"sigma^2 time weighting; learned teacher: {budget['teacher_steps']} flow-matching steps. "
        f"Runtime {report['runtime_s']:.0f} s. Exact teacher vs Monte-Carlo posterior mean at "
        f"index {mc['mc_index']} (sigma {mc['mc_sigma']:.2f}, effective sample size >= "
        f"{mc['mc_min_ess']:.0f}): worst error {mc['mc_worst_error_in_se']:.2f} standard "
        "errors.\n\nFidelity:\n\n" + markdown_table(report["rows"], FIDELITY_COLUMNS)
        + "\n\nDirection probes:\n\n"
        + markdown_table(report["rows"], PROBE_COLUMNS, PROBE_HEADERS)
        + "\n\nReferences (the exact posterior's own scores):\n\n"
        + markdown_table(ref_rows, ("metric", *refs))
        + "\n\nVerdicts (paired t-test across seeds, Holm-adjusted over the claims, alpha "
        "0.05; effect = mean over seeds of a - b):\n\n"
        + markdown_table(verdicts, VERDICT_COLUMNS)
        + (f"\n\nLosses outside the paper against {references(others)} (own Holm family):\n\n"
           + markdown_table(others, VERDICT_COLUMNS) if others else "")
        + (f"\n\nIssue 25's methods against {references(methods)} (own Holm family):\n\n"
           + markdown_table(methods, VERDICT_COLUMNS) if methods else "")
        + ("\n\nSweep of TSD+DASM's lambda and N (exact teacher; own Holm family):\n\n"
           + markdown_table(sweep, VERDICT_COLUMNS) if sweep else "")
        + cost_notes(report["rows"]))


def references(verdicts: list[dict[str, Any]]) -> str:
    """The runs the verdicts compare with, "VSD" or "VSD and TSD (eps)"."""
    names = dict.fromkeys(v["b"].split(" / + ", 1)[1] for v in verdicts)
    return " and ".join(names)


def render(report: dict[str, Any], md: Path, docs_assets: bool) -> Path:
    """Write the table ``md`` and its bar plot (same name, ``.png``) from the report's JSON
    content (the plot copied into the docs' assets if ``docs_assets``); return the plot."""
    write_markdown(report, md, notes=notes(report), columns=COLUMNS)
    budget = report["budget"]
    kind = "colour" if budget["colour"] else "grey"
    partial = (f" ({report['rows_done']}/{report.get('rows_planned', '?')} rows)"
               if report["partial"] else "")
    png = save_bars(report["rows"], report["references"], md.with_suffix(".png"),
                    f"{kind} patches: {budget['seeds']} seeds x {budget['steps']} steps"
                    + partial)
    return options.to_docs(png, docs_assets)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = options.parser(PROG, __doc__)
    options.add_quick(parser, "small mixture, 2 seeds (grey unless --colour)")
    parser.add_argument("--colour", action="store_true", help="8x8x3 colour patches (192-D)")
    parser.add_argument("--seeds", type=options.COUNT, help="override the number of seeds")
    parser.add_argument("--steps", type=options.COUNT, help="override the generator steps")
    options.add_docs_assets(parser)
    options.add_from_json(parser, "the tables and bar plot (the patch images stay as they are)")
    args = options.parse(parser, argv)
    options.refuse_with_from_json(args, ("quick", "colour", "seeds", "steps"))
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison, write report and plots, return the rows and verdicts."""
    args = parse(argv)
    if args.from_json:
        report = options.read_report(args.from_json, ("budget", "references", "monte_carlo",
                                                      "verdicts", "rows_done", "partial"))
        out = cli.writable_dir(args.out or args.from_json.parent, "--out")
        # Verdicts follow from the per-seed values: judged again, so a run re-rendered after
        # the claims' families change reads as a new run would (the JSON gets them too).
        report.update(judge_rows(report["rows"], report["budget"].get("sweep", False)))
        write_json(out / args.from_json.name, report)
        png = render(report, out / args.from_json.with_suffix(".md").name, args.docs_assets)
        print(f"rewrote {png.with_suffix('.md')} and {png} from {args.from_json}")
        return {"rows": report["rows"], "verdicts": report["verdicts"], "png": png}
    out = options.out_dir(args)
    budget = QUICK if args.quick else COLOUR if args.colour else Budget()
    budget = replace(budget, colour=args.colour, **{k: v for k, v in (
        ("seeds", args.seeds), ("steps", args.steps)) if v is not None})
    kind = "colour" if budget.colour else "grey"
    name = f"natural_patches_{kind}" + ("_quick" if args.quick else "")
    docs_assets = args.docs_assets and not args.quick

    start = time.perf_counter()
    problem = PatchSR(colour=budget.colour, components=budget.components,
                      fit_patches=budget.fit_patches, em_iters=budget.em_iters)
    evaluator = PatchEval(problem, n=budget.eval_n)
    refs = evaluator.reference_rows()
    mc = monte_carlo_check(problem, evaluator)
    result: dict[str, Any] = {}

    def report(rows: list[dict[str, Any]], images: dict[str, torch.Tensor], done: int,
               planned: int) -> None:
        partial = done < planned
        check(rows, refs)
        judged = judge_rows(rows, budget.sweep)
        runtime = time.perf_counter() - start
        meta = {"mode": "quick" if args.quick else "full", "rows_done": done,
                "rows_planned": planned, "partial": partial, "budget": asdict(budget),
                "problem": {"dim": problem.dim, "noise_std": problem.noise_std},
                "runtime_s": runtime, "references": refs, "monte_carlo": mc, **judged}
        write_report(name, f"Distillation losses on natural {kind} patches (exact posterior)",
                     rows, meta=meta, notes=notes({**meta, "rows": rows}), columns=COLUMNS,
                     out_dir=out, command=command_line("benchmarks.natural_patches", argv),
                     echo=not partial)
        result.update(rows=rows, verdicts=judged["verdicts"], others=judged["other_verdicts"],
                      methods=judged["method_verdicts"], sweep=judged["sweep_verdicts"],
                      runtime=runtime)
        # Drawing takes seconds (most of the quick mode's time if done every row): a partial
        # run redraws its plots at most every PLOT_EVERY_S.
        if partial and time.perf_counter() - result.get("plotted", -math.inf) < PLOT_EVERY_S:
            return
        result["plotted"] = time.perf_counter()
        result["png"] = render(json.loads((out / f"{name}.json").read_text()),
                               out / f"{name}.md", docs_assets)
        grid = {"HQ": problem.to_images(evaluator.hq[:12]).float(),
                "LQ (pinv)": problem.to_images(evaluator.lq[:12] @ torch.linalg.pinv(
                    problem.operator).T).float(),
                "posterior mean": problem.to_images(evaluator.post_mean[:12]).float(),
                "posterior sample": problem.to_images(evaluator.post_samples[1, :12]).float(),
                **images}
        patches = save_patches(grid, out / f"{name}_patches.png",
                               f"{kind} patches, seed 0, exact teacher: 12 LQ inputs (columns)")
        options.to_docs(patches, docs_assets)

    run_all(problem, budget, evaluator, report)
    print(f"runtime {result['runtime']:.0f} s; plot {result['png']}")
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)  # small MLPs: more threads only add noise on a shared machine
    raise SystemExit(options.entry(main, PROG)())
