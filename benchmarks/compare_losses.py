"""Distillation losses compared on a toy super-resolution problem with a known answer (TSD-SR).

Problem (:class:`scoredistill.toy.ToySR`): HQ ``z`` in 4-D from an 8-component Gaussian mixture,
LQ keeps 2 dims (+ noise) and loses the other 2, whose two completions (all +1.5 or all -1.5) it
cannot tell apart. The one-step generator starts at the pseudo-inverse (lost dims 0, the blurry
least-squares answer, off the data manifold). Every run has the same budget (steps, batch, lr,
seeds, fake-score warm-up) and objective ``recon_weight * MSE(z_hat, z) + reg_weight * L_reg``
with ``L_reg`` one of SDS (DreamFusion Eq. 3), VSD (TSD-SR Eq. 3), TSM (Eq. 4), TSD (Eq. 5) and
TSD with DASM (Sec. 3.4, Alg. 1), all with sigma^2 weighting, and DMD (Yin et al. 2024, Eqs. 7-8:
x0-space VSD, per-sample normalised, no time weighting) and CSD (Yu et al. 2023: the exact
conditional teacher's classifier score, ``T(lq) - T(null)``; exact teacher only, as the learned
teacher is unconditional). TSM and TSD take their differences
either in flow-velocity space (the release) or in epsilon space (the paper's Eq. 4); SDS and VSD
use flow space (for them the two spaces differ only by a 1/alpha time weighting). Each loss is
trained against the exact analytic teacher and against a learned MLP teacher fitted to HQ samples.

Reported (mean ± std over seeds): NLL of the outputs under the true density and sliced W2 to it
(realism), MSE to the paired HQ (fidelity), Fig. 3's cosine (see
:class:`benchmarks.toy_metrics.DirectionProbe` for the exact definition) on ``z_hat_t`` and
``z_t`` over training, and the TSM term's alignment with ``z - z_hat`` in both spaces.

    python -m benchmarks.compare_losses --quick     # 3 seeds, about a minute on one CPU thread
    python -m benchmarks.compare_losses             # 5 seeds, longer runs
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import options
from benchmarks.paired_stats import ALPHA, TEST_COLUMNS, TEST_HEADERS, compare_paired
from benchmarks.report import command_line, markdown_table, write_markdown, write_report
from benchmarks.toy_metrics import (
    FIG3_TIMESTEP,
    DirectionProbe,
    mean_std,
    save_plot,
    train_learned_teacher,
)
from scoredistill import (
    CFG,
    CSDLoss,
    DASMSampler,
    DMDLoss,
    ScoreDistillationLoss,
    ScoreModel,
    SDSLoss,
    TSDLoss,
    TSMLoss,
    VSDLoss,
    cli,
)
from scoredistill.toy import ToySR, ToyTrainer, evaluate

LOSSES: dict[str, ScoreDistillationLoss | None] = {
    "recon only": None,
    "+ SDS": SDSLoss(),
    "+ VSD": VSDLoss(),
    "+ TSM (flow)": TSMLoss(),
    "+ TSM (eps)": TSMLoss(space="epsilon"),
    "+ TSD (flow)": TSDLoss(),
    "+ TSD (eps)": TSDLoss(space="epsilon"),
    "+ TSD+DASM (flow)": TSDLoss(dasm=DASMSampler()),
    "+ TSD+DASM (eps)": TSDLoss(space="epsilon", dasm=DASMSampler()),
    "+ DMD": DMDLoss(),
}
# Losses that need the exact conditional teacher (`ToySR.conditional_teacher`): exact teacher only.
CONDITIONAL_LOSSES: dict[str, ScoreDistillationLoss] = {"+ CSD": CSDLoss()}
METRICS = ("nll", "sliced_w2", "mse")
PROG = "benchmarks.compare_losses"
TITLE = "Distillation losses on the toy SR problem (exact answer known)"


@dataclass(frozen=True)
class Budget:
    """One budget shared by every loss, so that only the regulariser differs between runs."""

    seeds: int = 5
    steps: int = 800
    batch: int = 256
    lr: float = 3e-3
    fake_lr: float = 1e-3
    fake_warmup: int = 200
    # The LQ says nothing about the lost dims, so the paired MSE's pull to their mean (0) is a
    # stable fixed point for reg/recon >~ 10 (measured): keep the regulariser dominant there.
    recon_weight: float = 0.01
    reg_weight: float = 1.0
    teacher_steps: int = 1500
    probes: int = 20
    eval_n: int = 4096


QUICK = Budget(seeds=3, steps=300, batch=128, teacher_steps=400, probes=10, eval_n=2048)


def run_one(warm: ToyTrainer, loss: ScoreDistillationLoss | None, teacher: ScoreModel,
            probe: DirectionProbe, budget: Budget,
            evaluate_fn: Callable[[nn.Module], dict[str, float]] | None = None
            ) -> dict[str, Any]:
    """Train from the warmed-up state; final metrics and probe curves (None if it diverged).

    ``evaluate_fn(generator) -> metrics`` defaults to the toy problem's :func:`evaluate`.
    """
    role: dict[str, Any] = {"teacher": teacher}
    if isinstance(loss, CSDLoss):
        # CSD distills the exact conditional teacher's classifier score (CFG scale 1, Yu et al.);
        # the probes keep measuring the unconditional teacher.
        null = torch.zeros(1, warm.problem.operator.shape[0] + 1)
        role = {"teacher": CFG(warm.problem.conditional_teacher(), 1.0, null),
                "condition": warm.problem.cond}
    tr = ToyTrainer(warm.problem, loss, recon_weight=budget.recon_weight if loss else 1.0,
                 reg_weight=budget.reg_weight, batch=budget.batch, lr=budget.lr,
                 fake_lr=budget.fake_lr, seed=warm.seed, hidden=warm.hidden, **role)
    # Same generator init (same seed), fake score and data stream for every loss.
    tr.fake.load_state_dict(warm.fake.state_dict())
    tr.fake_opt.load_state_dict(warm.fake_opt.state_dict())
    tr.g.set_state(warm.g.get_state())
    every = max(1, budget.steps // budget.probes)
    curve: list[dict[str, float]] = []
    for step in range(budget.steps + 1):
        if step % every == 0 or step == budget.steps:
            curve.append({"step": step, **probe(tr.gen, teacher)})
        if step == budget.steps:
            break
        try:
            tr.step()
        except ValueError:  # the loss's finiteness check: the generator has blown up
            return {"metrics": None, "curve": curve}
    metrics = (evaluate_fn(tr.gen) if evaluate_fn is not None
               else evaluate(warm.problem, tr.gen, n=budget.eval_n))
    finite = all(math.isfinite(v) for v in metrics.values())
    return {"metrics": metrics if finite else None, "curve": curve}


def mean_curves(curves: list[list[dict[str, float]]]) -> dict[str, list[float]]:
    """Per-key mean over seeds of probe curves (cut to the shortest: a diverged run stops)."""
    n = min(len(c) for c in curves)
    return {k: [mean_std([c[i][k] for c in curves])[0] for i in range(n)] for k in curves[0][0]}


PROBES = ("cos_hat", "cos_hq", "cos_hat_exact", "tsm_align_flow", "tsm_align_epsilon")


def per_seed(runs: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Each seed's final metrics (None where it diverged) and first/last probe values."""
    out: dict[str, list[float | None]] = {
        m: [r["metrics"][m] if r["metrics"] is not None else None for r in runs] for m in METRICS}
    for key in PROBES:
        out[f"{key}_start"] = [r["curve"][0][key] for r in runs]
        out[f"{key}_end"] = [r["curve"][-1][key] if r["metrics"] is not None else None
                             for r in runs]
    return out


def summarise(teacher: str, name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One table row: mean ± std of the final metrics over the seeds that did not diverge."""
    ok = [r for r in runs if r["metrics"] is not None]
    row: dict[str, Any] = {"teacher": teacher, "loss": name, "seeds": f"{len(ok)}/{len(runs)}",
                           "seeds_ok": len(ok), "seeds_run": len(runs), "per_seed": per_seed(runs)}
    for m in METRICS:
        mu, sd = mean_std([r["metrics"][m] for r in ok])
        row[f"{m}_mean"], row[f"{m}_std"] = mu, sd
        row[m] = f"{mu:.3g} ± {sd:.2g}"
    curves = mean_curves([r["curve"] for r in ok or runs])
    for key in PROBES:
        row[f"{key}_start"], row[f"{key}_end"] = curves[key][0], curves[key][-1]
    row["cos z_hat_t (start → end)"] = f"{curves['cos_hat'][0]:.2f} → {curves['cos_hat'][-1]:.2f}"
    row["cos z_t"] = f"{curves['cos_hq'][-1]:.2f}"
    row["teacher vs exact: z_hat_t (start → end) / z_t"] = (
        f"{curves['cos_hat_exact'][0]:.2f} → {curves['cos_hat_exact'][-1]:.2f} / "
        f"{curves['cos_hq_exact'][-1]:.2f}")
    row["TSM align flow / eps (end)"] = (f"{curves['tsm_align_flow'][-1]:+.2f} / "
                                         f"{curves['tsm_align_epsilon'][-1]:+.2f}")
    row["curves"] = curves
    return row


# Two tables, each narrower than the docs page: the scores, then the direction probes.
COLUMNS = ("teacher", "loss", "seeds", "nll", "sliced_w2", "mse")
PROBE_COLUMNS = ("teacher", "loss", "cos z_hat_t (start → end)", "cos z_t",
                 "teacher vs exact: z_hat_t (start → end) / z_t", "TSM align flow / eps (end)")
PROBE_HEADERS = {"cos z_hat_t (start → end)": "cos ẑ_t (start → end)",
                 "teacher vs exact: z_hat_t (start → end) / z_t": "vs exact: ẑ_t / z_t",
                 "TSM align flow / eps (end)": "TSM align flow / eps"}

def check(rows: list[dict[str, Any]]) -> None:
    """Assert what holds robustly, seed by seed: finite metrics, the start-of-training probes."""
    for r in rows:
        if r["loss"] in ("recon only", "+ TSD (eps)", "+ TSD+DASM (eps)"):
            assert r["seeds_ok"] == r["seeds_run"], f"diverged: {r['teacher']} {r['loss']}"
        if r["seeds_ok"]:
            assert all(math.isfinite(r[f"{m}_mean"]) for m in METRICS), r
    for r in (r for r in rows if r["teacher"] == "exact"):
        seeds = r["per_seed"]
        starts = zip(seeds["cos_hq_start"], seeds["cos_hat_start"], seeds["tsm_align_flow_start"],
                     seeds["tsm_align_epsilon_start"], strict=True)
        for seed, (hq, hat, flow, eps) in enumerate(starts):
            # Fig. 3: at the blurry start the exact teacher points to the HQ far better on z_t.
            assert hq > hat + 0.2, (r["loss"], seed, hq, hat)
            # At that start TSM in flow space pushes z_hat away from z; in epsilon space toward.
            assert flow < 0 < eps, (r["loss"], seed, flow, eps)


# The paper's questions as pairs (A, B): does TSD beat VSD, does DASM help, which space for TSM.
COMPARISONS = (("+ TSD (flow)", "+ VSD"), ("+ TSD (eps)", "+ VSD"),
               ("+ TSD (eps)", "+ TSD (flow)"), ("+ TSM (eps)", "+ TSM (flow)"),
               ("+ TSD+DASM (flow)", "+ TSD (flow)"), ("+ TSD+DASM (eps)", "+ TSD (eps)"),
               ("+ DMD", "+ VSD"))  # VSD's direction in x0 space, per-sample normalised


def paired_tests(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each COMPARISONS pair, per teacher and metric (lower is better), tested across seeds."""
    by_key = {(r["teacher"], r["loss"]): r["per_seed"] for r in rows}
    pairs = [({"teacher": t, "metric": m, "A": a, "B": b}, by_key[t, a][m], by_key[t, b][m])
             for t in ("exact", "learned") for a, b in COMPARISONS for m in METRICS]
    return compare_paired(pairs)


def notes(report: dict[str, Any]) -> str:
    """The text under the table, from the report's JSON content alone (so a re-render of a
    committed run, ``--from-json``, writes it again unchanged)."""
    budget, tests = report["budget"], report["paired_tests"]
    return (
        f"Mode `{report['mode']}`: {budget['seeds']} seeds x {budget['steps']} generator steps, "
        f"batch {budget['batch']}, Adam lr {budget['lr']}; objective {budget['recon_weight']} x "
        f"MSE + {budget['reg_weight']} x L_reg (recon only: 1 x MSE); sigma^2 weighting; runtime "
        f"{report['runtime_s']:.0f} s on one thread. NLL under the true density and sliced W2 "
        "to it: lower is more realistic; MSE to the paired HQ: fidelity (recon only is its "
        f"optimum here).\n\n" + markdown_table(report["rows"], PROBE_COLUMNS, PROBE_HEADERS)
        + f"\n\ncos: Fig. 3's cosine at t = {report['fig3_timestep']:g} between the teacher's "
        "denoising direction x0_T(x_t) - x_t and the direction z - x_t to the paired HQ, on the "
        "noisy student latent ẑ_t (z_hat_t) and on the noisy HQ latent z_t; vs exact: the same "
        "cosine with the exact teacher's direction instead of z - x_t. TSM align: cosine of the "
        "TSM descent direction with z - ẑ (negative: pushes away from the paired HQ), "
        "differences in flow / epsilon space, on the final generator. The start-of-training "
        "probe claims (cos z_t > cos ẑ_t + 0.2 for the exact teacher; TSM align flow < 0 < "
        "eps) are asserted for every seed.\n\n"
        "Paired comparisons (same seed: same generator init, data stream and fake-score "
        "warm-up; seeds where either run diverged dropped): mean difference A - B, paired "
        f"t-test, Holm-adjusted over all {len(tests)} comparisons; a verdict only where the "
        f"adjusted p < {ALPHA}, else n.s. (n, t and the unadjusted p are in the JSON), one "
        "table per teacher:"
        + "".join(f"\n\n{teacher.capitalize()} teacher:\n\n"
                  + markdown_table([t for t in tests if t["teacher"] == teacher], TEST_COLUMNS,
                                   TEST_HEADERS) for teacher in ("exact", "learned")))


def render(report: dict[str, Any], out: Path, docs_assets: bool) -> Path:
    """Write ``compare_losses.md`` and ``.png`` into ``out`` from the report's JSON content
    (and copy the plot into the docs' assets if ``docs_assets``); return the plot's path."""
    write_markdown(report, out / "compare_losses.md", notes=notes(report), columns=COLUMNS)
    budget = report["budget"]
    return options.to_docs(save_plot(report["rows"], out / "compare_losses.png",
                                     title=f"{report['mode']}: {budget['seeds']} seeds"),
                           docs_assets)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = options.parser(PROG, __doc__)
    options.add_quick(parser, "3 seeds, short runs (~1 min)")
    parser.add_argument("--steps", type=options.COUNT, help="override the generator steps")
    parser.add_argument("--seeds", type=options.COUNT, help="override the number of seeds")
    parser.add_argument("--recon-weight", type=cli.number(float, low=0),
                        help="override the reconstruction weight")
    options.add_docs_assets(parser)
    options.add_from_json(parser, "the table and plot")
    args = options.parse(parser, argv)
    options.refuse_with_from_json(args, ("quick", "steps", "seeds", "recon_weight"))
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the comparison, write the report and plot, return the rows."""
    args = parse(argv)
    if args.from_json:
        report = options.read_report(args.from_json, ("budget", "paired_tests", "runtime_s"))
        png = render(report, cli.writable_dir(args.out or args.from_json.parent, "--out"),
                     args.docs_assets)
        print(f"rewrote {png.with_suffix('.md')} and {png} from {args.from_json}")
        return report["rows"]
    budget = QUICK if args.quick else Budget()
    overrides = {"steps": args.steps, "seeds": args.seeds, "recon_weight": args.recon_weight}
    budget = replace(budget, **{k: v for k, v in overrides.items() if v is not None})
    out = options.out_dir(args)

    start = time.perf_counter()
    problem = ToySR()
    probe = DirectionProbe(problem)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for seed in range(budget.seeds):
        learned = train_learned_teacher(problem, budget.teacher_steps, seed=1000 + seed)
        warm = ToyTrainer(problem, None, batch=budget.batch, lr=budget.lr, fake_lr=budget.fake_lr,
                       seed=seed)
        warm.warm_up_fake(budget.fake_warmup)
        for teacher_name, teacher in (("exact", problem.teacher), ("learned", learned)):
            extra = CONDITIONAL_LOSSES if teacher_name == "exact" else {}
            for name, loss in {**LOSSES, **extra}.items():
                run = run_one(warm, loss, teacher, probe, budget)
                runs.setdefault((teacher_name, name), []).append(run)
        print(f"seed {seed} done after {time.perf_counter() - start:.0f} s", flush=True)
    rows = [summarise(t, n, r) for (t, n), r in runs.items()]
    runtime = time.perf_counter() - start
    check(rows)
    meta = {"mode": "quick" if args.quick else "full", "budget": asdict(budget),
            "runtime_s": runtime, "fig3_timestep": FIG3_TIMESTEP,
            "paired_tests": paired_tests(rows)}
    write_report("compare_losses", TITLE, rows, meta=meta, notes=notes({**meta, "rows": rows}),
                 columns=COLUMNS, out_dir=out,
                 command=command_line("benchmarks.compare_losses", argv))
    png = render(json.loads((out / "compare_losses.json").read_text()), out, args.docs_assets)
    print(f"runtime {runtime:.0f} s; plot {png}")
    return rows


if __name__ == "__main__":
    torch.set_num_threads(1)  # small MLPs: more threads only add noise on a shared machine
    raise SystemExit(options.entry(main, PROG)())
