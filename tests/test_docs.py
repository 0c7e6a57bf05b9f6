"""The documentation: runnable snippets execute, every nav page exists, the site builds strictly.

Convention: a ```python block directly preceded by a ``<!-- test -->`` line is runnable. The
runnable blocks of one page run in order in one namespace (like a notebook), so a guide can build
up its example; every other ```python block must at least compile.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MARKER = "<!-- test -->"
# Pages that must show at least one runnable example.
MUST_RUN = ("index.md", "guides/losses-in-your-loop.md")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.M | re.S)
SNIPPET = re.compile(r"""^[ \t]*-{1,}8<-{1,}[ \t]+["']([^"';]+)["']""", re.M)


def python_blocks(page: Path) -> list[tuple[int, str, bool]]:
    """``(line, code, runnable)`` for each ```python block of a markdown page."""
    text = page.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        lang = m["info"].strip().split()[0] if m["info"].strip() else ""
        if lang not in ("python", "py"):
            continue
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        indent = len(m["indent"])
        code = "\n".join(line[indent:] for line in m["body"].splitlines())
        blocks.append((text.count("\n", 0, m.start()) + 1, code, before == MARKER))
    return blocks


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def _id(page: Path) -> str:
    return str(page.relative_to(DOCS))


def test_runnable_pages_have_examples():
    for name in MUST_RUN:
        assert any(run for _, _, run in python_blocks(DOCS / name)), f"{name}: no {MARKER} block"


@pytest.mark.parametrize("page", pages(), ids=_id)
def test_python_blocks_compile(page: Path):
    for line, code, _ in python_blocks(page):
        try:
            compile(code, f"{_id(page)}:{line}", "exec")
        except SyntaxError as e:
            pytest.fail(f"{_id(page)}, block at line {line}: {e}")


@pytest.mark.parametrize("page", [p for p in pages() if any(r for *_, r in python_blocks(p))],
                         ids=_id)
def test_runnable_blocks_execute(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)  # anything a snippet writes lands in a temporary directory
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for line, code, runnable in python_blocks(page):
        if runnable:
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(code, f"{_id(page)}:{line}", "exec"), namespace)


def _config() -> dict:
    yaml = pytest.importorskip("yaml")

    class Loader(yaml.SafeLoader):  # tolerate mkdocs' !ENV / !!python tags
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)


def _nav_files(nav) -> list[str]:
    out = []
    for item in nav if isinstance(nav, list) else [nav]:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            for value in item.values():
                out.extend(_nav_files(value) if isinstance(value, list) else [value])
    return [f for f in out if not f.startswith(("http://", "https://"))]


@pytest.mark.parametrize("name", _nav_files(_config()["nav"]) if (ROOT / "mkdocs.yml").exists()
                         else [])
def test_nav_page_exists(name: str):
    if not (DOCS / name).exists():
        pytest.fail(f"docs/{name} is in the nav of mkdocs.yml but does not exist")


def _snippet_targets() -> list[str]:
    return sorted({m for p in pages() for m in SNIPPET.findall(p.read_text())})


def missing_snippets() -> list[str]:
    return [t for t in _snippet_targets() if not (ROOT / t).exists()]


def test_benchmark_results_present():
    # A page that includes a results file shows it as a table: a missing file is a broken page.
    missing = missing_snippets()
    assert not missing, ("docs include results files that do not exist (run the benchmark that "
                         "writes them): " + ", ".join(missing))


def test_site_builds_strict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            caplog: pytest.LogCaptureFixture):
    """``mkdocs build --strict`` into a temporary directory (a missing snippet file fails it)."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]'")
    pytest.importorskip("material", reason="mkdocs-material is not installed: "
                        "pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings-python is not "
                        "installed: pip install -e '.[docs]'")
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import Abort

    monkeypatch.chdir(ROOT)  # snippet and mkdocstrings paths are relative to the root
    config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path / "site"), strict=True)
    try:
        with caplog.at_level(logging.WARNING, logger="mkdocs"):
            build(config)
    except Abort as e:  # strict mode turns warnings into an Abort; the log names them
        found = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
        pytest.fail(f"mkdocs build --strict failed: {e}\n{found}")
    assert (tmp_path / "site" / "index.html").exists()
