"""Export a finished continual run as one safetensors file, and serve it again.

``driftprompt export RUN_DIR --out model.safetensors`` (:func:`export_run`) writes what a
deployed classifier needs and nothing that could run code when read:

* tensors (safetensors): the head (``head.weight``, ``head.bias``) and every tensor of every
  strategy's ``state_dict()``, flattened with dotted keys (``strategies.l2p.params.prompts``);
* the safetensors header's ``metadata`` (strings only), each value a JSON document:
  ``format`` and ``format_version``; ``config`` (the resolved config the run trained with,
  hence the strategies and their options, the backbone's name, weights source and seed);
  ``backbone`` (the structural fingerprint the checkpoint records, plus the SHA-256 of the
  backbone's weights); ``class_names``; ``classes`` (those a prediction may take, as the run's
  final evaluation scored them); ``preprocessing`` (input size, mean and std, and the
  evaluation resize and interpolation); ``strategies`` (names, options, and the non-tensor
  part of each state, tensors replaced by ``{"$tensor": key}``); ``run`` (name and results).

:func:`load_export` reads it back (format and version checked) into an :class:`Export`;
``OnlineAdapter.from_export`` and ``OnlineAdapter.from_run`` rebuild the backbone as the
config says (by name, from a local file, or, for ``weights: random``, from the run's seed),
refuse one whose weights differ from the trained one's, rebuild the strategies through the
plugin registry and load their saved states. Each trained strategy joins the adapter wrapped
by :func:`deployed`, which passes on only its inference hooks (``init``, ``before_forward``,
``forward``, ``after_forward``) and shows them the evaluation phase (``state.phase ==
"eval"``) while they run: predictions are the run's evaluation forward, L2P's key matching
included, and test-time strategies added on top adapt without training the deployed ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .errors import CheckpointError, DriftpromptError, condense, naming
from .hookspecs import hookimpl

log = logging.getLogger(__name__)

EXPORT_FORMAT = "driftprompt-export"
EXPORT_VERSION = 1
#: Hooks of a trained strategy that take part in a prediction; the others (training, loss,
#: experience boundaries) ended with the run.
INFERENCE_HOOKS = ("before_forward", "forward", "after_forward")
_MARKER = "driftprompt_impl"  # the attribute pluggy's HookimplMarker("driftprompt") sets


# --- nested states <-> tensors + JSON -----------------------------------------------------


def _flatten(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON with every tensor moved into ``tensors`` under a dotted key.

    Dicts with string keys stay objects; other dicts become ``{"$items": [[k, v], ...]}``,
    tuples ``{"$tuple": [...]}``, dtypes ``{"$dtype": "float32"}`` and tensors
    ``{"$tensor": key}``, so that :func:`_unflatten` gives back the same types.
    """
    if isinstance(obj, torch.Tensor):
        name, n = key, 1
        while name in tensors:
            n += 1
            name = f"{key}#{n}"
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"$tensor": name}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.dtype):
        return {"$dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in obj):
            return {k: _flatten(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        return {"$items": [[_flatten(k, f"{key}.<key>", tensors), _flatten(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (tuple, torch.Size)):
        return {"$tuple": [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    raise CheckpointError(f"The state at '{key}' holds a {type(obj).__name__}, which an export cannot store; a strategy's state_dict() must return tensors, numbers, strings, lists and dicts.")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Undo :func:`_flatten`."""
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"$tensor"}:
            if obj["$tensor"] not in tensors:
                raise CheckpointError(f"The export lacks the tensor '{obj['$tensor']}' its metadata names; it is damaged, so export the run again.")
            return tensors[obj["$tensor"]]
        if set(obj) == {"$tuple"}:
            return tuple(_unflatten(v, tensors) for v in obj["$tuple"])
        if set(obj) == {"$items"}:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["$items"]}
        if set(obj) == {"$dtype"}:
            return getattr(torch, obj["$dtype"])
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    return obj


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over a module's ``state_dict()``: names, dtypes, shapes and bytes, in name order.

    Two backbones with the same digest compute the same function; the non-persistent
    normalisation buffers are left out (the export records them as preprocessing).
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- the export ---------------------------------------------------------------------------


@dataclass
class Export:
    """A trained classifier as :func:`export_run` writes it (or as read straight from a run).

    Attributes:
        config: the run's resolved :class:`~driftprompt.engine.config.RunConfig`.
        head: the head's ``state_dict()`` (``None`` for a run without a head).
        states: each strategy's saved ``state_dict()``, by name.
        backbone: ``fingerprint`` (as checkpoints record it) and ``weights_sha256``.
        class_names: one name per class of the head.
        classes: the classes a prediction may take (the run's final evaluation's).
        preprocessing: input size, mean, std, interpolation, evaluation resize.
        run: the run's name and results.
        source: where it was read from.
    """

    config: Any
    head: dict[str, torch.Tensor] | None
    states: dict[str, Any]
    backbone: dict[str, Any]
    class_names: list[str]
    classes: list[int]
    preprocessing: dict[str, Any]
    run: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def num_classes(self) -> int:
        if self.head is not None and "weight" in self.head:
            return int(self.head["weight"].shape[0])
        return len(self.class_names)

    # --- the backbone ---------------------------------------------------------------------

    def build_backbone(self, weights: str | Path | None = None) -> nn.Module:
        """The trained backbone, built as the config says and checked against the export.

        Args:
            weights: another source of the same weights (a local .safetensors/.pth file, or
                ``"pretrained"``) when the config's is not available here.
        """
        from .run import build_backbone

        config = self.config
        if weights is not None:
            config = config.model_copy(update={"backbone": config.backbone.model_copy(update={"weights": str(weights)})})
        if config.backbone.weights == "random":
            # the run seeded every generator right before building it: the same draw here
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                backbone = build_backbone(config)
        else:
            backbone = build_backbone(config)
        self.check_backbone(backbone)
        return backbone

    def check_backbone(self, backbone: nn.Module) -> None:
        """Refuse a backbone other than the one the run trained on (structure, then weights)."""
        where = f"'{self.source}'" if self.source else "the export"
        fingerprint = getattr(backbone, "fingerprint", None)
        if fingerprint != self.backbone["fingerprint"]:
            raise CheckpointError(f"The backbone {fingerprint} is not the one {where} was trained on ({self.backbone['fingerprint']}); build the run's backbone ({self._recipe()}).")
        digest = weights_digest(backbone)
        if digest != self.backbone["weights_sha256"]:
            raise CheckpointError(
                f"The weights of backbone '{fingerprint.get('name')}' differ from those {where} was trained with (SHA-256 {digest[:12]}, expected {self.backbone['weights_sha256'][:12]}); "
                f"load the run's own weights ({self._recipe()})."
            )
        mean = [round(float(v), 6) for v in getattr(backbone, "mean", torch.zeros(3)).flatten()]
        std = [round(float(v), 6) for v in getattr(backbone, "std", torch.ones(3)).flatten()]
        want = self.preprocessing
        if "mean" in want and (mean != want["mean"] or std != want["std"]):
            raise CheckpointError(f"The backbone normalises with mean {mean} and std {std}, but {where} was trained with mean {want['mean']} and std {want['std']}; set backbone.normalize as the run did ({self.config.backbone.normalize!r}).")

    def _recipe(self) -> str:
        b = self.config.backbone
        seed = f", seed {self.config.seed}" if b.weights == "random" else ""
        return f"name '{b.name}', weights '{b.weights}'{seed}, kwargs {dict(b.kwargs)}"

    def eval_view(self, backbone: nn.Module) -> None:
        """Make ``backbone.preprocess`` give the run's evaluation view (resize, interpolation)."""
        if hasattr(backbone, "view"):
            interpolation = self.preprocessing.get("eval_interpolation", "model")
            backbone.view = (self.preprocessing.get("eval_resize"), None if interpolation == "model" else interpolation)

    def build_head(self, embed_dim: int) -> nn.Linear | None:
        if self.head is None:
            return None
        weight = self.head["weight"]
        head = nn.Linear(int(weight.shape[1]), int(weight.shape[0]), bias="bias" in self.head)
        if int(weight.shape[1]) != int(embed_dim):
            raise CheckpointError(f"The exported head reads {weight.shape[1]} features but the backbone gives {embed_dim}; load the export with the run's backbone.")
        head.load_state_dict(self.head)
        return head

    # --- the strategies -------------------------------------------------------------------

    def deployed_strategies(self, registry: Any = None) -> list[tuple[str, Any]]:
        """The trained strategies that take part in a prediction, rebuilt from the config,
        each wrapped by :func:`deployed` with its saved state."""
        from .plugins import discover
        from .run import build_strategies

        registry = registry or discover(self.config.plugin_modules)
        out = []
        for name, plugin in build_strategies(self.config, registry):
            if not any(_marker(plugin, hook) is not None for hook in INFERENCE_HOOKS):
                continue  # a training-only strategy (finetune, pgp's projections): its work is in the head
            out.append((name, deployed(name, plugin, self.states.get(name), self.head)))
        return out


def _marker(plugin: Any, hook: str) -> dict[str, Any] | None:
    return getattr(getattr(plugin, hook, None), _MARKER, None)


@contextlib.contextmanager
def _evaluation(state: Any) -> Iterator[None]:
    """Show a trained strategy the phase it was evaluated in: test-time passes become ``eval``."""
    previous = state.phase
    if previous in ("predict", "adapt"):
        state.phase = "eval"
    try:
        yield
    finally:
        state.phase = previous


class Deployed:
    """A trained strategy serving predictions: its inference hooks, in the evaluation phase.

    ``init`` runs the strategy's own ``init`` (which builds its parameters), then loads its
    saved state and the trained head (a strategy's ``init`` may initialise the head). Its own
    parameters are frozen; hooks for training, losses and experiences are not passed on, so a
    test-time strategy on top never trains it. Built by :func:`deployed`.
    """

    def __init__(self, name: str, inner: Any, saved: Any, head: dict[str, torch.Tensor] | None) -> None:
        self.name = name
        self.inner = inner
        self._saved = saved
        self._head = head

    @hookimpl
    def init(self, state: Any) -> None:
        own_init = getattr(self.inner, "init", None) if _marker(self.inner, "init") is not None else None
        if own_init is not None:
            own_init(state=state)
        if self._saved is not None and hasattr(self.inner, "load_state_dict"):
            try:
                self.inner.load_state_dict(self._saved)
            except DriftpromptError:
                raise
            except Exception as exc:  # noqa: BLE001 - a plugin's own loading code
                raise CheckpointError(f"Strategy '{self.name}' cannot load its exported state ({type(exc).__name__}: {condense(str(exc), 160)}); serve the export with the plugin version that trained it.") from exc
        if self._head is not None and state.head is not None:
            state.head.load_state_dict(self._head)
        in_backbone = {id(p) for p in state.backbone.parameters()}
        for value in vars(self.inner).values():
            params = [value] if isinstance(value, nn.Parameter) else list(value.parameters()) if isinstance(value, nn.Module) else []
            for p in params:
                if id(p) not in in_backbone:  # adapters inside the backbone keep their flags: the forward path stays the run's
                    p.requires_grad_(False)


def _plain(hook: str) -> Any:
    def call(self: Deployed, state: Any) -> Any:
        with _evaluation(state):
            return getattr(self.inner, hook)(state=state)

    call.__name__ = hook
    return call


def _wrapping(hook: str) -> Any:
    def call(self: Deployed, state: Any) -> Any:
        inner = getattr(self.inner, hook)(state=state)
        with _evaluation(state):
            request = next(inner)
        try:
            result = yield request
        except BaseException as exc:  # noqa: BLE001 - handed to the wrapped generator, as pluggy would
            with _evaluation(state):
                try:
                    inner.throw(exc)
                except StopIteration as stop:
                    return stop.value
            raise RuntimeError(f"the {hook} wrapper yielded twice") from None
        with _evaluation(state):
            try:
                inner.send(result)
            except StopIteration as stop:
                return stop.value
        raise RuntimeError(f"the {hook} wrapper yielded twice")

    call.__name__ = hook
    return call


def deployed(name: str, plugin: Any, saved: Any, head: dict[str, torch.Tensor] | None = None) -> Deployed:
    """Wrap a trained strategy for serving (see :class:`Deployed`): the returned object
    implements exactly the inference hooks ``plugin`` implements, with the same ordering
    options (``tryfirst``, ``trylast``, ``wrapper``)."""
    methods: dict[str, Any] = {}
    for hook in INFERENCE_HOOKS:
        opts = _marker(plugin, hook)
        if opts is None:
            continue
        wraps = bool(opts.get("wrapper") or opts.get("hookwrapper"))
        kwargs = {k: bool(opts.get(k)) for k in ("tryfirst", "trylast") if opts.get(k)}
        if opts.get("wrapper"):
            kwargs["wrapper"] = True
        if opts.get("hookwrapper"):
            kwargs["hookwrapper"] = True
        methods[hook] = hookimpl(**kwargs)(_wrapping(hook) if wraps else _plain(hook))
    cls = type(f"Deployed_{type(plugin).__name__}", (Deployed,), methods)
    return cls(name, plugin, saved, head)


# --- from a run ---------------------------------------------------------------------------


def read_run(run_dir: str | Path, registry: Any = None) -> Export:
    """The :class:`Export` of a finished run directory, without writing anything.

    Refuses (one sentence each, :class:`CheckpointError`) a folder that is not a run, a run
    that did not finish (failed, interrupted, stopped, still running) and a run without a
    checkpoint (a test-time run).
    """
    from .checkpoint import CHECKPOINT_NAME, REQUIRED_KEYS, load
    from .config import validate
    from .run import SUMMARY_NAME, read_summary

    path = Path(run_dir)
    if not path.is_dir() or not (path / "config.yaml").is_file():
        raise CheckpointError(f"'{path}' is not a run directory (no config.yaml); pass the folder a finished driftprompt run wrote.")
    summary = read_summary(path)
    status = summary.get("status") if summary is not None else None
    if status != "finished":
        resume = f"continue it with driftprompt --resume {path} and export it when it has finished"
        if summary is None:
            why, fix = f"has no {SUMMARY_NAME}, so it is still running or was killed before it finished", f"wait for it, or {resume}"
        else:
            error = f" ({condense(str(summary['error']), 160)})" if summary.get("error") else ""
            why = f"ended with status '{status}'{error}"
            fix = resume if summary.get("resume") or status in ("interrupted", "stopped") else "fix the cause and train it again"
        raise CheckpointError(f"Run '{path}' {why}, so it has no trained model to export; {fix}.")
    if not (path / CHECKPOINT_NAME).is_file():
        raise CheckpointError(f"Run '{path}' finished without a {CHECKPOINT_NAME} (a test-time run trains nothing), so there is no trained model to export; export a continual run.")
    payload = load(path / CHECKPOINT_NAME, REQUIRED_KEYS)
    if payload["next_experience"] < payload["num_experiences"] or payload.get("position") is not None:
        raise CheckpointError(f"Run '{path}' trained {payload['next_experience']} of its {payload['num_experiences']} experiences, so it is unfinished; continue it with driftprompt --resume {path} and export it when it has finished.")
    config = validate(json.loads(payload["config"]))
    stream, backbone = _rebuild(config, registry, path)
    if backbone.fingerprint != payload["backbone"]:
        raise CheckpointError(f"Run '{path}' was trained on backbone {payload['backbone']}, but its config now builds {backbone.fingerprint}; export it where the run's backbone weights are available.")
    head = payload["head"]
    num_classes = int(head["weight"].shape[0]) if head is not None else None
    names: list[str] = []
    if stream is not None:
        names = [str(n) for n in getattr(stream, "class_names", None) or []]
        num_classes = num_classes or int(stream.num_classes)
    if num_classes is None:
        raise CheckpointError(f"Run '{path}' has neither a head nor a stream to count its classes; export it where its stream's data is available.")
    if len(names) != num_classes:
        names = [f"class {i}" for i in range(num_classes)]
    scenario_all = getattr(config.eval, "classes", "seen") == "all"
    classes = list(range(num_classes)) if scenario_all else [int(c) for c in payload["seen_classes"]]
    mean = [round(float(v), 6) for v in getattr(backbone, "mean", torch.zeros(3)).flatten()]
    std = [round(float(v), 6) for v in getattr(backbone, "std", torch.ones(3)).flatten()]
    preprocessing = {
        "image_size": list(getattr(backbone, "image_size", ())),
        "interpolation": getattr(backbone, "interpolation", None),
        "mean": mean,
        "std": std,
        "eval_resize": getattr(config.eval, "resize", None),
        "eval_interpolation": getattr(config.eval, "interpolation", "model"),
    }
    run = {k: summary[k] for k in ("name", "final_average_accuracy", "average_incremental_accuracy", "forgetting", "backward_transfer") if summary is not None and k in summary}
    run["experiences"] = int(payload["num_experiences"])
    return Export(
        config=config,
        head=head,
        states={name: state for name, state in payload["strategies"].items()},
        backbone={"fingerprint": payload["backbone"], "weights_sha256": weights_digest(backbone), "weights": config.backbone.weights, "seed": config.seed},
        class_names=names,
        classes=classes,
        preprocessing=preprocessing,
        run=run,
        source=str(path),
    )


def _rebuild(config: Any, registry: Any, path: Path) -> tuple[Any, nn.Module]:
    """The run's stream (``None`` when its data is not here) and backbone, built in the order
    and from the seed that ``run.build`` used, so that a random backbone is the same draw.
    The process's random generators are left as they were."""
    import random

    import numpy as np

    from .plugins import discover
    from .run import build_backbone, build_stream, build_strategies
    from .runtime import seed_everything

    saved = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            seed_everything(config.seed)
            registry = registry or discover(config.plugin_modules)
            build_strategies(config, registry)  # their constructors may draw, as in the run
            try:
                stream = build_stream(config, registry)
            except DriftpromptError as exc:
                stream = None
                log.warning("The stream of run '%s' cannot be built here (%s): classes are exported without names.", path, exc)
            if stream is None and config.backbone.weights == "random":
                torch.manual_seed(config.seed)  # as Export.build_backbone will rebuild it
            backbone = build_backbone(config)
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
    return stream, backbone


# --- the file -----------------------------------------------------------------------------


def _metadata(export: Export, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    from .config import config_record

    strategies = []
    for spec in export.config.strategies:
        state = export.states.get(spec.name)
        strategies.append({"name": spec.name, "options": dict(spec.options), "state": _flatten(state, f"strategies.{spec.name}", tensors)})
    return {
        "format": EXPORT_FORMAT,
        "format_version": str(EXPORT_VERSION),
        "config": config_record(export.config),
        "backbone": json.dumps(export.backbone, sort_keys=True),
        "class_names": json.dumps(export.class_names),
        "classes": json.dumps(export.classes),
        "preprocessing": json.dumps(export.preprocessing, sort_keys=True),
        "strategies": json.dumps(strategies, default=str),
        "run": json.dumps(export.run, default=str),
    }


def save_export(export: Export, out: str | Path) -> Path:
    """Write ``export`` to ``out`` atomically (temporary file in the same folder, then rename)."""
    from safetensors.torch import save_file

    out = Path(out)
    tensors: dict[str, torch.Tensor] = {}
    if export.head is not None:
        for k, v in export.head.items():
            tensors[f"head.{k}"] = v.detach().cpu().contiguous().clone()
    metadata = _metadata(export, tensors)
    with naming(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, out)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    return out


def export_run(run_dir: str | Path, out: str | Path, registry: Any = None) -> Path:
    """Export the finished run in ``run_dir`` to the safetensors file ``out``; returns ``out``.

    ``registry`` is the plugin registry (default: the installed plugins and the config's
    ``plugin_modules``).

    Raises:
        CheckpointError: the folder is not a finished run with a checkpoint, or its backbone
            cannot be rebuilt as trained (see :func:`read_run`).
    """
    return save_export(read_run(run_dir, registry), out)


def load_export(path: str | Path) -> Export:
    """Read a file :func:`export_run` wrote; refuses other files and other format versions."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .config import validate

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No export at '{path}'; write one with: driftprompt export RUN_DIR --out {path}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - the reader's errors come in several types
        raise CheckpointError(f"'{path}' cannot be read as a safetensors file ({condense(str(exc), 120)}); pass a file written by driftprompt export.") from exc
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"'{path}' is a safetensors file but not a driftprompt export; write one with: driftprompt export RUN_DIR --out {path}.")
    if meta.get("format_version") != str(EXPORT_VERSION):
        raise CheckpointError(f"'{path}' is an export of format version {meta.get('format_version')}, and this driftprompt reads version {EXPORT_VERSION}; export the run again with this version.")
    try:
        config = validate(json.loads(meta["config"]))
        strategies = json.loads(meta["strategies"])
        export = Export(
            config=config,
            head={k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")} or None,
            states={s["name"]: _unflatten(s["state"], tensors) for s in strategies},
            backbone=json.loads(meta["backbone"]),
            class_names=json.loads(meta["class_names"]),
            classes=json.loads(meta["classes"]),
            preprocessing=json.loads(meta["preprocessing"]),
            run=json.loads(meta.get("run", "{}")),
            source=str(path),
        )
    except DriftpromptError:
        raise
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"The metadata of '{path}' is incomplete or damaged ({type(exc).__name__}: {condense(str(exc), 120)}); export the run again.") from exc
    return export


# --- serving ------------------------------------------------------------------------------


def build_adapter(cls: Any, export: Export, strategies: Sequence[Any] | None = None, *, backbone: nn.Module | None = None, weights: str | Path | None = None, registry: Any = None, **options: Any) -> Any:
    """An ``OnlineAdapter`` (``cls``) serving ``export``, with test-time ``strategies`` on top.

    Args:
        strategies: test-time strategies: plugins, ``(name, plugin)`` pairs, or names of
            registered strategies (built with their defaults).
        backbone: an already built backbone (checked against the export) instead of building it.
        weights: another source of the backbone's weights (see :meth:`Export.build_backbone`).
        registry: the plugin registry (default: the installed plugins and the config's modules).
        **options: passed to ``OnlineAdapter`` (``steps``, ``optimizer``, ``device``, ``amp_dtype``...).
    """
    from .plugins import discover, instantiate
    from .runtime import resolve_amp_dtype

    registry = registry or discover(export.config.plugin_modules)
    if backbone is None:
        backbone = export.build_backbone(weights)
    else:
        export.check_backbone(backbone)
    export.eval_view(backbone)
    head = export.build_head(backbone.embed_dim)
    trained = export.deployed_strategies(registry)
    extra: list[tuple[str, Any]] = []
    for s in strategies or []:
        if isinstance(s, str):
            s = (s, instantiate(registry.strategy(s), {}))
        elif not isinstance(s, tuple):
            s = (getattr(s, "name", type(s).__name__.lower()), s)
        extra.append(s)
    clash = sorted({n for n, _ in trained} & {n for n, _ in extra})
    if clash:
        raise CheckpointError(f"Strategy '{clash[0]}' is already part of the exported classifier; pass only test-time strategies to add on top of it.")
    if "device" in options and options["device"] is not None:
        backbone = backbone.to(options["device"])
    device = next(iter(backbone.buffers()), next(iter(backbone.parameters()))).device
    options.setdefault("amp_dtype", resolve_amp_dtype(export.config.precision, device) if device.type == "cuda" else None)
    adapter = cls(backbone, trained + extra, head=head, num_classes=export.num_classes, class_names=export.class_names, **options)
    state = adapter.state
    state.config = export.config
    state.seen_classes = list(export.classes)
    state.num_experiences = int(export.run.get("experiences", 0) or 0)
    adapter.loop._init()  # the strategies build their parameters and load their trained state now
    return adapter




def attach_export(path: str | Path, backbone: nn.Module, head: nn.Module, strategies: list[tuple[str, Any]], registry: Any = None) -> list[tuple[str, Any]]:
    """Make a run's model the exported classifier (``test_time.head_checkpoint: model.safetensors``).

    Checks ``backbone`` against the export, gives it the export's evaluation view, loads the
    head, and returns the strategies with the export's trained inference strategies (as
    :func:`deployed`) ahead of the config's own. A strategy in both is refused.
    """
    export = load_export(path)
    export.check_backbone(backbone)
    export.eval_view(backbone)
    if export.head is not None:
        try:
            head.load_state_dict(export.head)
        except (RuntimeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"The head in '{path}' does not fit this backbone and stream ({condense(str(exc), 120)}); use the stream the run was trained on.") from exc
    trained = export.deployed_strategies(registry)
    clash = sorted({n for n, _ in trained} & {n for n, _ in strategies})
    if clash:
        raise CheckpointError(f"Strategy '{clash[0]}' is already part of the exported classifier in '{path}'; remove it from strategies (the export brings it trained).")
    return trained + list(strategies)


__all__ = ["EXPORT_VERSION", "Deployed", "Export", "attach_export", "build_adapter", "deployed", "export_run", "load_export", "read_run", "save_export", "weights_digest"]
