"""The built wheel: complete metadata and files, and the README's example runs from it alone.

The wheel is built from a copy of the package's sources (no stale ``build/`` can leak in),
installed with ``--no-deps`` into a fresh venv that sees this venv's packages (torch...) through a
``.pth`` line, and the README's runnable blocks are executed there, outside the checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from tests.test_docs import README, python_blocks

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "scoredistill")


def _run(*cmd: str | Path, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__}: building the wheel (license-files, "
                    "PEP 639) needs setuptools>=77")
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        copy(ROOT / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                         if (ROOT / name).is_dir() else {}))
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", out, src)
    (found,) = out.glob("scoredistill-*.whl")
    return found


def test_wheel_is_complete(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    assert "scoredistill/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names)
    meta_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = Parser().parsestr(zipfile.ZipFile(wheel).read(meta_name).decode())
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("Project-URL") and "Typing :: Typed" in meta.get_all("Classifier")
    requires = meta.get_all("Requires-Dist")
    assert not [r for r in requires if "==" in r.split(";")[0]], requires  # lower bounds only
    assert any(r.startswith("torch>=") for r in requires)
    readme = meta.get_payload()
    # Read on a package index: make targets only where it says they need a clone.
    assert "make demo" in readme and "From a clone of the repository" in readme
    assert readme.index("make demo") > readme.index("From a clone of the repository")


def test_readme_example_runs_from_the_installed_wheel(wheel: Path, tmp_path: Path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"
                     ).stdout.strip())
    # This venv's packages (torch, ...) after the fresh venv's own: the wheel's copy wins.
    (site / "test-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, wheel)
    code = "\n\n".join(code for _, code, run in python_blocks(README) if run)
    assert code, "README.md has no runnable example"
    check = textwrap.dedent(f"""
        import scoredistill
        from pathlib import Path
        assert Path(scoredistill.__file__).is_relative_to({str(site)!r}), scoredistill.__file__
    """)
    _run(python, "-I", "-c", check + code, cwd=tmp_path)
