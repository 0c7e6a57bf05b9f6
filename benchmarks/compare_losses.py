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
from typing import Any, Literal

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
    DecoupledDMDLoss,
    DiscriminatorHead,
    DMDLoss,
    FDistillLoss,
    GANHeadLoss,
    GANTerm,
    ScoreDistillationLoss,
    ScoreModel,
    SDSLoss,
    SiDLoss,
    SIMLoss,
    TSDLoss,
    TSMLoss,
    VSDLoss,
    cli,
)
from scoredistill.toy import ToySR, ToyTrainer, evaluate

# DMD2's GAN weight (1e-3 on SD 1.5) is on a batch mean, DMD's surrogate on an element mean:
# per element the GAN term weighs 1e-3 x 4*64*64 against DMD. The toy rows keep that balance,
# weight = GAN_BALANCE / dim (the toy SR's 4-D: 4.1; grey patches 0.26; colour 0.085).
GAN_BALANCE = 1e-3 * 4 * 64 * 64
HEAD_HIDDEN = 64  # DiscriminatorHead's default width
HEAD_WEIGHT = 1e-2  # DMD2's guidance_cls_loss_weight: the head's loss in the fake step


@dataclass(frozen=True)
class Row:
    """A loss and what its run needs beyond the shared budget.

    Attributes:
        loss: The regulariser (None: reconstruction alone).
        cfg: The exact conditional teacher ``CFG(problem.conditional_teacher(), cfg, null)``
            with ``cond = problem.cond(lq)`` (exact teacher only); None: the row's teacher.
        head: A `DiscriminatorHead` on this role's features, trained with the fake score by
            `GANHeadLoss` (weight `HEAD_WEIGHT`, own Adam at the fake score's lr, warmed up
            alone for the fake score's warm-up steps); None: no head.
        gan_balance: With a GAN term: its weight is ``gan_balance / dim``.
    """

    loss: ScoreDistillationLoss | DecoupledDMDLoss | SiDLoss | SIMLoss | None
    cfg: float | None = None
    head: Literal["fake", "teacher"] | None = None
    gan_balance: float | None = None

    def build(self, dim: int) -> ScoreDistillationLoss:
        """The loss for a problem of ``dim`` dimensions (the GAN weight depends on it)."""
        if self.gan_balance is None:
            return self.loss  # type: ignore[return-value]
        return replace(self.loss, gan=replace(self.loss.gan, weight=self.gan_balance / dim))

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
    # Issue 25's methods. SiD: the authors' EDM alpha and SiD-LSG's; SIM: pseudo-Huber c = 1 in
    # x0 units (about the size of |f_r - f_f| at the blurry start).
    "+ SiD (α=1.2)": SiDLoss(alpha=1.2),
    "+ SiD (α=1)": SiDLoss(alpha=1.0),
    "+ SIM (c=1)": SIMLoss(c=1.0),
    # DMD2: DMD plus the GAN term, its head on the fake score's features (DMD2's layout).
    "+ DMD2 (GAN)": Row(DMDLoss(gan=GANTerm()), head="fake", gan_balance=GAN_BALANCE),
}
# Losses that need the exact conditional teacher (`ToySR.conditional_teacher`): exact teacher only.
# Decoupled DMD's CA term is (w - 1)(T_cond - T_null): w = 2 (at w = 1 it is DMD's DM term alone).
CONDITIONAL_LOSSES: dict[str, Row] = {"+ CSD": Row(CSDLoss(), cfg=1.0),
                                      "+ decoupled DMD (w=2)": Row(DecoupledDMDLoss(), cfg=2.0)}
# f-distill with its head on the teacher's features (FastGen): the learned teacher only, since
# the exact teacher is a formula with no hidden layer to read. Without FastGen's extra GAN
# term, so that the rows measure h(r) alone (DMD2 (GAN) measures the GAN term).
TEACHER_FEATURE_LOSSES: dict[str, Row] = {
    f"+ f-distill ({name})": Row(FDistillLoss(divergence=div), head="teacher")
    for name, div in (("KL", "kl"), ("JS", "js"))}
# Quick mode's new rows: one per kind (implicit, f-distill with a head, GAN, decoupled).
QUICK_NEW = ("+ SiD (α=1.2)", "+ f-distill (JS)", "+ DMD2 (GAN)", "+ decoupled DMD (w=2)")
NEW = (*list(LOSSES)[list(LOSSES).index("+ SiD (α=1.2)"):], *list(CONDITIONAL_LOSSES)[1:],
       *TEACHER_FEATURE_LOSSES)
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
    all_rows: bool = True  # False: of the issue-25 rows only QUICK_NEW


QUICK = Budget(seeds=3, steps=300, batch=128, teacher_steps=400, probes=10, eval_n=2048,
               all_rows=False)


def plan(teacher: str, all_rows: bool) -> dict[str, ScoreDistillationLoss | Row | None]:
    """The rows run with ``teacher`` ("exact" or "learned"), in order."""
    extra = CONDITIONAL_LOSSES if teacher == "exact" else TEACHER_FEATURE_LOSSES
    rows = {**LOSSES, **extra}
    return {n: v for n, v in rows.items() if all_rows or n not in NEW or n in QUICK_NEW}


def run_one(warm: ToyTrainer, loss: ScoreDistillationLoss | Row | None, teacher: ScoreModel,
            probe: DirectionProbe, budget: Budget,
            evaluate_fn: Callable[[nn.Module], dict[str, float]] | None = None
            ) -> dict[str, Any]:
    """Train from the warmed-up state; final metrics and probe curves (None if it diverged),
    the seconds of the generator steps (``train_s``, with their fake/head steps), how many
    finished (``steps``) and the head's parameter count (0 without one).

    ``evaluate_fn(generator) -> metrics`` defaults to the toy problem's :func:`evaluate`.
    """
    row = loss if isinstance(loss, Row) else Row(loss)  # type: ignore[arg-type]
    reg = None if row.loss is None else row.build(warm.problem.dim)
    role: dict[str, Any] = {"teacher": teacher}
    if row.cfg is not None:
        # CSD and decoupled DMD distill the exact conditional teacher (CSD at CFG scale 1, Yu
        # et al.); the probes keep measuring the unconditional teacher.
        null = torch.zeros(1, warm.problem.operator.shape[0] + 1)
        role = {"teacher": CFG(warm.problem.conditional_teacher(), row.cfg, null),
                "condition": warm.problem.cond}
    if row.head is not None:
        torch.manual_seed(10_000 + warm.seed)  # the same head init for every head row of a seed
        head = DiscriminatorHead.for_model(warm.fake if row.head == "fake" else teacher,
                                           hidden=HEAD_HIDDEN)
        role |= {"head": head, "head_loss": GANHeadLoss(), "head_role": row.head,
                 "head_weight": HEAD_WEIGHT}
    tr = ToyTrainer(warm.problem, reg, recon_weight=budget.recon_weight if reg else 1.0,
                 reg_weight=budget.reg_weight, batch=budget.batch, lr=budget.lr,
                 fake_lr=budget.fake_lr, seed=warm.seed, hidden=warm.hidden, **role)
    # Same generator init (same seed), fake score and data stream for every loss.
    tr.fake.load_state_dict(warm.fake.state_dict())
    tr.fake_opt.load_state_dict(warm.fake_opt.state_dict())
    tr.g.set_state(warm.g.get_state())
    start = time.perf_counter()
    if tr.head is not None:
        # The head gets the fake score's warm-up (alone: the fake score is already warm), on
        # the batches training then sees, so the data stream stays every row's.
        tr.warm_up_head(budget.fake_warmup)
        tr.g.set_state(warm.g.get_state())
    head_params = 0 if tr.head is None else sum(p.numel() for p in tr.head.parameters())
    every = max(1, budget.steps // budget.probes)
    curve: list[dict[str, float]] = []
    train_s = 0.0
    for step in range(budget.steps + 1):
        if step % every == 0 or step == budget.steps:
            curve.append({"step": step, **probe(tr.gen, teacher)})
        if step == budget.steps:
            break
        tick = time.perf_counter()
        try:
            tr.step()
        except (ValueError, FloatingPointError):  # the loss's finiteness checks: blown up
            return {"metrics": None, "curve": curve, "train_s": train_s, "steps": step,
                    "head_params": head_params, "run_s": time.perf_counter() - start}
        train_s += time.perf_counter() - tick
    metrics = (evaluate_fn(tr.gen) if evaluate_fn is not None
               else evaluate(warm.problem, tr.gen, n=budget.eval_n))
    finite = all(math.isfinite(v) for v in metrics.values())
    return {"metrics": metrics if finite else None, "curve": curve, "train_s": train_s,
            "steps": budget.steps, "head_params": head_params,
            "run_s": time.perf_counter() - start}


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
    row.update(timing(runs))
    return row


def timing(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds of the row's runs (all seeds, with probes, evaluation and the head's warm-up),
    milliseconds per generator step (with its fake/head step) and the head's parameters."""
    steps = sum(r["steps"] for r in runs)
    return {"run_s": sum(r["run_s"] for r in runs),
            "ms_per_step": 1000 * sum(r["train_s"] for r in runs) / max(steps, 1),
            "head_params": runs[0]["head_params"]}


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
# The paper's questions (does TSD beat VSD, does DASM help, which space for TSM) and issue 25's
# methods against VSD and against TSD (flow), the release's TSD: two families, each Holm-adjusted
# on its own, so adding methods does not take power from the paper's questions.
FAMILIES: dict[str, tuple[tuple[str, str], ...]] = {
    "paper": (("+ TSD (flow)", "+ VSD"), ("+ TSD (eps)", "+ VSD"),
              ("+ TSD (eps)", "+ TSD (flow)"), ("+ TSM (eps)", "+ TSM (flow)"),
              ("+ TSD+DASM (flow)", "+ TSD (flow)"), ("+ TSD+DASM (eps)", "+ TSD (eps)"),
              ("+ DMD", "+ VSD")),  # VSD's direction in x0 space, per-sample normalised
    "methods": tuple((name, ref) for name in NEW for ref in ("+ VSD", "+ TSD (flow)")),
}
COMPARISONS = tuple(pair for pairs in FAMILIES.values() for pair in pairs)


def paired_tests(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each FAMILIES pair, per teacher and metric (lower is better), tested across seeds and
    Holm-adjusted within its family; pairs with a row not run (f-distill with the exact
    teacher, decoupled DMD with the learned one, quick mode's rows) are left out."""
    by_key = {(r["teacher"], r["loss"]): r["per_seed"] for r in rows}
    tests = []
    for family, comparisons in FAMILIES.items():
        pairs = [({"family": family, "teacher": t, "metric": m, "A": a, "B": b},
                  by_key[t, a][m], by_key[t, b][m])
                 for t in ("exact", "learned") for a, b in comparisons for m in METRICS
                 if (t, a) in by_key and (t, b) in by_key]
        tests += compare_paired(pairs)
    return tests


COST_COLUMNS = ("teacher", "loss", "ms / step", "s (all seeds)", "head params")


def cost_notes(rows: list[dict[str, Any]]) -> str:
    """The issue-25 rows' settings and every row's cost (runs before they were timed: "")."""
    if not any("ms_per_step" in r for r in rows):
        return ""
    cost = [{"teacher": r["teacher"], "loss": r["loss"], "ms / step": f"{r['ms_per_step']:.1f}",
             "s (all seeds)": f"{r['run_s']:.1f}", "head params": str(r["head_params"])}
            for r in rows]
    return (
        "\n\nIssue 25's rows: SiD (Zhou et al. 2024) at alpha 1.2 (EDM) and 1 (SiD-LSG); SIM "
        "(Luo et al. 2024) with the pseudo-Huber c = 1 in x0 units; DMD2 (Yin et al. 2024): DMD "
        "plus the GAN term on a sample re-noised at U{0..999}, weight "
        f"{GAN_BALANCE:.3g} / dim (DMD2's SD 1.5 weight 1e-3 on a batch mean against DMD's "
        "element mean at 4x64x64 latents), its head on the fake score's last hidden layer; "
        "f-distill (Xu et al. 2025) KL and JS: DMD weighted by h(r), r from a head on the "
        "learned teacher's last hidden layer (FastGen), without FastGen's added GAN term; not "
        "run with the exact teacher, a formula with no hidden layer for a head to read; "
        "decoupled DMD (Liu et al. 2025): the exact LQ-conditional teacher under CFG scale 2, "
        "DM and CA terms at levels of their own (exact teacher only, as CSD). Each head is a "
        f"DiscriminatorHead of width {HEAD_HIDDEN}, trained with the fake score under the same "
        f"step budget: its logistic loss (GANHeadLoss, weight {HEAD_WEIGHT:g}) in every fake "
        "step (with the fake score's features it trains the fake score too, as in DMD2), its own "
        "Adam at the fake score's lr, and the fake score's warm-up steps alone on the initial "
        "generator first.\n\nCost per row, one thread (ms per generator step with its fake "
        "and head step; seconds for all seeds with probes, evaluation and the head's warm-up; "
        "the head's parameters):\n\n" + markdown_table(cost, COST_COLUMNS))


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
        f"t-test, Holm-adjusted {holm_family(tests)}; a verdict only where the "
        f"adjusted p < {ALPHA}, else n.s. (n, t and the unadjusted p are in the JSON), one "
        "table per teacher:"
        + "".join(f"\n\n{teacher.capitalize()} teacher:\n\n"
                  + markdown_table([t for t in tests if t["teacher"] == teacher], TEST_COLUMNS,
                                   TEST_HEADERS) for teacher in ("exact", "learned"))
        + cost_notes(report["rows"]))


def holm_family(tests: list[dict[str, Any]]) -> str:
    """How the notes name the Holm families (a run before the split had one)."""
    sizes = {f: sum(t.get("family") == f for t in tests) for f in FAMILIES}
    if not any(sizes.values()):
        return f"over all {len(tests)} comparisons"
    return ("within each family: " + ", ".join(f"{sizes[f]} comparisons for {what}" for f, what
                                               in (("paper", "the paper's questions"),
                                                   ("methods", "the newer methods"))))


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
            for name, loss in plan(teacher_name, budget.all_rows).items():
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
