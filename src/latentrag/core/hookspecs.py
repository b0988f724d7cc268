"""The hooks a latentrag plugin can implement (pluggy project "latentrag").

A plugin is any module or object with functions decorated by `latentrag.hookimpl`.
Builtin plugins are listed in `latentrag/registry.toml`; third-party plugins announce
themselves through the entry-point group "latentrag".
"""

from __future__ import annotations

from collections.abc import Callable

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
