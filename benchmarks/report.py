"""One writer for every benchmark: a JSON file and a markdown table, naming the machine."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict[str, Any]:
    """What the numbers were measured on: device, CPU, torch/diffusers/peft versions, date."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "device": gpu or f"CPU ({os.cpu_count()} threads visible, {torch.get_num_threads()} used)",
        "cpu": cpu,
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "peft": _version("peft"),
        "cuda": torch.version.cuda if gpu else None,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be read by everyone
    os.replace(tmp, path)


def write_json(path: Path, report: dict[str, Any]) -> None:
    """``report`` as indented JSON at ``path``, atomically."""
    _atomic_write(path, json.dumps(report, indent=2, default=str))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
                   headers: Mapping[str, str] | None = None) -> str:
    """A GitHub-flavoured markdown table of ``rows`` (dicts sharing keys); ``headers`` gives
    shorter titles to some columns (key -> title)."""
    cols = list(columns or rows[0].keys())
    titles = [(headers or {}).get(c, c) for c in cols]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces a report: ``python -m <module>`` and its arguments (``argv``,
    default the process's), ``--out`` dropped: it moves the files, not the numbers."""
    args, kept = list(sys.argv[1:] if argv is None else argv), []
    while args:
        arg = args.pop(0)
        if arg == "--out":
            args = args[1:]
        elif not arg.startswith("--out="):
            kept.append(arg)
    return shlex.join(["python", "-m", module, *kept])


def results_dir(out: Path | None, quick: bool) -> Path:
    """Where a run writes: ``out`` if given, else the committed results for a full run and a new
    temporary folder for a quick one (a smoke run never overwrites the committed tables)."""
    if out is not None:
        return out
    return Path(tempfile.mkdtemp(prefix="scoredistill-bench-")) if quick else RESULTS


def write_report(name: str, title: str, rows: Sequence[dict[str, Any]], *,
                 meta: dict[str, Any] | None = None, notes: str = "",
                 columns: Sequence[str] | None = None, out_dir: Path = RESULTS,
                 command: str | None = None, echo: bool = True) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` into ``out_dir``; print (if ``echo``) and return
    the table path. ``command`` (see :func:`command_line`) is recorded and shown."""
    report = {"title": title, "machine": machine(), "command": command, **(meta or {}),
              "rows": list(rows)}
    write_json(out_dir / f"{name}.json", report)
    return write_markdown(report, out_dir / f"{name}.md", notes=notes, columns=columns,
                          echo=echo)


def write_markdown(report: dict[str, Any], path: Path, *, notes: str = "",
                   columns: Sequence[str] | None = None, echo: bool = False) -> Path:
    """Write the markdown of ``report`` (a results JSON's content: title, machine, command,
    rows) to ``path``: the machine line, the rows' table, then ``notes``. A re-render from a
    committed JSON (``--from-json``) calls it alone, so the numbers stay the measured ones."""
    m, command = report["machine"], report.get("command")
    header = (f"### {report['title']}\n\nMeasured on {m['device']} ({m['cpu']}), torch "
              f"{m['torch']}, diffusers {m.get('diffusers') or 'n/a'}, {m['date']}"
              + (f", by `{command}`" if command else "") + ".\n\n")
    table = (header + markdown_table(report["rows"], columns)
             + ("\n\n" + notes if notes else "") + "\n")
    _atomic_write(path, table)
    if echo:
        print(table)
    return path


def write_pending(name: str, title: str, rows: Sequence[dict[str, Any]], *, awaiting: str,
                  fill: str, columns: Sequence[str] | None = None,
                  out_dir: Path = RESULTS) -> Path:
    """Write ``<name>.json`` / ``<name>.md`` for a table none of whose rows is measured yet: the
    planned rows, each marked "awaiting ``awaiting``", and ``fill``, the command that measures
    them. The docs can include it now; the measuring run overwrites both files."""
    rows = [{**r, "note": f"awaiting {awaiting}"} for r in rows]
    _atomic_write(out_dir / f"{name}.json",
                  json.dumps({"title": title, "pending": True, "awaiting": awaiting,
                              "fill": fill, "rows": rows}, indent=2))
    text = (f"### {title}\n\n**Not measured yet: awaiting {awaiting}** (`{fill}` measures every "
            "row). No number in this table was measured.\n\n" + markdown_table(rows, columns)
            + "\n")
    _atomic_write(out_dir / f"{name}.md", text)
    return out_dir / f"{name}.md"
