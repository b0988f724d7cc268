"""latentrag: retrieval-augmented generation with the retrieved passage as a latent variable.

`load_run` (imported on first use, so that ``import latentrag`` stays light) gives the
trained pipeline of a run folder::

    pipeline = latentrag.load_run("runs/topk")
    pipeline.answer("What is the capital of France?")
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from latentrag.core.hookspecs import hookimpl

if TYPE_CHECKING:
    from latentrag.experiments.loading import load_run

try:
    __version__ = version("latentrag")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = ["__version__", "hookimpl", "load_run"]


def __getattr__(name: str) -> Any:
    if name == "load_run":  # torch and the components load only when it is used
        from latentrag.experiments.loading import load_run

        return load_run
    raise AttributeError(f"module 'latentrag' has no attribute {name!r}")
