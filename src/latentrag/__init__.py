"""latentrag: retrieval-augmented generation with the retrieved passage as a latent variable."""

from importlib.metadata import PackageNotFoundError, version

from latentrag.core.hookspecs import hookimpl

try:
    __version__ = version("latentrag")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

__all__ = ["__version__", "hookimpl"]
