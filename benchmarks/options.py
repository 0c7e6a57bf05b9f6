"""The command-line options the benchmarks share, inside the project's error policy
(:mod:`scoredistill.cli`): a bad value, a CUDA device on a machine without one, an unwritable
``--out`` or a flag that ``--quick`` would override is one line, ``prog: error: ...``, exit 2,
before any work starts.

    parser = options.parser(PROG, __doc__)
    options.add_timing(parser, warmup=1, repeats=3)
    args = options.parse(parser, argv)
    options.refuse_with_quick(args, {"warmup": "--warmup", "repeats": "--repeats"},
                              "1 warm-up and 3 timed calls")

    if __name__ == "__main__":
        raise SystemExit(options.entry(main, PROG)())
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.report import results_dir
from scoredistill import cli

DOCS_ASSETS = Path(__file__).resolve().parents[1] / "docs" / "assets" / "benchmarks"
"""Where the docs' pages find the benchmarks' plots."""
COUNT = cli.number(int, low=1)
"""steps, seeds, repeats, images, batch sizes: an integer >= 1."""
NON_NEGATIVE = cli.number(int, low=0)
"""warm-up calls, seeds, margins: an integer >= 0."""
POSITIVE = cli.number(float, low=0, low_open=True)
"""tolerances, budgets, rates: a finite number > 0."""


def multiple_of(step: int, what: str = "") -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``step`` and a multiple of it (image sides the VAE
    and the patch size divide); ``what`` says why in the message."""
    count = cli.number(int, low=step)

    def convert(text: str) -> int:
        value = int(count(text))
        if value % step:
            raise argparse.ArgumentTypeError(
                f"must be a multiple of {step}{f' ({what})' if what else ''}, got {text}")
        return value

    convert.__name__ = "int"
    return convert


def parser(prog: str, doc: str | None) -> cli.ArgumentParser:
    """A parser named ``prog`` (the module, as errors name it) described by ``doc``'s first
    line."""
    return cli.ArgumentParser(prog=prog, description=(doc or "").splitlines()[0])


def add_quick(parser: argparse.ArgumentParser, help: str) -> None:
    """``--quick`` (a smoke run) and ``--out`` (default: the committed results; --quick: a
    temporary folder)."""
    parser.add_argument("--quick", action="store_true", help=help)
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: benchmarks/results; --quick: a temp folder)")


def add_device(parser: argparse.ArgumentParser, default: str) -> None:
    """``--device``: a device PyTorch can use here (``cuda`` without a GPU is refused)."""
    parser.add_argument("--device", type=cli.device, default=default,
                        help=f"torch device (default {default})")


def add_timing(parser: argparse.ArgumentParser, warmup: int, repeats: int) -> None:
    """``--warmup`` untimed calls (>= 0) and ``--repeats`` timed calls (>= 1)."""
    parser.add_argument("--warmup", type=NON_NEGATIVE, default=warmup,
                        help=f"untimed calls first (default {warmup})")
    parser.add_argument("--repeats", type=COUNT, default=repeats,
                        help=f"timed calls, median reported (default {repeats})")


_UNSET = object()


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, plus ``args.given``: the destinations of the flags the user
    gave (a flag given with its default value counts), so that nothing the user chose is
    overridden without a word."""
    actions = [a for a in parser._actions
               if a.dest != argparse.SUPPRESS and a.default != argparse.SUPPRESS]
    # argparse fills in a default only where the namespace has no value yet: a sentinel in
    # every slot tells given flags from defaults.
    args = parser.parse_args(argv, argparse.Namespace(**{a.dest: _UNSET for a in actions}))
    args.given = {a.dest for a in actions if getattr(args, a.dest) is not _UNSET}
    for a in actions:
        if getattr(args, a.dest) is _UNSET:
            setattr(args, a.dest, a.default)
    return args


def refuse_with_quick(args: argparse.Namespace, flags: Mapping[str, str], quick_sets: str
                      ) -> None:
    """A :class:`~scoredistill.cli.UserError` if ``--quick`` is given with any of ``flags``
    (destination -> flag) that it fixes to ``quick_sets``."""
    if not args.quick:
        return
    clash = [flag for dest, flag in flags.items() if dest in args.given]
    if clash:
        named = " and ".join(clash)
        raise cli.UserError(f"{named} {'conflicts' if len(clash) == 1 else 'conflict'} with "
                            f"--quick, which runs {quick_sets}: drop --quick or {named}")


def refuse_with_from_json(args: argparse.Namespace, run_flags: Sequence[str]) -> None:
    """A :class:`~scoredistill.cli.UserError` if ``--from-json`` (a re-render, nothing
    measured) is given with flags that only shape a measuring run (destinations)."""
    clash = [f"--{d.replace('_', '-')}" for d in run_flags if d in args.given]
    if args.from_json is not None and clash:
        raise cli.UserError(f"{' and '.join(clash)} cannot be used with --from-json, which "
                            "measures nothing and rewrites the table and plot of the JSON's "
                            "run: drop one")


def read_report(path: Path, keys: Sequence[str]) -> dict[str, Any]:
    """The content of a results JSON for ``--from-json``, which must hold ``keys``; else a
    :class:`~scoredistill.cli.UserError` naming the file."""
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise cli.UserError(f"--from-json {path}: not a readable JSON file ({exc}): give a "
                            "results JSON the benchmark wrote") from None
    wanted = ("title", "machine", "rows", *keys)
    missing = [k for k in wanted if k not in report] if isinstance(report, dict) else wanted
    if missing:
        raise cli.UserError(f"--from-json {path} is not this benchmark's results JSON (it has no "
                            f"{', '.join(missing)}): give the JSON the benchmark wrote")
    return report


def out_dir(args: argparse.Namespace) -> Path:
    """Where the run writes (:func:`benchmarks.report.results_dir`), checked writable first."""
    return cli.writable_dir(results_dir(args.out, args.quick), "--out")


def entry(main: Callable[[Sequence[str] | None], Any], prog: str) -> cli.Main:
    """The ``python -m`` entry of a benchmark whose ``main(argv)`` returns its results: exit 0
    after it, 2 with one line on a :class:`~scoredistill.cli.UserError`."""

    @cli.entry_point(prog)
    def run(argv: Sequence[str] | None = None) -> int:
        main(argv)
        return cli.EXIT_OK

    return run


def add_docs_assets(parser: argparse.ArgumentParser) -> None:
    """``--no-docs-assets``: keep the plots out of the docs (see :func:`to_docs`)."""
    parser.add_argument("--no-docs-assets", dest="docs_assets", action="store_false",
                        help=f"do not copy the plots to {DOCS_ASSETS}")


def add_from_json(parser: argparse.ArgumentParser, what: str) -> None:
    """``--from-json JSON``: re-render ``what`` of a finished run from its results JSON."""
    parser.add_argument("--from-json", type=cli.existing_file, metavar="JSON",
                        help=f"measure nothing: rewrite {what} of a finished run from its JSON "
                             "(e.g. the committed results), into --out (default: the JSON's "
                             "folder)")


def to_docs(png: Path, docs_assets: bool) -> Path:
    """Copy ``png`` into the docs' assets if ``docs_assets``; return ``png``."""
    if docs_assets:
        DOCS_ASSETS.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, DOCS_ASSETS / png.name)
    return png
