"""The command line: fast startup, one-line errors with exit code 2, plugins listing."""

from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner
from conftest import install_plugin

from latentrag.cli import main
from latentrag.core.registry import builtin_manifest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "latentrag.cli", *args], capture_output=True, text=True
    )


def test_help_and_components_do_not_import_torch():
    code = (
        "import sys; from click.testing import CliRunner; from latentrag.cli import main;"
        "r = CliRunner().invoke(main, ['components']); assert r.exit_code == 0, r.output;"
        "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_components_lists_every_builtin_component():
    result = CliRunner().invoke(main, ["components"])
    assert result.exit_code == 0
    for entry in builtin_manifest():
        for component in entry["components"]:
            assert f"{component['kind']}  " in result.output
            assert f" {component['name']} " in result.output


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and "latentrag, version" in result.output


def test_config_validate_ok(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text('[retriever]\nname = "bm25"\n')
    result = run("config", "validate", str(path))
    assert result.returncode == 0, result.stderr
    assert "ok (retriever=bm25)" in result.stdout


def bad_config(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return run("config", "validate", str(path))


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_typo_in_a_key(tmp_path):
    result = bad_config(tmp_path, '[retriever]\nname = "bm25"\nkl = 1.2\n')
    assert_one_line_error(result, "bad.toml", "retriever.kl", "unknown key")


def test_unknown_component_name_suggests_the_closest(tmp_path):
    result = bad_config(tmp_path, '[retriever]\nname = "bm25"\n[estimator]\nname = "top-k"\n')
    assert_one_line_error(result, "estimator.name", "unknown estimator 'top-k'", "'topk'")


def test_wrong_type(tmp_path):
    result = bad_config(tmp_path, '[retriever]\nname = "bm25"\n[train]\nsteps = "many"\n')
    assert_one_line_error(result, "train.steps", "valid integer", "'many'")


def test_missing_config_file(tmp_path):
    result = run("config", "validate", str(tmp_path / "nope.toml"))
    assert_one_line_error(result, "nope.toml", "no such file")


def test_config_show_fills_defaults(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[retriever]\nname = "bm25"\n')
    result = run("config", "show", str(path), "--set", "train.steps=7")
    assert result.returncode == 0, result.stderr
    assert "k1 = 1.5" in result.stdout and "steps = 7" in result.stdout


def test_broken_plugin_is_listed_and_other_commands_work(plugin_site, tmp_path):
    install_plugin(plugin_site, "latentrag_broken", "broken")
    listing = run("plugins")
    assert listing.returncode == 0, listing.stderr
    line = next(x for x in listing.stdout.splitlines() if x.startswith("broken"))
    assert "FAILED: ImportError: cannot import name 'Frobnicator'" in line
    assert run("components").returncode == 0
    path = tmp_path / "ok.toml"
    path.write_text('[retriever]\nname = "bm25"\n')
    assert run("config", "validate", str(path)).returncode == 0


def test_stale_index_is_refused_and_index_build_replaces_it(tmp_path):
    config = tmp_path / "bm25.toml"
    config.write_text(
        f'[data]\nsource = "toy"\n[retriever]\nname = "bm25"\nindex_dir = "{tmp_path}/ix"\n'
    )
    assert run("index", "build", str(config)).returncode == 0
    slice_data = ("--set", "data.source=squad-slice")
    assert_one_line_error(run("evaluate", str(config), *slice_data), "stale index", "index build")
    rebuilt = run("index", "build", str(config), *slice_data)
    assert rebuilt.returncode == 0 and "indexed 300 passages" in rebuilt.stdout
    evaluated = run("evaluate", str(config), *slice_data)
    assert evaluated.returncode == 0 and "| bm25 " in evaluated.stdout
