"""Assemble a run from a config: backbone, stream, strategies, state, loop, logs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .backbones import ViTBackbone
from .checkpoint import CHECKPOINT_NAME, REQUIRED_KEYS, load
from .config import SAFE_TO_CHANGE, RunConfig, changed_keys, dump_config, load_config
from .errors import CheckpointError, ConfigError, DriftpromptError, PluginError, RunFinished, RunInterrupted, StreamError, condense, describe, describe_os_error, naming, os_cause
from .loggers import JSONL_NAME, RunLogger, _to_jsonable, strategy_metrics
from .loop import ContinualLoop, EngineDefaults, TestTimeLoop, check_evaluation
from .plugins import Hooks, Registry, discover, instantiate
from .distributed import init_from_env
from .runtime import apply_runtime, resolve_amp_dtype, resolve_device, seed_everything
from .state import State

log = logging.getLogger(__name__)


def build_stream(config: RunConfig, registry: Registry) -> Any:
    """Call the registered stream builder named by ``config.stream``."""
    entry = registry.stream(config.stream.name)
    try:
        stream = instantiate(entry, dict(config.stream.options), kind="stream")
    except DriftpromptError:
        raise
    except OSError as exc:
        raise StreamError(f"Stream '{config.stream.name}' cannot read its data: {describe_os_error(exc)}") from exc
    except Exception as exc:
        raise PluginError(f"Stream '{config.stream.name}' from '{entry.source}' failed while building: {type(exc).__name__}: {condense(str(exc))}") from exc
    if not hasattr(stream, "experiences") or len(stream) == 0:
        raise StreamError(f"Stream builder '{config.stream.name}' returned no experiences; check its options.")
    return stream


def build_strategies(config: RunConfig, registry: Registry) -> list[tuple[str, Any]]:
    """Instantiate exactly the strategies the config names, in config order."""
    names = [spec.name for spec in config.strategies]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"Strategy '{dupes[0]}' is listed more than once; list each strategy once and give it all its options.")
    return [(spec.name, instantiate(registry.strategy(spec.name), dict(spec.options))) for spec in config.strategies]


def build_backbone(config: RunConfig) -> nn.Module:
    """The frozen backbone the config names: a timm ViT, or an open_clip CLIP model."""
    b = config.backbone
    if b.kind == "clip":
        from .clip import CLIPBackbone

        local = b.weights not in ("pretrained", "random")
        return CLIPBackbone(b.name, pretrained=b.pretrained if b.weights == "pretrained" else None, checkpoint=b.weights if local else None, model_config=b.clip_config, random_init=b.weights == "random")
    normalize = b.normalize if isinstance(b.normalize, str) else b.normalize.model_dump()
    return ViTBackbone(b.name, b.weights, normalize=normalize, **b.kwargs)


def default_run_dir(config: RunConfig) -> Path:
    return Path("runs") / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


# --- the run directory: one process at a time, never someone else's files ----------------

LOCK_NAME = ".driftprompt.lock"
SUMMARY_NAME = "summary.json"
RUN_FILES = ("config.yaml", JSONL_NAME, CHECKPOINT_NAME, SUMMARY_NAME, LOCK_NAME)


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds files a driftprompt run writes (its lock file, or config.yaml with
    a log, checkpoint or summary next to it)."""
    return (path / LOCK_NAME).exists() or ((path / "config.yaml").is_file() and any((path / f).exists() for f in RUN_FILES[1:4]))


class RunDirLock:
    """An exclusive ``flock`` on ``RUN_DIR/.driftprompt.lock``, held until :meth:`release` or
    the process ends (the kernel drops it even after ``kill -9``), so that two processes never
    write one run directory. The lock file holds the owner's pid, for the error message, and
    is removed on release; one left by a killed process holds no lock and is taken over."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: Any = None

    def acquire(self, record_pid: bool = True) -> None:
        try:
            import fcntl
        except ImportError:  # no flock on this platform: the emptiness checks still apply
            return
        handle = open(self.path / LOCK_NAME, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            handle.close()
            raise ConfigError(f"Run directory '{self.path}' is in use by another driftprompt process (pid {owner}); wait for it to end, or choose another run_dir.") from None
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(self.path / LOCK_NAME).st_ino
        except OSError:
            same = False
        if not same:  # the owner removed the file while we waited on it: someone else may hold a new one
            handle.close()
            raise ConfigError(f"Run directory '{self.path}' was just taken by another driftprompt process; wait for it to end, or choose another run_dir.")
        if record_pid:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
        self._handle = handle

    def release(self, remove: bool = True) -> None:
        """Drop the lock; the lock file goes too (while still locked, so no one can be
        holding it), unless ``remove`` is false."""
        if self._handle is not None:
            if remove:
                with contextlib.suppress(OSError):
                    os.unlink(self.path / LOCK_NAME)
            self._handle.close()  # closing the file drops the flock
            self._handle = None


def _contents(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME) if path.is_dir() else []


def _refuse_used_dir(path: Path) -> None:
    """A new run only goes into a new or empty directory."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"Run directory '{path}' is a file; choose a folder path for run_dir.")
    names = _contents(path)
    if not names:
        return
    if (path / CHECKPOINT_NAME).exists():
        raise ConfigError(f"Run directory '{path}' already holds a checkpoint; continue it with --resume {path}, or choose another run_dir.")
    if is_run_dir(path):
        raise ConfigError(f"Run directory '{path}' already holds a driftprompt run that saved no checkpoint; delete it or choose another run_dir.")
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    raise ConfigError(f"Run directory '{path}' is not empty ({shown}) and is not a driftprompt run; choose a new or empty folder, so that nothing of yours is overwritten.")


def open_run_dir(path: Path, resume: bool) -> RunDirLock:
    """Create (or, resuming, reopen) a run directory and lock it for this process.

    A directory that another process holds is refused first ("in use"); a new run is then
    refused anything but a new or empty folder. Nothing is written into a folder that is
    refused, not even the lock file.
    """
    lock = RunDirLock(path)
    if path.is_dir() and (path / LOCK_NAME).exists():
        lock.acquire()
    try:
        if not resume:
            _refuse_used_dir(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"Run directory '{path}' cannot be created ({os_cause(exc)[0]} at '{exc.filename or path}'); {os_cause(exc)[1]}.") from None
        if lock._handle is None:
            try:
                lock.acquire()
            except OSError as exc:
                raise ConfigError(f"Run directory '{path}' cannot be locked ({os_cause(exc)[0]} at '{exc.filename or path}'); {os_cause(exc)[1]}.") from None
            if not resume:
                _refuse_used_dir(path)  # another process may have started there before we locked it
    except BaseException:
        lock.release()
        raise
    return lock


def write_summary(run_dir: Path, data: dict[str, Any]) -> None:
    """Write ``summary.json`` atomically (temporary file, fsync, rename)."""
    tmp = run_dir / f".{SUMMARY_NAME}.tmp"
    try:
        with naming(tmp), open(tmp, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(data, indent=2, default=str))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, run_dir / SUMMARY_NAME)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((run_dir / SUMMARY_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- which loop a config belongs to --------------------------------------------------------

_TEST_TIME_HOOKS = {"test_stream_start", "test_sample_start", "test_sample_end", "test_stream_end", "adapt_step_start", "adapt_step_end"}
_CONTINUAL_HOOKS = {"fit_start", "experience_start", "experience_end", "epoch_start", "epoch_end", "batch_start", "batch_end", "eval_start", "eval_end", "eval_batch_start", "eval_batch_end", "fit_end", "after_optimizer_step"}


def is_test_time_only(plugin: Any, hooks: Hooks) -> bool:
    """Whether a strategy adapts on test streams only.

    A strategy says so with a class attribute ``test_time_only = True`` (or ``False``);
    otherwise it is inferred: it handles test-stream events and none of the continual loop's.
    """
    declared = getattr(plugin, "test_time_only", None)
    if declared is not None:
        return bool(declared)
    names = {caller.name for caller in hooks.pm.get_hookcallers(plugin) or []}
    return bool(names & _TEST_TIME_HOOKS) and not names & _CONTINUAL_HOOKS


def _has_own_forward(plugin: Any, hooks: Hooks) -> bool:
    return any(caller.name == "forward" for caller in hooks.pm.get_hookcallers(plugin) or [])


def check_mode(mode: str | None, config: RunConfig, strategies: list[tuple[str, Any]], hooks: Hooks, stream: Any = None) -> None:
    """Refuse a config that the chosen loop would run without meaning.

    ``fit`` (the continual protocol) refuses test-time streams and test-time-only strategies;
    ``adapt`` refuses to classify with a head that was never trained.
    """
    if mode == "fit":
        for name, plugin in strategies:
            if is_test_time_only(plugin, hooks):
                raise ConfigError(f"Strategy '{name}' adapts on test streams only, so a continual run would never use it; run this config with 'driftprompt adapt CONFIG'.")
        if stream is not None and (hasattr(stream, "batches") or getattr(stream, "scenario", "") == "test_time"):
            raise ConfigError(f"Stream '{config.stream.name}' is a test-time stream with nothing to train on; run this config with 'driftprompt adapt CONFIG', or pick a continual stream.")
    elif mode == "adapt" and not config.test_time.head_checkpoint:
        # Nothing was trained in this run: only a test-time strategy with its own classifier
        # (a zero-shot CLIP model: tpt, tda, dynaprompt) has something meaningful to predict with.
        if not any(_has_own_forward(plugin, hooks) and is_test_time_only(plugin, hooks) for _, plugin in strategies):
            names = ", ".join(f"'{n}'" for n, _ in strategies) or "none"
            raise ConfigError(
                f"'adapt' would report the accuracy of a classifier that was never trained: the strategies ({names}) need a trained head or trained statistics, and test_time.head_checkpoint is not set; "
                "set it to a trained run's checkpoint.pt, or use a zero-shot test-time strategy (tpt, tda, dynaprompt)."
            )


def _refuse_untrained_head(module: nn.Module, args: Any) -> None:
    raise ConfigError("A strategy classified with the run's head, which was never trained (test_time.head_checkpoint is not set); set it to a trained run's checkpoint.pt.")


@dataclass
class Run:
    """A configured run; ``fit()`` trains the continual stream, ``adapt()`` runs a test stream.

    Whatever happens, ``summary.json`` says how the run ended: ``"status": "finished"`` with
    the results, ``"stopped"`` (a strategy ended it early; ``--resume`` continues),
    ``"interrupted"`` (SIGINT or SIGTERM) or ``"failed"`` with the error's sentence, so that no
    tool mistakes a broken run for a result.
    """

    config: RunConfig
    registry: Registry
    state: State
    hooks: Hooks
    strategies: list[tuple[str, Any]]
    stream: Any
    logger: RunLogger | None
    run_dir: Path | None
    lock: RunDirLock | None = None
    loop: ContinualLoop = field(init=False)

    def __post_init__(self) -> None:
        self.loop = ContinualLoop(self.state, self.hooks, self.strategies, self.stream, self.config, self.logger)

    def _writes(self) -> bool:
        return self.run_dir is not None and self.state.dist.is_main

    def mark(self, status: str, exc: BaseException | None = None) -> None:
        """Record in ``summary.json`` that the run did not finish (never raises)."""
        if not self._writes():
            return
        assert self.run_dir is not None
        data = {"status": status, "name": self.config.name, "strategies": [n for n, _ in self.strategies]}
        if exc is not None:
            data["error"] = describe(exc)
        if status in ("interrupted", "stopped") or (status == "failed" and (self.run_dir / CHECKPOINT_NAME).exists()):
            data["resume"] = f"driftprompt --resume {self.run_dir}"
        try:
            write_summary(self.run_dir, data)
        except BaseException:  # noqa: BLE001 - a full disk must not hide the original error
            log.debug("could not write the failure marker", exc_info=True)

    def _guarded(self, work: Any) -> Any:
        try:
            return work()
        except (KeyboardInterrupt, RunInterrupted) as exc:
            self.mark("interrupted", exc)
            raise
        except BaseException as exc:
            self.mark("failed", exc)
            raise

    def fit(self) -> dict[str, Any]:
        """Train on the stream; returns the accuracy matrix (as lists) and summary metrics."""
        matrix = self._guarded(self.loop.fit)
        finished = self.loop.start >= len(self.stream)
        summary = {
            "status": "finished" if finished else "stopped",
            "name": self.config.name,
            "strategies": [n for n, _ in self.strategies],
            "accuracy": matrix.to_list(),
            "baseline": self.loop.baseline,
            **matrix.summary(self.loop.baseline),
            "timings": self.loop.timings,
            # what the strategies put in state.metrics ("<strategy>/<name>"), as they last wrote it
            "strategy_metrics": _to_jsonable(strategy_metrics(self.state.metrics)),
        }
        if not finished and self.run_dir is not None:
            summary["resume"] = f"driftprompt --resume {self.run_dir}"
        if self._writes():
            assert self.run_dir is not None
            self._guarded(lambda: write_summary(self.run_dir, summary))
        return summary

    def adapt(self, batches: Iterable[Any], total: int | None = None) -> dict[str, Any]:
        """Run the test-time loop over ``(images, targets, extras)`` batches."""
        tt = self.config.test_time
        loop = TestTimeLoop(self.state, self.hooks, self.strategies, tt.steps, tt.optimizer, tt.reset_optimizer, self.logger, self.config.log.progress, tt.episodic)
        result = self._guarded(lambda: loop.run(batches, total))
        from driftprompt.streams.base import unreadable_images

        skipped = unreadable_images(self.stream)
        if skipped:  # scored on fewer images than the stream holds: the summary says so
            result["skipped_unreadable_images"] = skipped
        if self._writes():
            assert self.run_dir is not None
            data = {"status": "finished", "name": self.config.name, "strategies": [n for n, _ in self.strategies], **self.state.metrics.get("online", result), "strategy_metrics": _to_jsonable(strategy_metrics(self.state.metrics))}
            self._guarded(lambda: write_summary(self.run_dir, data))
        return result

    def adapt_stream(self) -> dict[str, Any]:
        """Run the test-time loop over the configured stream (a ``TestTimeStream``, or the test
        sets of a continual stream, one domain per experience)."""
        stream, tt = self.stream, self.config.test_time
        mask = getattr(stream, "label_mask", None)
        if mask is not None:  # a subset of a wider label space (ImageNet-A/R): predict only inside it
            self.state.seen_classes = torch.nonzero(mask).flatten().tolist()
        elif not self.state.seen_classes:
            self.state.seen_classes = list(range(stream.num_classes))
        if hasattr(stream, "batches"):
            return self.adapt(stream.batches(tt.batch_size), stream.num_batches(tt.batch_size))
        from driftprompt.streams.base import iterate

        def continual_test_sets() -> Any:
            for exp in stream:
                for images, targets, extras in iterate(exp.test, tt.batch_size):
                    extras.setdefault("domain", [exp.domain or f"experience {exp.index}"] * images.shape[0])
                    yield images, targets, extras

        return self.adapt(continual_test_sets(), sum(-(-len(exp.test) // tt.batch_size) for exp in stream))

    def close(self) -> None:
        """Flush and close the logs, and unlock the run directory."""
        try:
            if self.logger is not None:
                self.logger.close()
        finally:
            if self.lock is not None:
                self.lock.release()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build(
    config: RunConfig,
    run_dir: str | Path | None = "auto",
    registry: Registry | None = None,
    *,
    resume: bool = False,
    mode: str | None = None,
    metrics_offset: int | None = None,
    purge_step: int | None = None,
    purge_experience: int | None = None,
) -> Run:
    """Build everything a run needs. ``run_dir=None`` keeps the run in memory (no files).

    Everything that can be checked (plugins, strategy options and their types, hook names,
    the stream, the backbone, a deployed head, the loop ``mode`` fits the config) is checked
    before the run directory is created; a failure after that is recorded in ``summary.json``.

    Args:
        mode: ``"fit"`` or ``"adapt"`` refuses configs that loop would run without meaning
            (see :func:`check_mode`); ``None`` checks nothing (library use).
        metrics_offset, purge_step, purge_experience: a resumed run's cut of ``metrics.jsonl``
            and TensorBoard (its step axis, and its experience axis).
    """
    seed_everything(config.seed, config.deterministic)
    apply_runtime(config.runtime)  # thread count, for library callers as for the CLI
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and config.train.batch_size % world:
        raise ConfigError(f"train.batch_size ({config.train.batch_size}) is not divisible by the {world} processes; make the global batch a multiple of the world size.")
    wants_cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    dist_ctx = init_from_env(config.distributed.timeout_s, "cuda" if wants_cuda else "cpu")
    device = resolve_device(config.device, dist_ctx.local_rank if dist_ctx.enabled else None)
    amp = resolve_amp_dtype(config.precision, device)
    registry = registry or discover(config.plugin_modules)
    strategies = build_strategies(config, registry)
    hooks = Hooks(EngineDefaults(), strategies)  # misspelt hooks and contract errors, before any file
    check_mode(mode, config, strategies, hooks)
    stream = build_stream(config, registry)
    check_mode(mode, config, strategies, hooks, stream)
    backbone = build_backbone(config).to(device)
    if mode == "fit":
        check_evaluation(config, strategies, stream, backbone)
    head = nn.Linear(backbone.embed_dim, stream.num_classes).to(device)
    if config.test_time.head_checkpoint and Path(config.test_time.head_checkpoint).suffix == ".safetensors":
        # an export (driftprompt export): its head, and its trained prompt strategies ahead of the config's
        from .export import attach_export

        strategies = attach_export(config.test_time.head_checkpoint, backbone, head, strategies, registry)
        hooks = Hooks(EngineDefaults(), strategies)
    elif config.test_time.head_checkpoint:
        payload = load(config.test_time.head_checkpoint)
        try:
            head.load_state_dict(payload["head"])
        except (RuntimeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"The head in '{config.test_time.head_checkpoint}' does not fit this backbone and stream ({condense(str(exc), 120)}); use a checkpoint of the same backbone and classes.") from exc
    elif mode == "adapt":
        head.register_forward_pre_hook(_refuse_untrained_head)
    path: Path | None
    lock: RunDirLock | None = None
    if run_dir is None:
        path = None
    else:
        path = Path(config.run_dir) if run_dir == "auto" and config.run_dir else default_run_dir(config) if run_dir == "auto" else Path(run_dir)
        path = Path(dist_ctx.broadcast_object(str(path)))  # one run directory for every process
        if dist_ctx.is_main:
            lock = open_run_dir(path, resume)
    logger = None
    try:
        if path is not None and dist_ctx.is_main and not resume:
            dump_config(config.model_copy(update={"run_dir": str(path)}), path / "config.yaml")
        # only rank 0 writes logs (and checkpoints, in the loop)
        if path is not None and dist_ctx.is_main:
            logger = RunLogger(path, tensorboard=config.log.tensorboard, jsonl=config.log.jsonl, truncate_to=metrics_offset if resume else None, purge_step=purge_step if resume else None, purge_experience=purge_experience if resume else None)
        state = State(backbone=backbone, head=head, device=device, amp_dtype=amp, config=config, run_dir=path, dist=dist_ctx)
        if getattr(stream, "class_names", None):
            state.plugin_state["class_names"] = list(stream.class_names)  # zero-shot CLIP strategies read them
        run = Run(config, registry, state, hooks, strategies, stream, logger, path, lock)
    except BaseException as exc:
        if path is not None and dist_ctx.is_main and not resume:
            try:
                write_summary(path, {"status": "failed", "name": config.name, "error": describe(exc)})
            except BaseException:  # noqa: BLE001
                pass
        if logger is not None:
            logger.close()
        if lock is not None:
            lock.release()
        raise
    return run


def resume(run_dir: str | Path, registry: Registry | None = None) -> Run:
    """Rebuild a run from its directory and continue where its checkpoint left it.

    Refuses (one sentence each): a folder that is not a run, a damaged or incomplete
    checkpoint, a config edited in other keys than :data:`~driftprompt.engine.config.SAFE_TO_CHANGE`,
    and a finished run (:class:`RunFinished`, which changes nothing on disk).
    """
    path = Path(run_dir)
    if not path.is_dir() or not (path / "config.yaml").is_file():
        raise CheckpointError(f"'{path}' is not a run directory (no config.yaml); pass the folder a previous run wrote.")
    if (path / LOCK_NAME).exists() and os.environ.get("RANK", "0") == "0":  # a run in progress there: say so first
        probe = RunDirLock(path)
        probe.acquire(record_pid=False)
        probe.release(remove=False)
    payload = load(path / CHECKPOINT_NAME, REQUIRED_KEYS)
    summary = read_summary(path)
    if payload["next_experience"] >= payload["num_experiences"] and payload.get("position") is None and summary is not None and summary.get("status") == "finished":
        raise RunFinished(f"Run '{path}' already finished all {payload['num_experiences']} experiences, so there is nothing to resume; its results are in {path / SUMMARY_NAME}.")
    config = load_config(path / "config.yaml")
    changed = changed_keys(payload["config"], config)
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise ConfigError(
            f"The config in '{path / 'config.yaml'}' differs from the one this run was checkpointed with ({shown}); undo those edits, or start a new run "
            f"(a resumed run may change only {', '.join(k + '.*' if k in ('log', 'distributed', 'checkpoint') else k for k in SAFE_TO_CHANGE)})."
        )
    run = build(config, path, registry, resume=True, metrics_offset=payload.get("metrics_offset"), purge_step=int(payload["step"]) + 1, purge_experience=int(payload["next_experience"]))
    try:
        run.loop.restore(payload)
        if run.logger is not None:
            run.logger.log("resume", run.state.step, next_experience=run.loop.start, mid_experience=payload.get("position") is not None)
    except BaseException as exc:
        run.mark("failed", exc)
        run.close()
        raise
    return run


__all__ = ["Run", "RunDirLock", "build", "build_stream", "build_strategies", "check_mode", "is_test_time_only", "resume"]
