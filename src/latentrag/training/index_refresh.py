"""When a trained dense retriever re-encodes the corpus: every `refresh_every` steps of its
own config (a DPR key) when it sets one, else every ``train.refresh_index_every`` steps."""

from __future__ import annotations

import warnings

from latentrag.core.interfaces import Retriever
from latentrag.core.pipeline import Pipeline


class IndexRefresh:
    """The refresh schedule of a pipeline's distinct retrievers (retriever, posterior)."""

    def __init__(self, pipeline: Pipeline, default_every: int) -> None:
        schedule: dict[int, tuple[Retriever, int]] = {}
        for retriever in (pipeline.retriever, pipeline.posterior):
            if retriever is not None and id(retriever) not in schedule:
                every = retriever.refresh_every or default_every
                schedule[id(retriever)] = (retriever, every)
        self.schedule = list(schedule.values())

    def due(self, step: int | None) -> list[Retriever]:
        """The retrievers to refresh after `step`; None: every one that ever refreshes (a
        resumed run rebuilds its indexes from the restored weights)."""
        return [
            retriever
            for retriever, every in self.schedule
            if (every > 0 if step is None else every > 0 and step % every == 0)
        ]

    def warn_if_resume_inexact(self, checkpoint_every: int) -> None:
        """A resumed run rebuilds the index from the checkpoint's weights: it matches an
        uninterrupted run only when checkpoints fall on refresh steps."""
        for retriever, refresh in self.schedule:
            if checkpoint_every and refresh and checkpoint_every % refresh:
                warnings.warn(
                    f"train.checkpoint_every={checkpoint_every} is not a multiple of the index "
                    f"refresh interval {refresh} of {type(retriever).__name__}: a resumed run "
                    "rebuilds the index from the checkpoint's weights, so it will not match an "
                    "uninterrupted run exactly",
                    stacklevel=4,
                )
