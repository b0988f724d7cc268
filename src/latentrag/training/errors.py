"""The error a training run stops with."""

from __future__ import annotations

from latentrag.core.errors import LatentragError


class TrainingError(LatentragError):
    """Training cannot go on: a non-finite loss or gradient, nothing to train, or a
    checkpoint that does not fit the pipeline. The message is one line naming the step or
    the path."""
