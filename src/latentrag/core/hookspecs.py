"""The hooks a latentrag plugin can implement (pluggy project "latentrag").

A plugin is any module or object with functions decorated by `latentrag.hookimpl`.
Builtin plugins are listed in `latentrag/registry.toml`; third-party plugins announce
themselves through the entry-point group "latentrag".
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pluggy

PROJECT = "latentrag"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_components(register: Callable[..., None]) -> None:
    """Register the components this plugin provides.

    Call ``register(kind, name, factory, config_model, description)`` once per component:

    - ``kind``: "retriever", "reranker", "generator" or "estimator";
    - ``name``: the name a config uses (``[retriever] name = "bm25"``), unique per kind;
    - ``factory``: called as ``factory(config)`` with a validated ``config_model`` instance,
      returns the component. A factory with a second parameter is called as
      ``factory(config, context)``: ``context.build(config.some_section)`` builds a component
      nested in its config (see `latentrag.core.config.ComponentRef`). The factory may be
      given as a ``"package.module:attribute"`` string, imported only when the component is
      first built: keep the hook's module light (pydantic only) and put torch code there;
      then ``config validate`` never imports it;
    - ``config_model``: a pydantic model (``extra="forbid"``) for the component's section,
      without the ``name`` key;
    - ``description``: one line shown by ``latentrag components``.
    """


@hookspec
def log_record(record: dict[str, Any], run_dir: Path) -> None:
    """Receive one record of a training run's log, as it is written to ``metrics.jsonl``.

    Called once per line of ``run_dir/metrics.jsonl``, in order, right after the line is
    written (only by the process that writes the file: rank 0 under torchrun):

    - a step's record: ``step``, ``loss``, ``lr`` (role -> learning rate), ``grad_norm``
      (absent on a skipped step), ``skipped``, ``skipped_steps``, ``wall_s`` and the
      estimator's diagnostics;
    - an evaluation's record: ``{"step": s, "eval": {metric: value}}``.

    ``record`` is the line as read back from the file (a fresh dict each call; non-finite
    numbers are None), so a logger sees exactly what ``metrics.jsonl`` holds; ``run_dir``
    tells runs apart (a sweep trains several in one process). A resumed run sends only the
    records it writes after its checkpoint. Use it to forward the log to W&B, MLflow or
    a dashboard. An exception is reported once as a warning and the plugin receives no
    further records of that run: a failing logger never stops training.
    """
