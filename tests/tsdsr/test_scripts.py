"""Every recipe script runs both as a file and as a module (``--help``), and the recipe's
modules import without a circle."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ("precompute", "train", "infer", "evaluate", "run_tiny")


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("how", ["file", "module"])
def test_script_help_runs_as_a_file_and_as_a_module(script, how, tmp_path):
    target = ([str(ROOT / "examples" / "tsdsr" / f"{script}.py")] if how == "file"
              else ["-m", f"examples.tsdsr.{script}"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # a file run must find the repository by itself
    # From a folder outside the repository for the file run: nothing on sys.path helps it.
    done = subprocess.run([sys.executable, *target, "--help"], capture_output=True, text=True,
                          cwd=tmp_path if how == "file" else ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "usage:" in done.stdout
    if script == "infer":
        assert "--compile" in done.stdout and "--batch-size" in done.stdout


def imports(path: Path) -> set[str]:
    """The recipe modules ``path`` imports, at the top or inside functions."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0] + ".__init__"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:-node.level]
                base = ".".join([*parent, *([base] if base else [])])
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n.startswith("examples.tsdsr")}
    targets = {resolve(n) for n in found} - {None}
    # Importing a.b.c from outside package a.b runs a.b's __init__ (and a's) first.
    for target in list(targets):
        parts = target.removesuffix(".__init__").split(".")
        for i in range(2, len(parts)):
            outer = ".".join(parts[:i])
            if not package.startswith(outer + "."):
                targets.add(resolve(outer))
    return targets - {None}


def resolve(name: str) -> str | None:
    """The module file a dotted name refers to (a package: its __init__), if in the recipe."""
    path = ROOT.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return name
    if (path / "__init__.py").is_file():
        return f"{name}.__init__"
    return None


def test_the_recipe_has_no_import_circle():
    """No recipe module reaches itself through imports (function-level imports included)."""
    files = sorted((ROOT / "examples" / "tsdsr").rglob("*.py"))
    graph = {}
    for f in files:
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
        graph[name] = imports(f)
    def reaches(start: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node == start:
                return True
            if node not in seen:
                seen.add(node)
                todo += graph.get(node, ())
        return False

    assert len(graph) > 10
    assert [m for m in graph if reaches(m)] == []
