"""Assemble a run from a config: backbone, stream, strategies, state, loop, logs."""

from __future__ import annotations

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
from .checkpoint import CHECKPOINT_NAME, load
from .config import RunConfig, dump_config, load_config
from .errors import CheckpointError, ConfigError, DriftpromptError, PluginError, StreamError
from .loggers import RunLogger
from .loop import ContinualLoop, EngineDefaults, TestTimeLoop
from .plugins import Hooks, Registry, discover, instantiate
from .distributed import init_from_env
from .runtime import resolve_amp_dtype, resolve_device, seed_everything
from .state import State

log = logging.getLogger(__name__)


def build_stream(config: RunConfig, registry: Registry) -> Any:
    """Call the registered stream builder named by ``config.stream``."""
    entry = registry.stream(config.stream.name)
    try:
        stream = instantiate(entry, dict(config.stream.options), kind="stream")
    except DriftpromptError:
        raise
    except Exception as exc:
        err = PluginError(f"Stream '{config.stream.name}' from '{entry.source}' failed while building: {type(exc).__name__}: {exc}")
        err.show_traceback = True  # type: ignore[attr-defined]
        raise err from exc
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


@dataclass
class Run:
    """A configured run; ``fit()`` trains the continual stream, ``adapt()`` runs a test stream."""

    config: RunConfig
    registry: Registry
    state: State
    hooks: Hooks
    strategies: list[tuple[str, Any]]
    stream: Any
    logger: RunLogger | None
    run_dir: Path | None
    loop: ContinualLoop = field(init=False)

    def __post_init__(self) -> None:
        self.loop = ContinualLoop(self.state, self.hooks, self.strategies, self.stream, self.config, self.logger)

    def fit(self) -> dict[str, Any]:
        """Train on the stream; returns the accuracy matrix (as lists) and summary metrics."""
        matrix = self.loop.fit()
        summary = {
            "name": self.config.name,
            "strategies": [n for n, _ in self.strategies],
            "accuracy": matrix.to_list(),
            "baseline": self.loop.baseline,
            **matrix.summary(self.loop.baseline),
            "timings": self.loop.timings,
        }
        if self.run_dir is not None and self.state.dist.is_main:
            tmp = self.run_dir / ".summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            os.replace(tmp, self.run_dir / "summary.json")
        return summary

    def adapt(self, batches: Iterable[Any], total: int | None = None) -> dict[str, Any]:
        """Run the test-time loop over ``(images, targets, extras)`` batches."""
        tt = self.config.test_time
        loop = TestTimeLoop(self.state, self.hooks, self.strategies, tt.steps, tt.optimizer, tt.reset_optimizer, self.logger, self.config.log.progress, tt.episodic)
        result = loop.run(batches, total)
        if self.run_dir is not None and self.state.dist.is_main:
            tmp = self.run_dir / ".summary.json.tmp"
            tmp.write_text(json.dumps({"name": self.config.name, "strategies": [n for n, _ in self.strategies], **self.state.metrics.get("online", result)}, indent=2, default=str))
            os.replace(tmp, self.run_dir / "summary.json")
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
        """Flush and close the logs."""
        if self.logger is not None:
            self.logger.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build(config: RunConfig, run_dir: str | Path | None = "auto", registry: Registry | None = None, *, resume: bool = False) -> Run:
    """Build everything a run needs. ``run_dir=None`` keeps the run in memory (no files)."""
    seed_everything(config.seed, config.deterministic)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and config.train.batch_size % world:
        raise ConfigError(f"train.batch_size ({config.train.batch_size}) is not divisible by the {world} processes; make the global batch a multiple of the world size.")
    wants_cuda = config.device.startswith("cuda") or (config.device == "auto" and torch.cuda.is_available())
    dist_ctx = init_from_env(config.distributed.timeout_s, "cuda" if wants_cuda else "cpu")
    device = resolve_device(config.device, dist_ctx.local_rank if dist_ctx.enabled else None)
    amp = resolve_amp_dtype(config.precision, device)
    registry = registry or discover(config.plugin_modules)
    strategies = build_strategies(config, registry)
    stream = build_stream(config, registry)
    backbone = build_backbone(config).to(device)
    head = nn.Linear(backbone.embed_dim, stream.num_classes).to(device)
    if config.test_time.head_checkpoint:
        payload = load(config.test_time.head_checkpoint)
        try:
            head.load_state_dict(payload["head"])
        except (RuntimeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"The head in '{config.test_time.head_checkpoint}' does not fit this backbone and stream ({str(exc).splitlines()[0][:120]}); use a checkpoint of the same backbone and classes.") from exc
    path: Path | None
    if run_dir is None:
        path = None
    else:
        path = Path(config.run_dir) if run_dir == "auto" and config.run_dir else default_run_dir(config) if run_dir == "auto" else Path(run_dir)
        path = Path(dist_ctx.broadcast_object(str(path)))  # one run directory for every process
        if not resume and (path / CHECKPOINT_NAME).exists():
            raise ConfigError(f"Run directory '{path}' already holds a checkpoint; continue it with --resume {path}, or choose another run_dir.")
        if dist_ctx.is_main:
            path.mkdir(parents=True, exist_ok=True)
            if not resume:
                dump_config(config.model_copy(update={"run_dir": str(path)}), path / "config.yaml")
    # only rank 0 writes logs (and checkpoints, in the loop)
    logger = RunLogger(path, tensorboard=config.log.tensorboard, jsonl=config.log.jsonl) if path is not None and dist_ctx.is_main else None
    state = State(backbone=backbone, head=head, device=device, amp_dtype=amp, config=config, run_dir=path, dist=dist_ctx)
    if getattr(stream, "class_names", None):
        state.plugin_state["class_names"] = list(stream.class_names)  # zero-shot CLIP strategies read them
    hooks = Hooks(EngineDefaults(), strategies)
    return Run(config, registry, state, hooks, strategies, stream, logger, path)


def resume(run_dir: str | Path, registry: Registry | None = None) -> Run:
    """Rebuild a run from its directory and continue after its last finished experience."""
    path = Path(run_dir)
    if not (path / "config.yaml").is_file():
        raise CheckpointError(f"'{path}' is not a run directory (no config.yaml); pass the folder a previous run wrote.")
    config = load_config(path / "config.yaml")
    payload = load(path / CHECKPOINT_NAME)
    run = build(config, path, registry, resume=True)
    run.loop.restore(payload)
    if run.logger is not None:
        run.logger.log("resume", run.state.step, next_experience=run.loop.start)
    return run


__all__ = ["Run", "build", "build_stream", "build_strategies", "resume"]
