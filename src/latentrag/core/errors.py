"""Errors a user can fix. The CLI prints them as one line and exits with status 2."""

from __future__ import annotations


class LatentragError(Exception):
    """Base class: bad input, bad config, a missing or broken component."""


class ConfigError(LatentragError):
    """A config file or override is invalid; the message names the file and key."""


class UnknownComponentError(LatentragError, KeyError):
    """No plugin registered a component of this kind and name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class PluginError(LatentragError):
    """A plugin failed to load, or two plugins claim the same component."""


class StaleIndexError(LatentragError):
    """A saved index was built for another corpus, model or settings."""
