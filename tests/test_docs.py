"""The documentation: runnable snippets execute, every nav page exists, the site builds strictly.

Convention: a ```python block directly preceded by a ``<!-- test -->`` line is runnable; the
runnable blocks of one page run in order in one namespace (like a notebook), so a guide can build
up its example. ``<!-- test diffusers>=0.36 -->`` marks a runnable block that needs a newer package
than the oldest tested one: with an older one it is left out with a warning (later blocks must not
need it). Every other ```python block must be marked ``<!-- sketch -->`` (an excerpt that needs
real weights or files) and must at least compile. The README is checked like a page.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MARKER = "<!-- test -->"
SKETCH = "<!-- sketch -->"
REQUIRES = re.compile(r"<!-- test (?P<package>[\w-]+)>=(?P<version>[\d.]+) -->")
README = ROOT / "README.md"
# Pages that must show at least one runnable example.
MUST_RUN = ("index.md", "guides/losses-in-your-loop.md", "guides/adapters.md", "../README.md")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.M | re.S)
SNIPPET = re.compile(r"""^[ \t]*-{1,}8<-{1,}[ \t]+["']([^"';]+)["']""", re.M)


def section(path: Path, name: str) -> str:
    """The lines of ``path`` between its ``--8<-- [start:name]`` and ``[end:name]`` markers."""
    text = path.read_text()
    m = re.search(rf"^[^\n]*-8<-+ \[start:{name}\][^\n]*\n(?P<body>.*?)^[^\n]*-8<-+ "
                  rf"\[end:{name}\]", text, re.M | re.S)
    assert m, f"{path.name} has no snippet section {name!r}"
    return m["body"]


def page_text(page: Path) -> str:
    """``page`` with its ``--8<-- "file:section"`` includes expanded, as mkdocs renders it (a
    block shared with the README, such as the quick start, is checked on both pages)."""
    def include(m: re.Match) -> str:
        target, _, name = m[1].partition(":")
        return section(ROOT / target, name) if name else m[0]

    return SNIPPET.sub(include, page.read_text())


def code_blocks(page: Path, langs: tuple[str, ...]) -> list[tuple[int, str, str]]:
    """``(line, code, marker)`` for each fenced block in ``langs``; marker: the line before."""
    text = page_text(page)
    blocks = []
    for m in FENCE.finditer(text):
        lang = m["info"].strip().split()[0] if m["info"].strip() else ""
        if lang not in langs:
            continue
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        indent = len(m["indent"])
        code = "\n".join(line[indent:] for line in m["body"].splitlines())
        blocks.append((text.count("\n", 0, m.start()) + 1, code, before))
    return blocks


def python_blocks(page: Path) -> list[tuple[int, str, bool]]:
    """``(line, code, runnable)`` for each ```python block of a markdown page."""
    return [(line, code, runnable(mark)) for line, code, mark in
            code_blocks(page, ("python", "py"))]


def runnable(mark: str) -> bool:
    return mark == MARKER or REQUIRES.fullmatch(mark) is not None


def unmet_requirement(mark: str) -> str | None:
    """What a ``<!-- test package>=version -->`` block needs that is not installed, or None."""
    from importlib.metadata import version

    from packaging.version import Version

    m = REQUIRES.fullmatch(mark)
    if m is None or Version(have := version(m["package"])) >= Version(m["version"]):
        return None
    return f"{m['package']}>={m['version']} (installed: {have})"


def pages() -> list[Path]:
    return [*sorted(DOCS.rglob("*.md")), README]


def _id(page: Path) -> str:
    return "README.md" if page == README else str(page.relative_to(DOCS))


def test_runnable_pages_have_examples():
    for name in MUST_RUN:
        assert any(run for _, _, run in python_blocks((DOCS / name).resolve())), (
            f"{name}: no {MARKER} block")


@pytest.mark.parametrize("page", pages(), ids=_id)
def test_python_blocks_run_or_are_sketches(page: Path):
    for line, _, mark in code_blocks(page, ("python", "py")):
        assert runnable(mark) or mark == SKETCH, (
            f"{_id(page)}, python block at line {line}: mark it {MARKER} (it runs in this test) "
            f"or {SKETCH} (an excerpt that needs real weights or files)")


def _make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


@pytest.mark.parametrize("page", pages(), ids=_id)
def test_shell_blocks_name_real_commands(page: Path):
    """``make X`` is a Makefile target, ``python -m mod`` / ``python path.py`` exist here."""
    targets = _make_targets()
    for line, code, _ in code_blocks(page, ("bash", "sh", "shell", "console")):
        for target in re.findall(r"^\s*make ([\w-]+)", code, re.M):
            assert target in targets, f"{_id(page)}:{line}: no make target {target!r}"
        for module in re.findall(r"python -m ((?:examples|benchmarks)[\w.]*)", code):
            path = ROOT / module.replace(".", "/")
            assert path.with_suffix(".py").is_file() or (path / "__main__.py").is_file(), (
                f"{_id(page)}:{line}: no module {module}")
        for script in re.findall(r"(?:python|launch) ((?:examples|benchmarks)/\S+\.py)", code):
            assert (ROOT / script).is_file(), f"{_id(page)}:{line}: no script {script}"


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
    for line, code, mark in code_blocks(page, ("python", "py")):
        if not runnable(mark):
            continue
        if missing := unmet_requirement(mark):
            warnings.warn(f"{_id(page)}:{line} not run: it needs {missing}", stacklevel=1)
            continue
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
    return [t for t in _snippet_targets() if not (ROOT / t.partition(":")[0]).exists()]


def test_quick_start_is_one_source():
    """The docs' home page shows the README's quick start itself (one seeded copy, no drift)."""
    assert '--8<-- "README.md:quickstart"' in (DOCS / "index.md").read_text()
    code = section(README, "quickstart")
    assert "torch.manual_seed(0)" in code and "<!-- test -->" in code


def test_benchmark_results_present():
    # A page that includes a results file shows it as a table: a missing file is a broken page.
    missing = missing_snippets()
    assert not missing, ("docs include results files that do not exist (run the benchmark that "
                         "writes them): " + ", ".join(missing))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mkdocs build --strict`` into a temporary directory (a missing snippet file fails it),
    once for the tests that read the site."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[docs]'")
    pytest.importorskip("material", reason="mkdocs-material is not installed: "
                        "pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings-python is not "
                        "installed: pip install -e '.[docs]'")
    from mkdocs.commands.build import build
    from mkdocs.config import load_config
    from mkdocs.exceptions import Abort

    tmp_path = tmp_path_factory.mktemp("docs")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    mkdocs_log = logging.getLogger("mkdocs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # snippet, hook and mkdocstrings paths are relative to the root
        config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path / "site"),
                             strict=True)
        mkdocs_log.addHandler(handler)
        try:
            build(config)
        except Abort as e:  # strict mode turns warnings into an Abort; the log names them
            found = "\n".join(r.getMessage() for r in records)
            pytest.fail(f"mkdocs build --strict failed: {e}\n{found}")
        finally:
            mkdocs_log.removeHandler(handler)
    return tmp_path / "site"


def test_site_builds_strict(site: Path):
    assert (site / "index.html").exists()
    assert (site / "assets" / "mathjax" / "tex-chtml.js").is_file()  # served, not from a CDN
    html = "".join(p.read_text() for p in site.rglob("*.html"))
    assert "cdn.jsdelivr" not in html and "github.com/scoredistill" not in html


def test_api_reference_shows_call_signatures(site: Path):
    """The losses' ``__call__`` (their whole keyword interface) is on the API pages."""
    losses = (site / "api" / "losses" / "index.html").read_text()
    for name in ("ScoreDistillationLoss.__call__", "DiffusionLoss.__call__"):
        assert name in losses, f"{name} missing from the API reference"
    for keyword in ("teacher", "fake", "dasm_bias", "generator", "model", "noise"):
        assert re.search(rf"\b{keyword}\b", losses), keyword


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(n)), None)


def test_equations_render_offline_in_a_browser(site: Path):
    """Headless Chromium with every host unresolvable: MathJax typesets the concepts pages."""
    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium): the "
                    "offline rendering of equations is not checked")
    for page in ("concepts/score-distillation", "concepts/parametrisations"):
        html = site / page / "index.html"
        spans = html.read_text().count('class="arithmatex"')
        assert spans > 5, f"{page}: no equations to check"
        dom = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=20000",
             "--dump-dom", html.as_uri()],
            capture_output=True, text=True, timeout=120, check=True).stdout
        prose = re.sub(r"<(pre|code|script)\b.*?</\1>", "", dom, flags=re.S)
        assert "\\(" not in prose and "\\[" not in prose, f"{page}: raw LaTeX left in the page"
        assert dom.count("<mjx-container") >= spans, f"{page}: not every equation typeset"


# Measured in the page itself: each table's width against the content column, and where the
# verdict column's header ends. Written into the DOM, which --dump-dom prints.
_MEASURE = """<script>
window.addEventListener("load", () => {
  const rows = [...document.querySelectorAll("article table")].map((table) => {
    const cells = [...table.querySelectorAll("th")];
    const heads = cells.map((th) => th.textContent.trim().toLowerCase());
    const verdict = cells.find((th) => th.textContent.trim().toLowerCase().startsWith("verdict"));
    const box = table.closest("article").getBoundingClientRect();
    return {heads, width: table.scrollWidth, room: Math.round(box.width),
            verdictRight: verdict ? Math.round(verdict.getBoundingClientRect().right) : null,
            articleRight: Math.round(box.right), first: heads[0] || ""};
  });
  const out = document.createElement("pre");
  out.id = "table-measures";
  out.textContent = JSON.stringify(rows);
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.parametrize("page", ["benchmarks/compare_losses", "benchmarks/natural_patches"])
def test_comparison_tables_fit_a_1280px_window(site: Path, page: str):
    """Headless Chromium at 1280 px: no table is wider than the page's content column, and
    every paired-comparison table has its verdict column first, so it is on screen."""
    import json

    browser = _chromium()
    if browser is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium): the tables' "
                    "widths are not checked")
    html = site / page / "index.html"
    probe = html.with_name("measure.html")
    probe.write_text(html.read_text().replace("</body>", _MEASURE + "</body>"))
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1280,2000",
         "--virtual-time-budget=20000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=True).stdout
    m = re.search(r'<pre id="table-measures">(.*?)</pre>', dom, re.S)
    assert m, f"{page}: the measuring script did not run"
    tables = json.loads(m[1].replace("&quot;", '"').replace("&amp;", "&"))
    assert tables, f"{page}: no tables"
    verdicts = [t for t in tables if t["verdictRight"] is not None]
    assert verdicts, f"{page}: no table with a verdict column"
    for t in tables:
        assert t["width"] <= t["room"] + 1, (
            f"{page}: a table is {t['width']} px wide in a {t['room']} px column: {t['heads']}")
    for t in verdicts:
        assert t["first"].startswith("verdict"), f"{page}: verdict is not the first column: " \
            f"{t['heads']}"
        assert t["verdictRight"] <= t["articleRight"], f"{page}: verdict column off screen"


# Public dataclasses whose fields the API pages must show as table rows (Google-style
# ``Attributes:`` sections, rendered by mkdocstrings as tables), by page.
FIELD_TABLES = {
    "losses": ("scoredistill.losses.distill.ScoreDistillationLoss",
               "scoredistill.losses.distill.DistillOutput",
               "scoredistill.losses.diffusion.DiffusionLoss",
               "scoredistill.losses.diffusion.DiffusionOutput",
               "scoredistill.losses.decoupled.DecoupledDMDLoss",
               "scoredistill.losses.implicit.InputGradientLoss"),
    "samplers": ("scoredistill.samplers.dasm.DASMSampler",
                 "scoredistill.samplers.timesteps.UniformIndex",
                 "scoredistill.samplers.timesteps.LogitNormalIndex",
                 "scoredistill.samplers.timesteps.ModeIndex"),
    "core": ("scoredistill.schedules.RectifiedFlow",
             "scoredistill.schedules.VariancePreserving"),
    "guidance-batching": ("scoredistill.guidance.CFG",),
    "analytic-toy": ("scoredistill.analytic.GaussianMixture",
                     "scoredistill.analytic.FullGaussianMixture",
                     "scoredistill.posterior.LinearGaussianPosterior",
                     "scoredistill.posterior.PosteriorTeacher",
                     "scoredistill.toy.ToySR", "scoredistill.toy.ToyTrainer"),
    "adapters": ("scoredistill.adapters.module.ModuleScoreModel",
                 "scoredistill.adapters.sd3.SD3ScoreModel",
                 "scoredistill.adapters.flux.FluxScoreModel",
                 "scoredistill.adapters.flux2.Flux2ScoreModel",
                 "scoredistill.adapters.unet.UNetScoreModel",
                 "scoredistill.adapters.shared.AdapterRole",
                 "scoredistill.adapters.targets.LoraTargets",
                 "scoredistill.adapters.lora.LoraRoles"),
}


def _table_rows(html: str, path: str) -> set[str]:
    """The first-column names of the tables in the class ``path``'s own docstring (its methods'
    sections excluded)."""
    start = html.find(f'id="{path}"')
    assert start >= 0, f"{path} is not on the page"
    end = html.find('class="doc doc-children"', start)
    own = html[start:end if end >= 0 else None]
    names = set()
    for table in re.findall(r"<table>.*?</table>", own, re.S):
        for cell in re.findall(r"<tr[^>]*>\s*<td[^>]*>(.*?)</td>", table, re.S):
            names.add(re.sub(r"<[^>]+>|\s", "", cell))
    return names


@pytest.mark.parametrize("page", sorted(FIELD_TABLES))
def test_dataclass_fields_render_as_table_rows(site: Path, page: str):
    """Issue 23, item 6: every constructor field of these dataclasses is a row of a table in its
    class's documentation, not run-on prose."""
    import dataclasses
    import importlib

    html = (site / "api" / page / "index.html").read_text()
    for path in FIELD_TABLES[page]:
        module, name = path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        missing = sorted(fields - _table_rows(html, path))
        assert not missing, (f"api/{page}: {name}'s fields {missing} are not table rows: give "
                             "them an `Attributes:` entry in its docstring")
