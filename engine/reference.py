"""Reference documentation generated from the code, so that it cannot drift from it.

``python -m driftprompt.engine.reference docs/reference`` writes:

* ``config.md``: every config key, from the pydantic JSON schema of :class:`RunConfig`;
* ``strategies/<name>.md``: one page per built-in strategy (options, types, defaults, the
  docstring), and ``strategies/README.md`` listing them;
* ``streams.md``: the built-in streams and their options;
* ``api.md``: the Python API a plugin author uses in tests, from the docstrings;

and, inside the package, ``builtin_plugins.json``: the same option tables for the built-in
strategies and streams, which ``driftprompt plugins`` reads instead of importing the
plugin modules (and torch with them). ``tests/test_reference_docs.py`` regenerates all of it
and fails when a committed page differs.

Option descriptions come from the ``Args:`` section of the class (or builder) docstring,
Google style: ``name: text`` with continuation lines indented further.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

REGENERATE = "python -m driftprompt.engine.reference docs/reference"
BUILTIN_JSON = Path(__file__).with_name("builtin_plugins.json")
BUILTIN_DIST = "driftprompt"


# --- docstrings and signatures ------------------------------------------------------------


def parse_args_section(doc: str) -> dict[str, str]:
    """``{option: description}`` from the ``Args:`` section of a Google-style docstring."""
    out: dict[str, str] = {}
    lines = inspect.cleandoc(doc or "").splitlines()
    inside, indent, current = False, None, None
    for line in lines:
        stripped = line.strip()
        if not inside:
            inside = stripped in ("Args:", "Arguments:")
            continue
        if not stripped:
            current = None
            continue
        width = len(line) - len(line.lstrip())
        if indent is None:
            indent = width
        if width < indent:
            break  # the next section (Returns:, Raises:, prose)
        match = re.match(r"^\**(\w+)(?:\s*\([^)]*\))?:\s*(.*)$", stripped)
        if width == indent and match:
            current = match.group(1)
            out[current] = match.group(2).strip()
        elif current is not None:
            out[current] = f"{out[current]} {stripped}".strip()
    return out


def _summary(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _annotation(param: inspect.Parameter) -> str:
    ann = param.annotation
    if ann is inspect.Parameter.empty:
        return ""
    if isinstance(ann, str):
        return ann
    return getattr(ann, "__name__", None) if isinstance(ann, type) else str(ann).replace("typing.", "")


def _default(param: inspect.Parameter) -> str:
    if param.default is inspect.Parameter.empty:
        return "required"
    text = repr(param.default)
    if " at 0x" in text:  # an object without a stable repr
        return type(param.default).__name__
    return text


def options_of(obj: Any) -> list[dict[str, str]]:
    """Name, type, default and description of every constructor option of a class or builder."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    docs = parse_args_section(inspect.getdoc(obj) or "")
    if inspect.isclass(obj):
        docs = {**parse_args_section(inspect.getdoc(obj.__init__) or ""), **docs}
    rows = []
    for name, param in sig.parameters.items():
        if param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            continue
        rows.append({"name": name, "type": _annotation(param), "default": _default(param), "description": docs.get(name, "")})
    return rows


def lr_override(options: list[dict[str, str]]) -> str | None:
    """A sentence when a strategy sets its own learning rate instead of ``train.optimizer.lr``."""
    for row in options:
        if row["name"] == "lr" and row["default"] not in ("None", "required"):
            return (
                f"This strategy overrides `train.optimizer.lr`: by default its parameter groups train at their own learning rate "
                f"(option `lr`, default {row['default']}; see its description). Set `lr: null` to use `train.optimizer.lr`. "
                "The effective learning rate of every parameter group is logged at the start of each experience and recorded "
                "in `metrics.jsonl` as an `optimizer` record."
            )
    return None


# --- the built-in plugins -----------------------------------------------------------------


def builtin_registry() -> Any:
    """The strategies and streams that the ``driftprompt`` distribution itself registers."""
    from .plugins import discover

    registry = discover()
    keep = {}
    for kind in ("strategies", "streams"):
        table = getattr(registry, kind)
        keep[kind] = {name: entry for name, entry in sorted(table.items()) if entry.source == BUILTIN_DIST}
    return keep


def builtin_metadata() -> dict[str, Any]:
    """What ``driftprompt plugins`` shows of the built-in strategies and streams, without importing them."""
    from importlib import metadata as md

    from .plugins import ENTRY_POINT_GROUP

    modules = {ep.value: ep.name for ep in md.entry_points(group=ENTRY_POINT_GROUP) if ep.dist is not None and ep.dist.name == BUILTIN_DIST}
    out: dict[str, Any] = {"regenerate": REGENERATE, "strategies": {}, "streams": {}}
    for kind, table in builtin_registry().items():
        for name, entry in table.items():
            module = getattr(entry.obj, "__module__", "")
            out[kind][name] = {
                "entry_point": modules.get(module, ""),
                "module": module,
                "summary": _summary(entry.obj),
                "options": options_of(entry.obj),
            }
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def options_table(options: list[dict[str, str]]) -> str:
    if not options:
        return "No options.\n"
    rows = ["| option | type | default | description |", "| --- | --- | --- | --- |"]
    rows += [f"| `{o['name']}` | {_cell(o['type'])} | `{_cell(o['default'])}` | {_cell(o['description'])} |" for o in options]
    return "\n".join(rows) + "\n"


def strategy_reference(name: str) -> str:
    """The markdown page of one built-in (or installed) strategy: summary, options, docstring."""
    from .plugins import discover

    entry = discover().strategy(name)
    obj = entry.obj
    options = options_of(obj)
    module = getattr(obj, "__module__", "")
    parts = [f"# `{name}`\n", f"{_summary(obj)}\n", f"Class `{module}.{getattr(obj, '__qualname__', name)}`, registered by `{entry.source}`.\n"]
    note = lr_override(options)
    if note:
        parts.append(f"**Learning rate.** {note}\n")
    parts.append("## Options\n")
    parts.append("Give them under the strategy's name in the config: `strategies: [{name: " + name + ", <option>: <value>}]`.\n")
    parts.append(options_table(options))
    class_doc = inspect.getdoc(obj) or ""
    module_doc = inspect.getdoc(sys.modules.get(module)) if module in sys.modules else ""
    if class_doc:
        parts.append("## Docstring\n")
        parts.append("```text\n" + class_doc.strip() + "\n```\n")
    if module_doc:
        parts.append("## Module\n")
        parts.append("```text\n" + module_doc.strip() + "\n```\n")
    parts.append(f"<!-- generated by `{REGENERATE}`; do not edit by hand -->\n")
    return "\n".join(parts)


def streams_reference() -> str:
    parts = ["# Built-in streams\n", "Set them with `stream: {name: <name>, options: {...}}`. See [../streams.md](../streams.md) for the scenarios.\n"]
    for name, entry in builtin_registry()["streams"].items():
        parts.append(f"## `{name}`\n")
        parts.append(f"{_summary(entry.obj)}\n")
        parts.append(options_table(options_of(entry.obj)))
    parts.append(f"<!-- generated by `{REGENERATE}`; do not edit by hand -->\n")
    return "\n".join(parts)


# --- the config ---------------------------------------------------------------------------


def config_schema() -> dict[str, Any]:
    """The JSON schema of :class:`~driftprompt.engine.config.RunConfig` (``driftprompt config --schema``)."""
    from .config import RunConfig

    return RunConfig.model_json_schema()


def _schema_type(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        return prop["$ref"].rsplit("/", 1)[-1]
    if "enum" in prop:
        return " \\| ".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    if "anyOf" in prop:
        return " \\| ".join(_schema_type(p) for p in prop["anyOf"])
    kind = prop.get("type", "any")
    if kind == "array":
        if "prefixItems" in prop:
            return "[" + ", ".join(_schema_type(p) for p in prop["prefixItems"]) + "]"
        return f"list of {_schema_type(prop.get('items', {}))}"
    if kind == "object":
        return "mapping"
    bounds = []
    for key, sign in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in prop:
            bounds.append(f"{sign} {prop[key]}")
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


def _schema_default(prop: dict[str, Any], ref: str | None, required: bool, built: Any) -> str:
    if "default" in prop:
        return f"`{json.dumps(prop['default'])}`"
    if required:
        return "required"
    if ref and isinstance(built, dict):
        return "see below"
    if built is not _MISSING:  # a default_factory: the schema omits it, a default config holds it
        return f"`{json.dumps(built)}`"
    return "see below" if ref else ""


_MISSING = object()


def _default_at(defaults: Any, dotted: str) -> Any:
    node = defaults
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def config_reference(schema: dict[str, Any] | None = None) -> str:
    """The config reference page, rendered from :func:`config_schema`."""
    from .config import RunConfig

    schema = schema or config_schema()
    defaults = RunConfig().model_dump(mode="json")
    defs = schema.get("$defs", {})
    parts = [
        "# Config reference\n",
        "Every key of a run config, generated from the pydantic schema (`driftprompt config --schema` prints it as JSON). "
        "An unknown key, a wrong type or a value out of range stops a run before anything is built.\n",
    ]
    queue: list[tuple[str, dict[str, Any]]] = [("", schema)]
    seen: set[str] = set()
    while queue:
        prefix, model = queue.pop(0)
        title = f"`{prefix}`" if prefix else "Top level"
        parts.append(f"## {title}\n")
        if model.get("description"):
            parts.append(inspect.cleandoc(model["description"]).replace("\n", " ") + "\n")
        rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        for key, prop in model.get("properties", {}).items():
            ref = None
            refs = [prop.get("$ref")] + [p.get("$ref") for p in prop.get("anyOf", [])] + [prop.get("items", {}).get("$ref")]
            for candidate in refs:
                if candidate:
                    ref = candidate.rsplit("/", 1)[-1]
                    break
            dotted = f"{prefix}.{key}" if prefix else key
            rows.append(f"| `{dotted}` | {_schema_type(prop)} | {_cell(_schema_default(prop, ref, key in model.get('required', []), _default_at(defaults, dotted)))} | {_cell(prop.get('description', ''))} |")
            if ref and ref in defs and dotted not in seen:
                seen.add(dotted)
                queue.append((dotted + ("[]" if prop.get("type") == "array" else ""), defs[ref]))
        parts.append("\n".join(rows) + "\n")
    parts.append(f"<!-- generated by `{REGENERATE}`; do not edit by hand -->\n")
    return "\n".join(parts)


# --- the Python API -----------------------------------------------------------------------

API = (
    ("driftprompt.engine.config", "load_config"),
    ("driftprompt.engine.run", "build"),
    ("driftprompt.engine.run", "Run"),
    ("driftprompt.engine.run", "Run.fit"),
    ("driftprompt.engine.run", "Run.adapt"),
    ("driftprompt.engine.adapter", "OnlineAdapter"),
    ("driftprompt.engine.adapter", "OnlineAdapter.predict"),
)


def _resolve(module: str, qualname: str) -> Any:
    import importlib

    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def api_reference() -> str:
    """The page of the Python API a plugin author uses in tests, from the docstrings."""
    parts = [
        "# Python API for tests and notebooks\n",
        "What a plugin author needs to run a strategy from Python: read a config, build a run, train it, "
        "look at its strategies, or adapt a deployed classifier online. `Run.strategies` is the list of "
        "`(name, plugin)` pairs in config order, so a test can reach its strategy's state after `fit()`.\n",
        "```python\nfrom driftprompt.engine.config import load_config\nfrom driftprompt.engine.run import build\n\n"
        "config = load_config(\"configs/demo.yaml\", [\"strategies=[ncm]\", \"train.epochs=1\"])\n"
        "with build(config, run_dir=None) as run:   # None: in memory, no files\n"
        "    summary = run.fit()\n    name, plugin = run.strategies[0]\n```\n",
    ]
    for module, qualname in API:
        try:
            obj = _resolve(module, qualname)
        except AttributeError:
            continue  # OnlineAdapter.predict may be named otherwise: the names test says which
        try:
            sig = str(inspect.signature(obj))
        except (TypeError, ValueError):
            sig = ""
        kind = "class" if inspect.isclass(obj) else "def"
        parts.append(f"## `{module}.{qualname}`\n")
        parts.append(f"```python\n{kind} {qualname.rsplit('.', 1)[-1]}{sig}\n```\n")
        doc = inspect.getdoc(obj) or ""
        if doc:
            parts.append("```text\n" + doc.strip() + "\n```\n")
    parts.append(f"<!-- generated by `{REGENERATE}`; do not edit by hand -->\n")
    return "\n".join(parts)


# --- writing ------------------------------------------------------------------------------


def reference_pages() -> dict[str, str]:
    """``{relative path: content}`` of every generated page."""
    pages = {"config.md": config_reference(), "api.md": api_reference(), "streams.md": streams_reference()}
    names = list(builtin_registry()["strategies"])
    index = ["# Built-in strategies\n", "One page per strategy, generated from its class: options, types, defaults and docstring.\n"]
    index += [f"- [`{name}`]({name}.md): {_summary(discover_entry(name))}" for name in names]
    pages["strategies/README.md"] = "\n".join(index) + "\n\n" + f"<!-- generated by `{REGENERATE}`; do not edit by hand -->\n"
    for name in names:
        pages[f"strategies/{name}.md"] = strategy_reference(name)
    return pages


def discover_entry(name: str) -> Any:
    return builtin_registry()["strategies"][name].obj


def builtin_json() -> str:
    return json.dumps(builtin_metadata(), indent=1, sort_keys=True) + "\n"


def write_reference(out_dir: str | Path) -> list[Path]:
    """Write every reference page under ``out_dir`` and the package's ``builtin_plugins.json``.

    Pages of strategies that no longer exist are removed. Returns the files written.
    """
    out = Path(out_dir)
    written = []
    pages = reference_pages()
    strategies_dir = out / "strategies"
    if strategies_dir.is_dir():
        for old in strategies_dir.glob("*.md"):
            if f"strategies/{old.name}" not in pages:
                old.unlink()
    for rel, text in pages.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    BUILTIN_JSON.write_text(builtin_json())
    written.append(BUILTIN_JSON)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = args[0] if args else "docs/reference"
    for path in write_reference(out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
