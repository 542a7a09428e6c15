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
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Callable, Iterable

import pluggy
import pydantic

from . import hookspecs
from .errors import ConfigError, DriftpromptError, PluginError, RunInterrupted, condense
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
    static: dict[str, Any] | None = None  # a built-in's metadata from builtin_plugins.json (obj is None)

    @property
    def summary(self) -> str:
        if self.static is not None:
            return str(self.static.get("summary", ""))
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
    """Import a module by dotted name, or a ``.py`` file by path.

    A module that does not compile or raises while importing is a :class:`PluginError` that
    names the file, the line and the cause, never a traceback.
    """
    if spec.endswith(".py") or os.sep in spec:
        path = Path(spec).resolve()
        if not path.is_file():
            raise PluginError(f"Plugin module file '{spec}' does not exist; fix plugin_modules.")
        mod_name = f"driftprompt_local_{path.stem}_{abs(hash(str(path)))}"
        if mod_name in sys.modules:
            return sys.modules[mod_name]
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        if module_spec is None or module_spec.loader is None:
            raise PluginError(f"Plugin module file '{spec}' cannot be imported as Python; give a .py file.")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException as exc:
            sys.modules.pop(mod_name, None)
            if isinstance(exc, (KeyboardInterrupt, RunInterrupted)):  # Ctrl-C or SIGTERM while importing
                raise
            raise PluginError(_import_failure(spec, exc)) from exc
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        raise PluginError(f"Plugin module '{spec}' cannot be imported ({exc}); install it or give a path to a .py file.") from exc
    except Exception as exc:
        raise PluginError(_import_failure(spec, exc)) from exc


def _import_failure(spec: str, exc: BaseException) -> str:
    """One sentence for a plugin module that failed to compile or to import."""
    if isinstance(exc, SyntaxError):
        return f"Plugin module '{spec}' has a syntax error at line {exc.lineno} ({exc.msg}); fix the file or remove it from plugin_modules."
    line = ""
    tb = exc.__traceback__
    while tb is not None:  # the deepest frame inside the plugin file
        if os.path.basename(tb.tb_frame.f_code.co_filename) == os.path.basename(spec):
            line = f" at line {tb.tb_lineno}"
        tb = tb.tb_next
    return f"Plugin module '{spec}' failed while importing{line} ({type(exc).__name__}: {condense(str(exc))}); fix the module or remove it from plugin_modules."


def discover(extra_modules: Iterable[str] = (), entry_points: bool = True, skip_entry_points: Iterable[str] = ()) -> Registry:
    """Load every plugin module and collect what it announces.

    Args:
        extra_modules: dotted module names or ``.py`` paths (the config's ``plugin_modules``).
        entry_points: also load the ``driftprompt`` entry-point group.
        skip_entry_points: entry-point names not to load (:func:`catalog` describes them).
    """
    skip = set(skip_entry_points)
    registry = Registry()
    pm = _new_manager()
    sources: dict[str, tuple[str, str]] = {}
    blocked = _blocked_names()
    if entry_points:
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else ""
            if ep.name in skip and dist == "driftprompt":
                continue
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


BUILTIN_METADATA = Path(__file__).with_name("builtin_plugins.json")


def _builtin_metadata() -> dict[str, Any]:
    """The built-in plugins' names, summaries and options, generated by ``engine/reference.py``."""
    import json

    try:
        return json.loads(BUILTIN_METADATA.read_text())
    except (OSError, ValueError):
        return {}


def catalog(extra_modules: Iterable[str] = ()) -> Registry:
    """What :func:`discover` finds, for listing only: built-in entry points are described from
    ``builtin_plugins.json`` without importing them (nor torch); third-party entry points and
    ``extra_modules`` are imported as in :func:`discover`. Entries from the metadata have
    ``obj=None`` and their options in ``static``.

    A built-in entry point that the metadata does not describe (a stale file) is imported.
    """
    meta = _builtin_metadata()
    registry = Registry()
    static_eps: set[str] = set()
    blocked = _blocked_names()
    own = [ep for ep in md.entry_points(group=ENTRY_POINT_GROUP) if ep.dist is not None and ep.dist.name == "driftprompt"]
    described = {kind: {n: e for n, e in meta.get(kind, {}).items() if e.get("entry_point")} for kind in ("strategies", "streams")}
    known_eps = {e["entry_point"]: e["module"] for table in described.values() for e in table.values()}
    for ep in own:
        if ep.name in blocked or "driftprompt" in blocked or known_eps.get(ep.name) != ep.value:
            continue
        static_eps.add(ep.name)
        version = ep.dist.version if ep.dist is not None else ""
        for kind in ("strategies", "streams"):
            for name, entry in described[kind].items():
                if entry["entry_point"] == ep.name:
                    getattr(registry, kind)[name] = Registered(name, None, "driftprompt", version, static=entry)
    if not static_eps:
        return discover(extra_modules)
    loaded = discover(extra_modules, skip_entry_points=static_eps)
    for kind in ("strategies", "streams"):
        for name, entry in getattr(loaded, kind).items():
            getattr(registry, kind).setdefault(name, entry)
    registry.broken.update(loaded.broken)
    registry.blocked.extend(loaded.blocked)
    return registry


def _option_types(obj: Any) -> dict[str, Any]:
    """Resolved type annotations of a class constructor's or builder's parameters."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        return typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - some annotation names a type imported only for checkers
        pass
    module = sys.modules.get(getattr(target, "__module__", "") or "")
    namespace = dict(vars(module)) if module is not None else {}
    hints: dict[str, Any] = {}
    for name, ann in getattr(target, "__annotations__", {}).items():
        try:
            hints[name] = eval(ann, namespace) if isinstance(ann, str) else ann  # noqa: S307 - the plugin's own annotation
        except Exception:  # noqa: BLE001 - left to the constructor
            continue
    return hints


def check_options(entry: Registered, options: dict[str, Any], kind: str = "strategy") -> dict[str, Any]:
    """Check option names and types against the constructor's signature; returns the options
    as validated.

    Names: an option the entry lacks is a ConfigError listing the allowed ones. Types: each
    option is validated against its type annotation with a pydantic ``TypeAdapter`` (lax
    mode, so 4.0 for an ``int`` becomes 4, but 2.5 is refused), naming the option.
    """
    try:
        sig = inspect.signature(entry.obj)
    except (TypeError, ValueError):
        return dict(options)
    allowed = [n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        for key in options:
            if key not in allowed:
                raise ConfigError(f"{kind.capitalize()} '{entry.name}' has no option '{key}'; its options are: {', '.join(allowed) or 'none'}.")
    hints = _option_types(entry.obj)
    out = dict(options)
    for key, value in options.items():
        hint = hints.get(key)
        if hint is None or hint is Any:
            continue
        try:
            adapter = pydantic.TypeAdapter(hint, config=pydantic.ConfigDict(arbitrary_types_allowed=True))
        except Exception:  # noqa: BLE001 - a type pydantic cannot describe: the constructor checks it
            continue
        try:
            out[key] = adapter.validate_python(value)
        except pydantic.ValidationError as exc:
            err = exc.errors()[0]
            msg = err["msg"][0].lower() + err["msg"][1:]
            where = "".join(f"[{p}]" for p in err["loc"])
            raise ConfigError(f"{kind.capitalize()} '{entry.name}' option '{key}'{where} expects {_type_name(hint)}: {msg} (got {value!r}); fix it in the config.") from None
    return out


def _type_name(hint: Any) -> str:
    text = getattr(hint, "__name__", None) if isinstance(hint, type) else None
    return text or str(hint).replace("typing.", "")


def instantiate(entry: Registered, options: dict[str, Any], kind: str = "strategy") -> Any:
    """Call a registered class or builder with config options, checking option names first."""
    options = check_options(entry, options, kind)
    try:
        return entry.obj(**options)
    except DriftpromptError:
        raise
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"{kind.capitalize()} '{entry.name}' rejected its options ({type(exc).__name__}: {condense(str(exc))}); fix them in the config.") from exc
    except OSError:
        raise  # a missing or unreadable file: the caller names the path
    except Exception as exc:
        raise PluginError(f"{kind.capitalize()} '{entry.name}' from '{entry.source}' failed while starting ({type(exc).__name__}: {condense(str(exc))}); check its options or report it to its author.") from exc


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

    @staticmethod
    def _attributed(exc: Exception, hook: str, who: str) -> Exception:
        """The error to raise for ``exc``, raised by ``who`` (a strategy, or "engine") in ``hook``."""
        if isinstance(exc, PluginError) or (isinstance(exc, DriftpromptError) and who == "engine"):
            return exc  # already one sentence; the engine's own needs no attribution
        if isinstance(exc, DriftpromptError):
            # a user error detected by a plugin keeps its type (and its one sentence), named
            return type(exc)(f"Strategy '{who}' stopped at '{hook}': {exc}")
        subject = "The engine" if who == "engine" else f"Strategy '{who}'"
        err = PluginError(f"{subject} failed while handling '{hook}': {type(exc).__name__}: {condense(str(exc))}")
        err.plugin, err.event = who, hook  # type: ignore[attr-defined]
        return err

    def _call(self, hook: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.pm.hook, hook)(**kwargs)
        except Exception as exc:
            err = self._attributed(exc, hook, self._culprit(exc.__traceback__))
            if err is exc:
                raise
            raise err from exc

    def fire(self, event: Event, state: Any) -> None:
        """Call every implementation of an event hook."""
        self._call(event.value, state=state)

    def forward(self, state: Any) -> Any:
        return self._call("forward", state=state)

    def _each(self, hook: str, state: Any) -> list[tuple[str, Any]]:
        """``(plugin name, result)`` of every implementation of a collecting hook, in call order.

        Calls the implementations one by one, as pluggy would (last registered first, after
        ``tryfirst``/``trylast`` ordering), so that a result can be attributed to its strategy.
        """
        caller = getattr(self.pm.hook, hook)
        impls = caller.get_hookimpls()
        if any(getattr(i, "wrapper", False) or getattr(i, "hookwrapper", False) for i in impls):
            return [("?", r) for r in self._call(hook, state=state)]
        out = []
        for impl in reversed(impls):
            try:
                result = impl.function(**{name: state for name in impl.argnames})  # as pluggy passes them
            except Exception as exc:
                err = self._attributed(exc, hook, impl.plugin_name)
                if err is exc:
                    raise
                raise err from exc
            if result is not None:
                out.append((impl.plugin_name, result))
        return out

    def loss_terms(self, state: Any) -> dict[str, Any]:
        terms: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for who, result in self._each("loss_terms", state):
            if not result:
                continue
            for key, value in result.items():
                if key in terms:
                    raise PluginError(f"Strategies '{owner[key]}' and '{who}' both return the loss term '{key}'; they conflict (both train the classifier?): keep one of them, or give each term a distinct name.")
                terms[key] = value
                owner[key] = who
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
        """Collect parameter groups from every strategy, described and without duplicates.

        Two strategies that both declare the same parameter with the role ``head`` both own
        the classifier: that is a conflict, named here rather than silently merged.
        """
        groups: list[dict[str, Any]] = []
        seen: dict[int, tuple[str, str]] = {}
        for who, result in self._each("trainable_parameters", state):
            for item in result or []:
                group = dict(item) if isinstance(item, dict) else {"params": [item]}
                params = group["params"]
                params = [params] if hasattr(params, "requires_grad") else list(params)
                role = group.get("role", "other")
                for p in params:
                    first = seen.get(id(p))
                    if first is not None and first[0] != who and role == "head" and first[1] == "head":
                        raise PluginError(f"Strategies '{first[0]}' and '{who}' both train the head; they conflict: keep one classifier strategy in 'strategies'.")
                group["params"] = [p for p in params if id(p) not in seen and p.requires_grad]
                seen.update((id(p), (who, role)) for p in group["params"])
                group.setdefault("name", f"group{len(groups)}")
                group.setdefault("role", "other")
                group.setdefault("strategy", who)  # who declared it: the optimizer log names it
                if group["params"]:
                    groups.append(group)
        return groups


Register = Callable[[str, Any], None]
