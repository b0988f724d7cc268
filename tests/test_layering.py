"""The package's floors: each package imports only those below it (issue: layout and contracts).

core (the contracts) < io, toy < data < evaluation < plugins < training < experiments < cli.
`latentrag.testing` is for tests and plugin authors: nothing in the library imports it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import latentrag

ROOT = Path(latentrag.__file__).parent

#: package -> the latentrag packages it may import (itself included)
ALLOWED = {
    "core": {"core"},
    "io": {"io"},
    "toy": {"core", "toy"},
    "data": {"core", "io", "toy", "data"},
    "evaluation": {"core", "data", "evaluation"},
    "plugins": {"core", "io", "toy", "data", "evaluation", "plugins"},
    "training": {"core", "io", "data", "evaluation", "training"},
    "experiments": {"core", "io", "toy", "data", "evaluation", "training", "experiments"},
    "testing": {
        "core",
        "io",
        "toy",
        "data",
        "evaluation",
        "plugins",
        "training",
        "experiments",
        "testing",
    },
}
#: what core may import besides the standard library and itself
CORE_THIRD_PARTY = {"pydantic", "pluggy", "torch", "tomli"}


def modules(root: Path = ROOT) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def package_of(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).parts
    return parts[0] if len(parts) > 1 else parts[0][:-3]


def imported(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text("utf-8"))
    here = ["latentrag", *path.relative_to(root).with_suffix("").parts][:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
    return found


def latentrag_package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "latentrag" or len(parts) < 2:
        return None
    return parts[1]


def floor_violations(path: Path, root: Path = ROOT) -> list[str]:
    """Imports of `path` that reach a latentrag package above its own floor."""
    package = package_of(path, root)
    allowed = ALLOWED.get(package)
    if allowed is None:  # cli.py and __init__.py: the top floor
        return []
    problems = []
    for line, module in imported(path, root):
        target = latentrag_package(module)
        is_package = target and ((root / target).is_dir() or (root / f"{target}.py").exists())
        if is_package and target not in allowed:
            problems.append(f"{path.relative_to(root)}:{line}: {package} imports {module}")
    return problems


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_stay_on_their_floor(path):
    assert floor_violations(path) == []


@pytest.mark.parametrize(
    "path", [p for p in modules() if package_of(p) == "core"], ids=lambda p: p.name
)
def test_core_imports_only_the_standard_library_pydantic_pluggy_and_torch(path):
    for line, module in imported(path):
        top = module.split(".")[0]
        if top in ("", "latentrag", "__future__") or top in sys.stdlib_module_names:
            continue
        assert top in CORE_THIRD_PARTY, f"core/{path.name}:{line}: imports {module}"


def test_nothing_in_the_library_imports_the_testing_helpers():
    offenders = [
        f"{p.relative_to(ROOT)}:{line}"
        for p in modules()
        if package_of(p) != "testing"
        for line, module in imported(p)
        if module == "latentrag.testing" or module.startswith("latentrag.testing.")
    ]
    assert offenders == []


def test_the_checker_sees_an_import_running_back_up(tmp_path):
    root = tmp_path / "latentrag"
    for package in ("core", "training", "plugins"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    bad = root / "core" / "bad.py"
    bad.write_text("import os\nfrom ..training import loop\nfrom latentrag.plugins import x\n")
    good = root / "training" / "good.py"
    good.write_text("from ..core import types\nfrom latentrag.core.config import resolve\n")
    assert floor_violations(bad, root) == [
        "core/bad.py:2: core imports latentrag.training",
        "core/bad.py:2: core imports latentrag.training.loop",
        "core/bad.py:3: core imports latentrag.plugins",
        "core/bad.py:3: core imports latentrag.plugins.x",
    ]
    assert floor_violations(good, root) == []
