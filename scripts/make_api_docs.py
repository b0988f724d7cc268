"""Build the API reference (HTML, from the docstrings) with pdoc.

    python scripts/make_api_docs.py [OUT]     # default build/api; open OUT/index.html

Every problem pdoc reports (a name in `__all__` that does not resolve, a module that fails
to import...) is an error: tests/test_api_docs.py builds the reference on every test run.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import warnings
from pathlib import Path

#: the documented packages: the public contracts first, then everything under them
MODULES = (
    "latentrag",
    "latentrag.core",
    "latentrag.io",
    "latentrag.data",
    "latentrag.toy",
    "latentrag.evaluation",
    "latentrag.plugins",
    "latentrag.training",
    "latentrag.experiments",
    "latentrag.testing",
)
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "build" / "api"


def build(out_dir: Path, modules: tuple[str, ...] = MODULES) -> list[str]:
    """Write the reference for `modules` into `out_dir`; return pdoc's warnings (empty when
    the reference is complete)."""
    import pdoc
    import pdoc.render

    for name in modules:
        resolve_lazy_names(name)
    pdoc.render.configure(docformat="markdown", search=False, show_source=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*modules, output_directory=Path(out_dir))
    return [str(w.message) for w in caught if "pdoc" in w.filename]


def resolve_lazy_names(module_name: str) -> None:
    """Import the names of `__all__` that the module provides lazily (a module-level
    `__getattr__`, e.g. `latentrag.load_run`), so pdoc, which reads the module's namespace,
    documents them. A name that still does not resolve is left for pdoc to report."""
    module = importlib.import_module(module_name)
    for name in getattr(module, "__all__", ()):
        if name not in vars(module):
            with contextlib.suppress(AttributeError):
                setattr(module, name, getattr(module, name))


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0]) if argv else DEFAULT_OUT
    problems = build(out_dir)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print(f"wrote {out_dir / 'index.html'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
