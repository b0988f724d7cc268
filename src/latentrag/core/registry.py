"""The component registry: plugins in, (kind, name) -> factory + config model out.

Builtin plugins are listed in `latentrag/registry.toml` and loaded exactly like third-party
plugins, which are found through the entry-point group "latentrag". Each plugin is imported
on its own: one that fails is recorded with its error instead of breaking every command.
This module is also the only place that calls the pluggy hooks (a facade over `pm.hook`).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from importlib import resources
from typing import Any

import pluggy
from pydantic import BaseModel

from latentrag.core import hookspecs
from latentrag.core.errors import PluginError, UnknownComponentError

KINDS = ("retriever", "reranker", "generator", "estimator")
ENTRY_POINT_GROUP = "latentrag"


#: a factory: a callable, or "package.module:attribute" naming one (imported when first built)
Factory = Callable[..., Any] | str


@dataclass(frozen=True)
class ComponentSpec:
    """A registered component. `factory` is None for a catalogue entry not yet loaded.

    A factory given as a "module:attribute" string is imported only when the component is
    built, so that validating a config imports nothing but the plugin's light module.
    """

    kind: str
    name: str
    plugin: str
    description: str
    config_model: type[BaseModel] | None = None
    factory: Factory | None = None

    def load_factory(self) -> Callable[..., Any]:
        """The factory callable, importing its module when it was registered by name."""
        assert self.factory is not None, f"{self.kind} {self.name!r} is not loaded"
        if callable(self.factory):
            return self.factory
        module, _, attribute = self.factory.partition(":")
        try:
            return getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as exc:
            raise PluginError(
                f"{self.kind} {self.name!r} (plugin {self.plugin!r}): cannot load its factory "
                f"{self.factory!r}: {_describe(exc)}"
            ) from None

    def declared(self, attribute: str, default: Any = None) -> Any:
        """A declaration (e.g. an estimator's `requires`) from the config model, or from the
        factory when it is an already imported class; `default` otherwise."""
        for owner in (self.config_model, None if isinstance(self.factory, str) else self.factory):
            if owner is not None and hasattr(owner, attribute):
                return getattr(owner, attribute)
        return default

    def build(self, config: BaseModel | None = None, context: Any = None) -> Any:
        """Instantiate the component from a validated config (defaults when None).

        A factory that takes a second parameter receives `context` (a `BuildContext`),
        through which it builds the components nested in its config."""
        assert self.config_model is not None
        factory = self.load_factory()
        config = config if config is not None else self.config_model()
        if _takes_context(factory):
            return factory(config, context)
        return factory(config)


def _takes_context(factory: Callable[..., Any]) -> bool:
    try:
        parameters = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [
        p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(positional) >= 2 or any(p.name == "context" for p in parameters)


@dataclass
class PluginInfo:
    """A plugin as `latentrag plugins` shows it."""

    name: str
    source: str  # "builtin", "entry point" or "registered"
    module: str
    version: str = ""
    error: str = ""
    components: list[tuple[str, str]] = field(default_factory=list)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


def _package_version() -> str:
    try:
        return importlib.metadata.version("latentrag")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def builtin_manifest() -> list[dict]:
    """The `[[plugin]]` tables of registry.toml (read without importing any plugin)."""
    text = resources.files("latentrag").joinpath("registry.toml").read_text("utf-8")
    return tomllib.loads(text)["plugin"]


class Registry:
    """Loads plugins and answers (kind, name) lookups."""

    def __init__(self) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._specs: dict[tuple[str, str], ComponentSpec] = {}
        self._plugins: dict[str, PluginInfo] = {}
        self._loaded = False

    # -- loading -----------------------------------------------------------------------

    def load(self, builtins: bool = True, entry_points: bool = True) -> Registry:
        """Import every plugin once; failures are recorded, not raised."""
        if self._loaded:
            return self
        self._loaded = True
        if builtins:
            for entry in builtin_manifest():
                self._load_module(entry["name"], entry["module"], "builtin", _package_version())
        if entry_points:
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                version = ep.dist.version if ep.dist else ""
                self._load_entry_point(ep, version)
        return self

    def _load_module(self, name: str, module: str, source: str, version: str) -> None:
        info = PluginInfo(name=name, source=source, module=module, version=version)
        self._plugins[name] = info
        try:
            obj = importlib.import_module(module)
        except Exception as exc:  # a broken plugin must not break the others
            info.error = _describe(exc)
            return
        self._add_plugin(obj, info)

    def _load_entry_point(self, ep: importlib.metadata.EntryPoint, version: str) -> None:
        info = PluginInfo(name=ep.name, source="entry point", module=ep.value, version=version)
        self._plugins[ep.name] = info
        try:
            obj = ep.load()
        except Exception as exc:
            info.error = _describe(exc)
            return
        self._add_plugin(obj, info)

    def register(self, plugin: object, name: str, version: str = "") -> PluginInfo:
        """Register an in-process plugin object (tests, notebooks). Raises on any problem."""
        if name in self._plugins:
            raise PluginError(f"a plugin named {name!r} is already registered")
        info = PluginInfo(name=name, source="registered", module=repr(plugin), version=version)
        self._plugins[name] = info
        self._add_plugin(plugin, info)
        if info.error:
            del self._plugins[name]
            raise PluginError(f"plugin {name!r}: {info.error}")
        return info

    def unregister(self, name: str) -> None:
        """Remove a plugin and every component it registered."""
        info = self._plugins.pop(name)
        for key in info.components:
            self._specs.pop(key, None)
        if self._pm.get_plugin(name) is not None:
            self._pm.unregister(name=name)

    @contextmanager
    def registered(self, plugin: object, name: str) -> Iterator[PluginInfo]:
        """Register `plugin` for the duration of a `with` block."""
        info = self.register(plugin, name)
        try:
            yield info
        finally:
            self.unregister(name)

    def _add_plugin(self, obj: object, info: PluginInfo) -> None:
        try:
            self._pm.register(obj, name=info.name)
            self._pm.check_pending()
        except Exception as exc:  # misspelled hooks, bad signatures
            info.error = _describe(exc)
            if self._pm.get_plugin(info.name) is not None:
                self._pm.unregister(name=info.name)
            return
        self._call_register_components(info)

    # -- the hook facade ---------------------------------------------------------------

    def _call_register_components(self, info: PluginInfo) -> None:
        """Run this plugin's `register_components` hook, attributing what it registers."""
        for impl in self._pm.hook.register_components.get_hookimpls():
            if impl.plugin_name != info.name:
                continue
            added: list[tuple[str, str]] = []
            try:
                impl.function(register=partial(self._add_component, info.name, added))
            except Exception as exc:
                for key in added:
                    self._specs.pop(key, None)
                info.error = _describe(exc)
                return
            info.components.extend(added)

    def _add_component(
        self,
        plugin: str,
        added: list[tuple[str, str]],
        kind: str,
        name: str,
        factory: Factory,
        config_model: type[BaseModel],
        description: str = "",
    ) -> None:
        if kind not in KINDS:
            raise PluginError(f"unknown component kind {kind!r} (kinds: {', '.join(KINDS)})")
        if isinstance(factory, str) and ":" not in factory:
            raise PluginError(f"{kind} {name!r}: a factory named by a string is 'module:attr'")
        if not (isinstance(config_model, type) and issubclass(config_model, BaseModel)):
            raise PluginError(f"{kind} {name!r}: config_model must be a pydantic model class")
        key = (kind, name)
        if key in self._specs:
            other = self._specs[key].plugin
            raise PluginError(
                f"{kind} {name!r} is registered by two plugins: {other!r} and {plugin!r}"
            )
        self._specs[key] = ComponentSpec(kind, name, plugin, description, config_model, factory)
        added.append(key)

    def record_loggers(self) -> list[tuple[str, Callable[..., None]]]:
        """(plugin name, function) of each `log_record` hook implementation: the trainer
        calls each on its own, so that one failing logger can be switched off alone."""
        self.load()
        return [(i.plugin_name, i.function) for i in self._pm.hook.log_record.get_hookimpls()]

    # -- queries -----------------------------------------------------------------------

    def plugins(self) -> list[PluginInfo]:
        self.load()
        return list(self._plugins.values())

    def components(self, kind: str | None = None) -> list[ComponentSpec]:
        self.load()
        specs = sorted(self._specs.values(), key=lambda s: (KINDS.index(s.kind), s.name))
        return [s for s in specs if kind is None or s.kind == kind]

    def get(self, kind: str, name: str) -> ComponentSpec:
        """The component, or an error listing the closest known names and broken plugins."""
        self.load()
        if kind not in KINDS:
            raise UnknownComponentError(f"unknown component kind {kind!r}; kinds: {KINDS}")
        spec = self._specs.get((kind, name))
        if spec is not None:
            return spec
        raise UnknownComponentError(self._unknown_message(kind, name))

    def _unknown_message(self, kind: str, name: str) -> str:
        for entry in builtin_manifest():
            owns = any(c["kind"] == kind and c["name"] == name for c in entry["components"])
            error = self._plugins.get(entry["name"], PluginInfo("", "", "")).error
            if owns and error:
                return f"{kind} {name!r} is unavailable: plugin {entry['name']!r} failed ({error})"
        known = sorted(n for k, n in self._specs if k == kind)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        message = f"unknown {kind} {name!r}"
        if close:
            message += f"; did you mean {', '.join(repr(c) for c in close)}?"
        else:
            message += "."
        message += f" Known {kind}s: {', '.join(known) or '(none)'}"
        broken = [p.name for p in self._plugins.values() if p.error]
        if broken:
            message += f" (plugins that failed to load: {', '.join(broken)})"
        return message


def catalogue() -> tuple[list[ComponentSpec], list[PluginInfo]]:
    """Components for `latentrag components` and the plugins that failed to load.

    Builtins come from registry.toml (nothing imported); third-party plugins are loaded
    from their entry points."""
    specs = [
        ComponentSpec(c["kind"], c["name"], entry["name"], c.get("description", ""))
        for entry in builtin_manifest()
        for c in entry["components"]
    ]
    third_party = Registry().load(builtins=False)
    specs.extend(third_party.components())
    broken = [p for p in third_party.plugins() if p.error]
    return sorted(specs, key=lambda s: (KINDS.index(s.kind), s.name)), broken


_default: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _default
    if _default is None:
        _default = Registry()
    return _default.load()
