"""Discovering, instantiating and calling strategy plugins.

Discovery: every module named in the ``driftprompt`` entry-point group (built-in ones
included) and every module listed in ``plugin_modules`` is registered with a discovery plugin
manager; its ``register_strategies`` / ``register_streams`` hooks announce names. Nothing is
instantiated at this stage.

Running: only the strategies that the config names are instantiated, in config order, and
registered with a fresh run plugin manager together with the engine's defaults. An installed
plugin therefore never changes a run that did not ask for it.

``DRIFTPROMPT_BLOCK_PLUGINS`` (comma-separated entry-point or distribution names) keeps
the named plugins, built-in ones included, from being imported at all.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import inspect
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Callable, Iterable

import pluggy

from . import hookspecs
from .errors import ConfigError, DriftpromptError, PluginError
from .events import Event

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "driftprompt"
BLOCK_ENV = "DRIFTPROMPT_BLOCK_PLUGINS"


@dataclass
class Registered:
    """A strategy class or stream builder announced by a plugin module."""

    name: str
    obj: Any
    source: str
    version: str = ""

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.obj) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


@dataclass
class Registry:
    """Everything the installed plugins announce, by kind and name."""

    strategies: dict[str, Registered] = field(default_factory=dict)
    streams: dict[str, Registered] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)
    blocked: list[str] = field(default_factory=list)

    def strategy(self, name: str) -> Registered:
        return self._get(self.strategies, name, "strategy")

    def stream(self, name: str) -> Registered:
        return self._get(self.streams, name, "stream")

    def _get(self, table: dict[str, Registered], name: str, kind: str) -> Registered:
        if name in table:
            return table[name]
        broken = f" Plugins that failed to load: {', '.join(self.broken)}." if self.broken else ""
        raise PluginError(f"Unknown {kind} '{name}'; available: {', '.join(sorted(table)) or 'none'}.{broken}")


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _blocked_names() -> set[str]:
    raw = os.environ.get(BLOCK_ENV, "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def _import_local(spec: str) -> ModuleType:
    """Import a module by dotted name, or a ``.py`` file by path."""
    if spec.endswith(".py") or os.sep in spec:
        path = Path(spec).resolve()
        if not path.is_file():
            raise PluginError(f"Plugin module file '{spec}' does not exist; fix plugin_modules.")
        mod_name = f"driftprompt_local_{path.stem}_{abs(hash(str(path)))}"
        if mod_name in sys.modules:
            return sys.modules[mod_name]
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        module_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        raise PluginError(f"Plugin module '{spec}' cannot be imported ({exc}); install it or give a path to a .py file.") from exc


def discover(extra_modules: Iterable[str] = (), entry_points: bool = True) -> Registry:
    """Load every plugin module and collect what it announces.

    Args:
        extra_modules: dotted module names or ``.py`` paths (the config's ``plugin_modules``).
        entry_points: also load the ``driftprompt`` entry-point group.
    """
    registry = Registry()
    pm = _new_manager()
    sources: dict[str, tuple[str, str]] = {}
    blocked = _blocked_names()
    if entry_points:
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else ""
            if ep.name in blocked or dist in blocked:
                registry.blocked.append(f"{ep.name} ({dist})")
                continue
            key = f"{dist}:{ep.name}"
            if key in sources:
                continue  # the same distribution seen twice on sys.path
            try:
                module = ep.load()
                if pm.is_registered(module):
                    continue  # one module announced under two names
                pm.register(module, name=key)
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not break other runs
                registry.broken[f"{ep.name} ({dist})"] = f"{type(exc).__name__}: {exc}"
                log.warning("Plugin '%s' from '%s' failed to load and is skipped (%s: %s); set %s=%s to silence this.", ep.name, dist, type(exc).__name__, exc, BLOCK_ENV, ep.name)
                continue
            sources[key] = (dist, version)
    for spec in extra_modules:
        module = _import_local(spec)
        name = f"local:{spec}"
        if pm.is_registered(module):
            continue
        try:
            pm.register(module, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"Plugin module '{spec}' does not follow the plugin contract ({exc}); see docs/writing-a-plugin.md.") from exc
        sources[name] = (spec, "")

    def collect(hook: str, table: dict[str, Registered], kind: str) -> None:
        for impl in getattr(pm.hook, hook).get_hookimpls():
            source, version = sources.get(impl.plugin_name, (impl.plugin_name, ""))

            def register(name: str, obj: Any, _source: str = source, _version: str = version) -> None:
                if not isinstance(name, str) or not name:
                    raise PluginError(f"Plugin '{_source}' registered a {kind} with an invalid name {name!r}; names are non-empty strings.")
                if name in table and table[name].source != _source:
                    raise PluginError(
                        f"{kind.capitalize()} '{name}' is registered by both '{table[name].source}' and '{_source}'; "
                        f"uninstall one, or block one with {BLOCK_ENV}=<entry-point or distribution name>."
                    )
                table[name] = Registered(name, obj, _source, _version)

            impl.function(register=register)

    collect("register_strategies", registry.strategies, "strategy")
    collect("register_streams", registry.streams, "stream")
    return registry


def check_options(entry: Registered, options: dict[str, Any], kind: str = "strategy") -> None:
    """Raise a ConfigError naming the allowed options if ``options`` has a name the entry lacks."""
    try:
        sig = inspect.signature(entry.obj)
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    allowed = [n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in options:
        if key not in allowed:
            raise ConfigError(f"{kind.capitalize()} '{entry.name}' has no option '{key}'; its options are: {', '.join(allowed) or 'none'}.")


def instantiate(entry: Registered, options: dict[str, Any], kind: str = "strategy") -> Any:
    """Call a registered class or builder with config options, checking option names first."""
    check_options(entry, options, kind)
    try:
        return entry.obj(**options)
    except DriftpromptError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{kind.capitalize()} '{entry.name}' rejected its options ({exc}); fix them in the config.") from exc


# --- calling hooks during a run ----------------------------------------------------------


class Hooks:
    """The run's plugin manager, with errors that name the failing plugin and event."""

    def __init__(self, core: object, strategies: list[tuple[str, object]]) -> None:
        self.pm = _new_manager()
        self.strategies = strategies
        self.initialised = False  # the init event fires once per run, across loops
        self.pm.register(core, name="engine")
        # pluggy calls implementations last-registered-first; registering in reverse makes
        # strategies run in the order the config lists them.
        for name, plugin in reversed(strategies):
            try:
                self.pm.register(plugin, name=name)
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"Strategy '{name}' does not follow the plugin contract ({exc}); see docs/writing-a-plugin.md.") from exc
            except ValueError as exc:
                raise PluginError(f"Strategy '{name}' is listed twice or its object is registered twice ({exc}); list each strategy once.") from exc
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"A strategy implements a hook that does not exist ({exc}); check the name against docs/events.md.") from exc
        self._codes: dict[Any, str] = {}
        for caller in self.pm.hook.__dict__.values():
            if isinstance(caller, pluggy.HookCaller):
                for impl in caller.get_hookimpls():
                    code = getattr(impl.function, "__code__", None)
                    if code is not None:
                        self._codes[code] = impl.plugin_name

    def _culprit(self, tb: TracebackType | None) -> str:
        culprit = "engine"
        while tb is not None:
            name = self._codes.get(tb.tb_frame.f_code)
            if name is not None:
                culprit = name
            tb = tb.tb_next
        return culprit

    def _call(self, hook: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.pm.hook, hook)(**kwargs)
        except PluginError:
            raise
        except DriftpromptError as exc:
            # a user error detected by a plugin keeps its type (and its one sentence), named
            who = self._culprit(exc.__traceback__)
            raise type(exc)(f"Strategy '{who}' stopped at '{hook}': {exc}") from exc
        except Exception as exc:
            who = self._culprit(exc.__traceback__)
            err = PluginError(f"Strategy '{who}' failed while handling '{hook}': {type(exc).__name__}: {exc}")
            err.plugin, err.event, err.show_traceback = who, hook, True  # type: ignore[attr-defined]
            raise err from exc

    def fire(self, event: Event, state: Any) -> None:
        """Call every implementation of an event hook."""
        self._call(event.value, state=state)

    def forward(self, state: Any) -> Any:
        return self._call("forward", state=state)

    def loss_terms(self, state: Any) -> dict[str, Any]:
        terms: dict[str, Any] = {}
        for result in self._call("loss_terms", state=state):
            if not result:
                continue
            for key, value in result.items():
                if key in terms:
                    raise PluginError(f"Two strategies return a loss term named '{key}'; give each term a distinct name.")
                terms[key] = value
        return terms

    def loss_terms_by_strategy(self, state: Any) -> dict[str, str]:
        """Which strategy returns each loss term, asked of every strategy separately on ``state``.

        A diagnostic for error messages (a non-finite term is reported with its strategy), not
        called per step: each strategy's ``loss_terms`` runs again without autograd, and one
        that fails is left out rather than hide the fault being reported.
        """
        import torch

        owners: dict[str, str] = {}
        for impl in self.pm.hook.loss_terms.get_hookimpls():
            try:
                with torch.no_grad():
                    result = impl.function(state=state)
            except Exception:  # noqa: BLE001 - attribution is best effort
                continue
            for key in result or {}:
                owners.setdefault(key, impl.plugin_name)
        return owners

    def trainable_parameters(self, state: Any) -> list[dict[str, Any]]:
        """Collect parameter groups from every strategy, described and without duplicates."""
        groups: list[dict[str, Any]] = []
        seen: set[int] = set()
        for result in self._call("trainable_parameters", state=state):
            for item in result or []:
                group = dict(item) if isinstance(item, dict) else {"params": [item]}
                params = group["params"]
                params = [params] if hasattr(params, "requires_grad") else list(params)
                group["params"] = [p for p in params if id(p) not in seen and p.requires_grad]
                seen.update(id(p) for p in group["params"])
                group.setdefault("name", f"group{len(groups)}")
                group.setdefault("role", "other")
                if group["params"]:
                    groups.append(group)
        return groups


Register = Callable[[str, Any], None]
