"""mkdocs hook: copy MathJax 3 into the built site, so equations render with no network.

The files come from the ``django-static-mathjax`` package (the ``docs`` extra), which ships
MathJax's own release files: ``es5/tex-chtml.js`` (TeX input, CommonHTML output) and the woff
fonts it loads relative to itself. Nothing is fetched at build or view time.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from mkdocs.exceptions import PluginError

TARGET = Path("assets") / "mathjax"
FILES = ("es5/tex-chtml.js", "es5/output/chtml/fonts/woff-v2", "LICENSE")


def mathjax_dir() -> Path:
    """The installed MathJax release folder (``.../mathjax/static/mathjax``)."""
    spec = importlib.util.find_spec("mathjax")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        folder = Path(root) / "static" / "mathjax"
        if (folder / FILES[0]).is_file():
            return folder
    raise PluginError("MathJax not found: the docs render equations with the MathJax files of "
                      "the django-static-mathjax package; pip install -e '.[docs]'")


def on_post_build(config, **kwargs) -> None:
    source, target = mathjax_dir(), Path(config["site_dir"]) / TARGET
    for name in FILES:
        # es5/tex-chtml.js loads its fonts from output/chtml/fonts/ beside itself.
        dest = target / name.removeprefix("es5/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if (source / name).is_dir():
            shutil.copytree(source / name, dest, dirs_exist_ok=True)
        else:
            shutil.copy2(source / name, dest)
