from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PLUGIN_PACKAGES = Path(__file__).parent / "plugin_packages"


def install_plugin(site: Path, module: str, entry_name: str, version: str = "0.1.0") -> Path:
    """Install a one-module plugin into `site` with a real dist-info and entry point."""
    shutil.copy(PLUGIN_PACKAGES / f"{module}.py", site / f"{module}.py")
    dist = site / f"{module}-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: {version}\n"
    )
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(f"""\
            [latentrag]
            {entry_name} = {module}
            """)
    )
    return site


@pytest.fixture
def one_thread():
    """Tiny tensors: threads only add synchronisation (10x slower on a loaded 2-core box)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    """A site folder on sys.path (and PYTHONPATH, for subprocesses) to install plugins into."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    return site
