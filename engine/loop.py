"""The continual loop and the test-time loop.

Neither loop knows any strategy: they walk the fixed sequence of :class:`Event` points on one
:class:`State` and ask the registered plugins for logits, loss terms and trainable parameters.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import CHECKPOINT_NAME, FORMAT_VERSION, atomic_save, rng_state, set_rng_state
from .config import config_record
from .errors import CheckpointError, DriftpromptError, PluginError, condense, StreamError
from .events import Event
from .hookspecs import hookimpl
from .loggers import OnlineCurves, TrainCurves, accuracy_curves, format_experience_line, postfix, strategy_metrics
from .metrics import AccuracyMatrix
from .optim import build_optimizer, load_optimizer_state_by_name, merge_param_groups, optimizer_state_by_name
from .plugins import Hooks
from .runtime import autocast, data_generator
from .state import State

log = logging.getLogger(__name__)


class EngineDefaults:
    """The engine's own hook implementations: the default forward pass."""

    @hookimpl(trylast=True)
    def forward(self, state: State) -> torch.Tensor:
        """Backbone (with the strategies' prompts) then the linear head."""
        if state.head is None:
            raise PluginError("No strategy produced logits and the run has no head; add a classifier strategy such as 'finetune' or 'ncm'.")
        if state.prompts.empty and not state.backbone_trainable:
            state.features = state.compute_query()
        else:
            state.features = state.backbone(state.inputs, state.prompts)
        return state.head(state.features)


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Set the logits of classes outside ``allowed`` (a boolean mask) to the dtype's minimum.

    A finite minimum, not ``-inf``: softmax still gives them zero probability, and entropies
    (``p * log p``) stay finite. A *target* whose logit is masked has no meaningful
    cross-entropy (about 3e38, or inf): :func:`cross_entropy` flags that case, and the
    non-finite guard stops the run naming it as the cause.
    """
    return logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)


def mask_to_current_experience(state: State) -> None:
    """Mask ``state.logits`` to the classes of the experience being trained (train phase only).

    The train-time class mask of L2P and DualPrompt: old classes receive no gradient from the
    new experience's data, which removes the bias toward new classes.

    A strategy that adds samples of other classes to the batch (replay) lists their labels in
    ``state.batch["replay_classes"]`` (a long tensor of class ids, on any device): those
    classes stay unmasked too, so the mask allows every class present in the batch and a
    replayed sample's target never meets a masked logit.
    """
    if state.phase != "train" or state.experience is None or state.logits is None:
        return
    # Built once per experience and cached, so the batch loop does no host-to-device copy.
    cached = state.plugin_state.get("engine.current_class_mask")
    if cached is None or cached[0] != state.experience.index:
        allowed = torch.zeros(state.num_classes, dtype=torch.bool, device=state.device)
        allowed[torch.as_tensor(state.experience.classes, device=state.device)] = True
        cached = state.plugin_state["engine.current_class_mask"] = (state.experience.index, allowed)
    allowed = cached[1]
    extra = state.batch.get("replay_classes") if isinstance(state.batch, dict) else None
    if extra is not None and len(extra):
        # indexing on the device: no host sync per batch
        allowed = allowed.clone()
        allowed[torch.as_tensor(extra).to(allowed.device, torch.long)] = True
    state.logits = mask_logits(state.logits, allowed)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from each group's base learning rate to zero over ``total_steps``.

    Rebuilt at every experience; base rates persist in ``initial_lr`` when the optimizer does.
    """
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("initial_lr", group["lr"])
    total = max(total_steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)))


class EpochSchedule(torch.optim.lr_scheduler.LambdaLR):
    """A ``LambdaLR`` over epochs: the loop steps it at ``epoch_start`` (epochs 1, 2, ...), never per batch."""


def cosine_epoch_factor(epoch: int, epochs: int) -> float:
    """CODA-Prompt's learning-rate factor for ``epoch`` (0-based) of ``epochs`` in an experience.

    GT-RIPL/CODA-Prompt utils/schedulers.py:54 sets ``base * cos(99 pi e / (200 (K - 1)))`` with
    K = epochs; its scheduler already sets e = 0 when built (schedulers.py:19) and
    learners/default.py:95 steps it only before epochs 1, 2, ..., so epoch ``epoch`` runs at
    e = max(epoch - 1, 0): epochs 0 and 1 at the base rate, the last at
    cos(99 pi (K - 2) / (200 (K - 1))) (0.097 of the base for K = 20). The reference divides by
    zero for K = 1; here a single epoch simply runs at the base rate.
    """
    return math.cos(99.0 * math.pi * max(epoch - 1, 0) / (200.0 * max(epochs - 1, 1)))


def cosine_epoch_schedule(optimizer: torch.optim.Optimizer, epochs: int) -> EpochSchedule:
    """:func:`cosine_epoch_factor` per epoch, rebuilt at every experience like the reference's."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("initial_lr", group["lr"])
    return EpochSchedule(optimizer, lambda epoch: cosine_epoch_factor(epoch, epochs))


def check_evaluation(config: Any, strategies: list[tuple[str, Any]], stream: Any, backbone: Any) -> None:
    """Refuse an evaluation setup the continual loop cannot honour, before anything trains.

    ``eval.classes: all`` contradicts a task-incremental stream; a strategy may declare the
    modes it can score in an ``eval_classes`` attribute; ``eval.resize`` and
    ``eval.interpolation`` need a backbone with an ``evaluating`` view (the timm ViT).
    """
    from .errors import ConfigError

    mode = getattr(config.eval, "classes", "seen")
    if mode == "all" and getattr(stream, "scenario", "") == "task_incremental":
        raise ConfigError("eval.classes: all contradicts a task-incremental stream, which predicts among each task's own classes; set eval.classes: seen.")
    for name, plugin in strategies:
        supported = getattr(plugin, "eval_classes", ("seen", "all"))
        if mode not in supported:
            raise ConfigError(f"Strategy '{name}' cannot score eval.classes: {mode}; set eval.classes to one of {', '.join(supported)}.")
    resize, interpolation = getattr(config.eval, "resize", None), getattr(config.eval, "interpolation", "model")
    if backbone is not None and getattr(backbone, "evaluating", None) is None and (resize is not None or interpolation != "model"):
        raise ConfigError(f"eval.resize and eval.interpolation apply to timm ViT backbones, not {type(backbone).__name__}; remove them.")


class _Loop:
    def __init__(self, state: State, hooks: Hooks, strategies: list[tuple[str, Any]], logger: Any = None, progress: bool | None = None) -> None:
        self.state = state
        self.hooks = hooks
        self.strategies = strategies
        self.logger = logger
        self.progress = progress
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self._local = self._total = 1  # this process's and the global batch size
        self.sync_gradients = True

    def _bar(self, iterable: Iterable, total: int | None, desc: str, leave: bool = False) -> Iterator:
        disable = True if not self.state.dist.is_main else None if self.progress is None else not self.progress
        # the innermost bar made last shows the figures read at each logging step
        self._live_bar = tqdm(iterable, total=total, desc=desc, leave=leave, disable=disable, dynamic_ncols=True)
        return iter(self._live_bar)

    def _postfix(self, values: dict[str, Any] | None) -> None:
        """Show the loss and accuracy just logged on the live progress bar (no extra sync)."""
        bar = getattr(self, "_live_bar", None)
        if values and bar is not None and not bar.disable:
            bar.set_postfix(postfix(values), refresh=False)

    def _init(self) -> None:
        """Fire ``init`` once per run, whichever loop (or a resume) gets there first."""
        if not self.hooks.initialised:
            self.state.phase = "init"
            self.hooks.fire(Event.INIT, self.state)
            self.hooks.initialised = True

    def _share(self, images: torch.Tensor, targets: torch.Tensor | None, extras: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """This process's share of a global batch (everything, in a single process)."""
        d = self.state.dist
        if not d.enabled:
            return images, targets, extras
        parts = torch.tensor_split(torch.arange(images.shape[0]), d.world_size)[d.rank]
        lo, hi = (int(parts[0]), int(parts[-1]) + 1) if len(parts) else (0, 0)

        def cut(v: Any) -> Any:
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == images.shape[0]:
                return v[lo:hi]
            if isinstance(v, (list, tuple)) and len(v) == images.shape[0]:
                return type(v)(v[lo:hi])
            return v

        return images[lo:hi], None if targets is None else targets[lo:hi], {k: cut(v) for k, v in extras.items()}

    def _set_batch(self, images: torch.Tensor, targets: torch.Tensor | None, extras: dict[str, Any]) -> None:
        s = self.state
        s.clear_batch()
        s.inputs = s.backbone.preprocess(images.to(s.device, non_blocking=True))
        s.targets = targets.to(s.device, non_blocking=True) if targets is not None else None
        s.batch = extras
        # the query cache keys this batch's samples while its inputs are the loader's own
        if s.query_cache is None:
            from .query_cache import QueryCache

            s.query_cache = QueryCache.from_config(s.config)
        s.query_cache.begin_batch(s)

    def _forward(self, allowed: torch.Tensor | None) -> torch.Tensor:
        s = self.state
        self.hooks.fire(Event.BEFORE_FORWARD, s)
        with autocast(s.device, s.amp_dtype):
            logits = self.hooks.forward(s)
        s.logits = logits if allowed is None else mask_logits(logits, allowed)
        self.hooks.fire(Event.AFTER_FORWARD, s)
        return s.logits

    def _optimize(self, clip: float | None) -> None:
        """Loss, backward and optimizer stages for the current batch."""
        s = self.state
        self.hooks.fire(Event.BEFORE_LOSS, s)
        with autocast(s.device, s.amp_dtype):
            terms = self.hooks.loss_terms(s)
        if not terms:
            raise PluginError("Strategies declared trainable parameters but returned no loss terms; a classifier strategy must implement loss_terms.")
        s.loss_terms = terms
        s.loss = sum(t.float() for t in terms.values())  # type: ignore[assignment]
        self.hooks.fire(Event.AFTER_LOSS, s)
        self.hooks.fire(Event.BEFORE_BACKWARD, s)
        assert s.loss is not None
        if not s.loss.requires_grad:
            raise PluginError(
                f"The loss terms {sorted(terms)} do not depend on any trainable parameter (declared groups: "
                f"{[g['name'] for g in s.param_groups]}); a strategy's loss must use the parameters it declares, or the forward that uses them."
            )
        s.loss.backward()
        params = [p for g in s.param_groups for p in g["params"]]
        # data parallelism: gradients averaged over processes, weighted by their batch shares
        # (never in the test-time loop, where each process adapts on its own samples)
        if self.sync_gradients:
            s.dist.average_gradients(params, self._local, self._total)
        self.hooks.fire(Event.AFTER_BACKWARD, s)
        self.hooks.fire(Event.BEFORE_OPTIMIZER_STEP, s)
        # Clip after projection hooks: scaling keeps a projected gradient's direction.
        if clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        # Non-finite terms and gradients are folded into device flags: no host sync per step.
        bad = self._last_step_bad = self._nonfinite_guard().observe(terms, grad_norm, s.plugin_state.pop(MASKED_TARGET_KEY, None))
        skip = nonfinite_mode(s) == "skip"
        assert s.optimizer is not None
        if skip:  # a bad step changes neither the parameters nor the optimizer's state
            if self.sync_gradients and s.dist.enabled:
                # one process's bad step is every process's: skipping it on some processes only
                # would let the data-parallel copies of the model drift apart (on the device, no sync)
                bad = s.dist.all_reduce_(bad.to(torch.int32), "the skip flag") > 0
            # Adam's step counter too where it lives beside ``bad`` (fused, or on the CPU); an
            # unfused optimizer's host-side counter on CUDA would need a sync and still advances
            saved = [(p, p.detach().clone()) for p in params]
            saved += [(v, v.clone()) for p in params for v in s.optimizer.state.get(p, {}).values() if torch.is_tensor(v) and v.device == bad.device]
            for p in params:
                if p.grad is not None:
                    p.grad.masked_fill_(bad, 0.0)
        s.optimizer.step()
        if skip:
            with torch.no_grad():
                for t, old in saved:
                    t.copy_(torch.where(bad, old, t))
        s.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None and not isinstance(self.scheduler, EpochSchedule):
            self.scheduler.step()
        s.step += 1
        if not skip and s.step % NONFINITE_CHECK_EVERY == 0:
            self.check_numerics(reset=False)  # a long epoch (or a test stream) is not left to run on NaN
        self.hooks.fire(Event.AFTER_OPTIMIZER_STEP, s)

    def _nonfinite_guard(self) -> NonFiniteGuard:
        guard = getattr(self, "_guard", None)
        if guard is None or guard.device != self.state.device:
            guard = self._guard = NonFiniteGuard(self.state.device, self.state.step)
        return guard

    def check_numerics(self, reset: bool = True) -> int:
        """Read the non-finite flags of the steps since the last check (one host sync).

        Call it at a natural sync point (end of an epoch, a logging step) and always before
        writing a checkpoint. With ``train.nonfinite: stop`` a bad step raises a
        :class:`PluginError` naming the step, the loss term and its strategy; with ``skip``
        it returns the number of skipped steps since the last check (``reset`` starts a new
        count).
        """
        guard = getattr(self, "_guard", None)
        if guard is None:
            return 0
        # the test-time loop's processes adapt independently: no collective there
        return guard.check(self.state, self.hooks, nonfinite_mode(self.state), reset, reduce=self.sync_gradients)

    def _allowed(self, classes: list[int]) -> torch.Tensor | None:
        """Mask of the classes predictions may take; ``None`` when that is every class.

        Built once per experience or evaluation, never per batch (no host sync in the loop).
        """
        if len(set(classes)) >= self.state.num_classes:
            return None
        mask = torch.zeros(self.state.num_classes, dtype=torch.bool, device=self.state.device)
        mask[torch.as_tensor(sorted(set(classes)), device=self.state.device)] = True
        return mask

    def _build_optimizer(self, options: Any, reset: bool) -> None:
        """Collect parameter groups and (re)build or extend the optimizer."""
        s = self.state
        groups = self.hooks.trainable_parameters(s)
        s.param_groups = groups
        # adapters (LoRA and the like) live inside the backbone: its forward then needs autograd
        s.backbone_trainable = any(p.requires_grad for p in s.backbone.parameters())
        if s.optimizer is not None and not reset:
            merge_param_groups(s.optimizer, groups)
        elif s.optimizer is None and groups:
            s.optimizer = build_optimizer(groups, options)


class ContinualLoop(_Loop):
    """Train on each experience in turn, then evaluate on every experience seen so far.

    Args:
        state: the shared state, with backbone, head and device set.
        hooks: the run's plugin manager.
        strategies: ``(name, plugin)`` pairs in config order, for checkpoints.
        stream: a ``streams.Stream``.
        config: the validated ``RunConfig``.
        logger: a ``loggers.RunLogger`` or ``None``.
    """

    def __init__(self, state: State, hooks: Hooks, strategies: list[tuple[str, Any]], stream: Any, config: Any, logger: Any = None) -> None:
        super().__init__(state, hooks, strategies, logger, config.log.progress)
        self.stream = stream
        self.config = config
        self.accuracy = AccuracyMatrix(len(stream))
        self.baseline: list[float] | None = None
        self.timings: list[dict[str, float]] = []
        self.start = 0
        self._saved_optimizer: dict[str, Any] | None = None
        self._boundary: dict[str, Any] | None = None  # state at the start of the experience (mid-experience checkpoints)
        self._mid: dict[str, Any] | None = None  # a mid-experience checkpoint waiting for its experience to restart
        self._saved_step = -1
        state.num_experiences = len(stream)
        state.num_classes = stream.num_classes
        state.metrics["accuracy_matrix"] = self.accuracy
        self.curves = TrainCurves(config.log.every_steps)  # log.every_steps: device sums, read at logging steps

    # --- checkpoints -------------------------------------------------------------------------

    def checkpoint_payload(self, position: dict[str, Any] | None = None) -> dict[str, Any]:
        """What ``checkpoint.pt`` holds: after an experience, or (``position`` given) in the
        middle of one, together with the state at the start of that experience."""
        s = self.state
        return {
            "format_version": FORMAT_VERSION,
            "backbone": s.backbone.fingerprint,
            "strategy_names": [name for name, _ in self.strategies],
            "next_experience": self.start,
            "num_experiences": len(self.stream),
            "step": s.step,
            "seen_classes": list(s.seen_classes),
            "head": s.head.state_dict() if s.head is not None else None,
            "strategies": {name: plugin.state_dict() for name, plugin in self.strategies if hasattr(plugin, "state_dict")},
            "optimizer": optimizer_state_by_name(s.optimizer) if s.optimizer is not None else None,
            "scheduler": self.scheduler.state_dict() if position is not None and self.scheduler is not None else None,
            "rng": rng_state(),
            "metrics": {"accuracy": self.accuracy.to_list(), "baseline": self.baseline, "timings": self.timings, "notes": dict(self.accuracy.notes)},
            # the resolved config, so that --resume can refuse an edited one
            "config": config_record(self.config),
            # metrics.jsonl's size at this point: a resumed run cuts the records written after it
            "metrics_offset": self.logger.offset if self.logger is not None else None,
            "position": position,
            "boundary": self._boundary if position is not None else None,
        }

    def restore(self, payload: dict[str, Any]) -> None:
        """Continue from a checkpoint written by this loop (after ``init`` has run).

        A mid-experience checkpoint restores the state at the start of its experience now;
        the experience then starts again (its ``experience_start`` sees what it saw the first
        time), and the saved batch-level state is laid over it where the batch loop resumes.
        """
        s = self.state
        if payload["backbone"] != s.backbone.fingerprint:
            raise CheckpointError(f"The checkpoint was written for backbone {payload['backbone']}, not {s.backbone.fingerprint}; resume with the run's own config.")
        names = [name for name, _ in self.strategies]
        if payload["strategy_names"] != names:
            raise CheckpointError(f"The checkpoint was written by strategies {payload['strategy_names']}, not {names}; resume with the run's own config.")
        if payload.get("num_experiences", len(self.stream)) != len(self.stream):
            raise CheckpointError(f"The checkpoint was written for a stream of {payload['num_experiences']} experiences, not {len(self.stream)}; resume with the run's own config.")
        self._init()
        mid = payload if payload.get("position") is not None else None
        base = payload["boundary"] if mid is not None else payload
        if mid is not None and base is None:
            raise CheckpointError("The mid-experience checkpoint lacks the state at the start of its experience; it is damaged, so start the run again.")
        self._boundary = base if mid is not None else None
        self._mid = mid
        self.start = payload["next_experience"]
        s.step = base["step"]
        s.seen_classes = list(base["seen_classes"])
        self._load_models(base)
        self._saved_optimizer = base["optimizer"]
        metrics = base["metrics"]
        restored = AccuracyMatrix.from_list(metrics["accuracy"])
        restored.notes.update(metrics.get("notes", {}))  # e.g. skipped non-finite steps so far
        self.accuracy = restored
        s.metrics["accuracy_matrix"] = restored
        self.baseline = metrics["baseline"]
        self.timings = list(metrics["timings"])
        set_rng_state(base["rng"])

    def _load_models(self, payload: dict[str, Any]) -> None:
        """The head's and the strategies' saved state, with one-sentence errors."""
        s = self.state
        if s.head is not None and payload["head"] is not None:
            try:
                s.head.load_state_dict(payload["head"])
            except (RuntimeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"The checkpoint's head does not fit this run ({condense(str(exc), 160)}); the number of classes or the backbone changed, so resume with the run's own config.") from exc
        for name, plugin in self.strategies:
            if name in payload["strategies"] and hasattr(plugin, "load_state_dict"):
                try:
                    plugin.load_state_dict(payload["strategies"][name])
                except DriftpromptError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a plugin's own loading code
                    raise CheckpointError(f"Strategy '{name}' cannot load its saved state ({type(exc).__name__}: {condense(str(exc), 160)}); resume with the run's own config and plugin version.") from exc

    def _resume_batch_state(self) -> dict[str, Any] | None:
        """Lay a mid-experience checkpoint over the restarted experience; returns its position."""
        mid, self._mid = self._mid, None
        if mid is None:
            return None
        s, cfg = self.state, self.config
        s.step = mid["step"]
        self._load_models(mid)
        if s.optimizer is not None:
            # a strategy's load_state_dict may have replaced its parameters: rebuild over them
            held = {id(p) for g in s.optimizer.param_groups for p in g["params"]}
            if held != {id(p) for g in self.hooks.trainable_parameters(s) for p in g["params"]}:
                s.optimizer = None
                self._build_optimizer(cfg.train.optimizer, True)
                if self.scheduler is not None:
                    self.scheduler.optimizer = s.optimizer
            if mid["optimizer"] is not None and s.optimizer is not None:
                load_optimizer_state_by_name(s.optimizer, mid["optimizer"])
        if self.scheduler is not None and mid.get("scheduler") is not None:
            self.scheduler.load_state_dict(mid["scheduler"])
        set_rng_state(mid["rng"])
        return dict(mid["position"])

    def _save(self, position: dict[str, Any] | None = None) -> None:
        if self.state.run_dir is not None and self.state.dist.is_main:
            atomic_save(self.checkpoint_payload(position), self.state.run_dir / CHECKPOINT_NAME)

    # --- the loop ----------------------------------------------------------------------------

    def fit(self) -> AccuracyMatrix:
        """Run every remaining experience; returns the accuracy matrix."""
        s, cfg = self.state, self.config
        self._init()
        s.phase = "train"
        self.hooks.fire(Event.FIT_START, s)
        if cfg.eval.future and self.baseline is None and self.start == 0:
            self.baseline = self._evaluate_untrained()
        experiences = self._bar(range(self.start, len(self.stream)), len(self.stream) - self.start, "experiences", leave=True)
        for i in experiences:
            if cfg.checkpoint.every_steps and self._mid is None:
                # what a mid-experience checkpoint restarts the experience from
                self._boundary = copy.deepcopy(self.checkpoint_payload())
            self._train_experience(i)
            self.start = i + 1
            self._save()
            if s.stop:
                break
        s.phase = "done"
        self.hooks.fire(Event.FIT_END, s)
        return self.accuracy

    def begin_experience(self, i: int) -> torch.Tensor | None:
        """Enter experience ``i``: seen classes, ``experience_start``, optimizer and schedule.

        Returns the mask of classes the head may predict while training it.
        """
        s, cfg = self.state, self.config
        exp = self.stream[i]
        s.experience = exp
        s.phase = "train"
        s.seen_classes = s.seen_classes + [c for c in exp.classes if c not in s.seen_classes]
        if cfg.train.reset_optimizer:
            s.optimizer = None
        self.hooks.fire(Event.EXPERIENCE_START, s)
        self._build_optimizer(cfg.train.optimizer, cfg.train.reset_optimizer)
        if self._saved_optimizer is not None and s.optimizer is not None and not cfg.train.reset_optimizer:
            load_optimizer_state_by_name(s.optimizer, self._saved_optimizer)
        self._saved_optimizer = None
        steps = cfg.train.epochs * math.ceil(len(exp.train) / cfg.train.batch_size)
        schedules = {"cosine": lambda o: cosine_schedule(o, steps), "cosine_epoch": lambda o: cosine_epoch_schedule(o, cfg.train.epochs)}
        self.scheduler = schedules[cfg.train.scheduler](s.optimizer) if cfg.train.scheduler in schedules and s.optimizer is not None else None
        from .optim import log_effective_lrs  # the learning rate each group really trains at

        log_effective_lrs(s.optimizer, cfg.train.optimizer.lr, self.logger if s.dist.is_main else None, s.step, i)
        return self._allowed(s.seen_classes)

    def _train_experience(self, i: int) -> None:
        s, cfg = self.state, self.config
        exp = self.stream[i]
        seen = self.begin_experience(i)
        if s.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(s.device)
        started = time.perf_counter()
        images_seen = 0
        # An online stream is a single pass in arrival order, whatever train.epochs says.
        online = bool(getattr(self.stream, "online", False))
        epochs = 1 if online else cfg.train.epochs
        position = self._mid["position"] if self._mid is not None else None  # resuming inside this experience
        for epoch in self._bar(range(epochs), epochs, f"exp {i} epochs"):
            if position is not None and epoch < position["epoch"]:
                continue  # trained before the mid-experience checkpoint
            s.epoch = epoch
            self.hooks.fire(Event.EPOCH_START, s)
            if isinstance(self.scheduler, EpochSchedule) and epoch > 0:
                self.scheduler.step()
            loss_sum = torch.zeros((), device=s.device)
            n_batches = 0
            self._last_step_bad = None
            skip = 0
            if position is not None:
                self._resume_batch_state()
                skip, n_batches, images_seen = position["batch"], position["n_batches"], position["images_seen"]
                loss_sum = position["loss_sum"].to(s.device)
                self.curves.load_state_dict(position.get("curves"), s.device)
                started -= position["train_seconds"]
                position = None
            batches = _batches(exp.train, cfg.train.batch_size, not online, data_generator(cfg.seed, i, epoch), cfg.train.num_workers)
            for b, (images, targets, extras) in enumerate(self._bar(batches, math.ceil(len(exp.train) / cfg.train.batch_size), f"exp {i} epoch {epoch}")):
                if b < skip:
                    continue  # trained before the mid-experience checkpoint (same order: same generator)
                s.batch_index = b
                if images.shape[0] < s.dist.world_size:
                    continue  # a last batch smaller than the number of processes: every process skips it
                images_seen += images.shape[0]
                if self.train_step(images, targets, extras, seen) is not None:
                    bad = self._last_step_bad
                    loss = s.loss.detach()  # type: ignore[union-attr]
                    loss_sum += loss if bad is None else torch.where(bad, torch.zeros_like(loss), loss)
                    n_batches += 1
                    self._postfix(self.curves.after_step(s, bad, self.logger))
                if cfg.checkpoint.every_steps and s.step % cfg.checkpoint.every_steps == 0 and s.step != self._saved_step:
                    self._saved_step = s.step
                    self.check_numerics(reset=False)  # no checkpoint of a non-finite state
                    self._save({"epoch": epoch, "batch": b + 1, "n_batches": n_batches, "images_seen": images_seen, "loss_sum": loss_sum.detach().cpu().clone(), "train_seconds": time.perf_counter() - started, "curves": self.curves.state_dict()})
                if s.stop:
                    break
            # before epoch_end, the evaluation and the checkpoint: nothing sees a NaN state
            skipped = self.check_numerics()
            self.hooks.fire(Event.EPOCH_END, s)
            s.dist.all_reduce_(loss_sum, "the loss reduction")
            extra: dict[str, Any] = {}
            if nonfinite_mode(s) == "skip":
                extra["skipped_steps"] = skipped
                self.accuracy.notes["skipped_nonfinite_steps"] = self.accuracy.notes.get("skipped_nonfinite_steps", 0) + skipped
            if self.logger is not None and n_batches:
                good = n_batches * s.dist.world_size - skipped
                self.logger.log("train", s.step, experience=i, epoch=epoch, loss=float(loss_sum) / good if good > 0 else None, **extra)
            if s.stop:
                break
        train_seconds = time.perf_counter() - started
        self.curves.flush(s, self.logger)  # the experience's last steps: its curves end with it
        if getattr(exp.train, "resident", None) is not None:
            exp.train.to_device("cpu")  # its device copy (train.data_on_device) is not read again
        self.hooks.fire(Event.EXPERIENCE_END, s)
        started = time.perf_counter()
        self._evaluate(i)
        from driftprompt.streams.base import unreadable_images

        skipped = unreadable_images(self.stream)
        if skipped:  # trained and scored on fewer images than the stream holds: the summary says so
            self.accuracy.notes["skipped_unreadable_images"] = skipped
        eval_seconds = time.perf_counter() - started
        timing = {"experience": i, "train_seconds": train_seconds, "eval_seconds": eval_seconds, "train_images_per_s": images_seen / max(train_seconds, 1e-9)}
        if s.device.type == "cuda":
            timing["peak_memory_mb"] = torch.cuda.max_memory_allocated(s.device) / 2**20
        self.timings.append(timing)
        if self.logger is not None:
            row = self.accuracy.values[i]
            self.logger.log("experience", s.step, **self.timings[-1], accuracy=[None if math.isnan(v) else float(v) for v in row], **self.accuracy.summary(self.baseline))
            self.logger.log_accuracy_matrix(self.accuracy.values, s.step)
            self.logger.log_scalars("accuracy", i, accuracy_curves(row, i), axis="experience", jsonl=False)  # x: the experience
            if strategy_metrics(s.metrics):
                self.logger.log_scalars("strategy_metrics", s.step, strategy_metrics(s.metrics), extra={"experience": i})
        if s.dist.is_main:
            log.info(format_experience_line(i, len(self.stream), self.accuracy.values[i], train_seconds, eval_seconds))

    def train_step(self, images: torch.Tensor, targets: torch.Tensor, extras: dict[str, Any], allowed: torch.Tensor | None) -> torch.Tensor | None:
        """One training batch, from ``batch_start`` to ``batch_end``; returns the loss (or None).

        ``allowed`` is the mask of classes the head may predict (see ``_allowed``). Public so
        that benchmarks time exactly the path a run takes.
        """
        s = self.state
        from .compile import prepare_step  # train.compile and train.data_on_device, decided once

        prepare_step(s, self.config, getattr(s.experience, "train", None))
        self._total = images.shape[0]
        images, targets, extras = self._share(images, targets, extras)
        self._local = images.shape[0]
        self._set_batch(images, targets, extras)
        self.hooks.fire(Event.BATCH_START, s)
        self._forward(allowed)
        if s.optimizer is not None:
            self._optimize(self.config.train.grad_clip)
        self.hooks.fire(Event.BATCH_END, s)
        return s.loss

    def eval_step(self, images: torch.Tensor, targets: torch.Tensor, extras: dict[str, Any], allowed: torch.Tensor | None) -> torch.Tensor:
        """One evaluation batch (``eval_batch_start`` to ``eval_batch_end``) without autograd; returns logits."""
        s = self.state
        from .compile import prepare_step

        prepare_step(s, self.config, getattr(s.eval_experience, "test", None))
        with torch.no_grad():
            self._set_batch(images, targets, extras)
            self.hooks.fire(Event.EVAL_BATCH_START, s)
            logits = self._forward(allowed)
            self.hooks.fire(Event.EVAL_BATCH_END, s)
        return logits

    def _eval_accuracy(self, exp: Any, allowed: torch.Tensor | None) -> float | None:
        """Accuracy (percent) on ``exp``'s test split; ``None``, with a warning, when it has no image.

        An experience without test images has no accuracy: it is marked in the accuracy
        matrix (left out of the averages, listed in the summary) instead of counting as 0%.
        """
        s, cfg = self.state, self.config
        if len(exp.test) == 0:
            if all(len(e.test) == 0 for e in self.stream):
                raise StreamError("No experience of the stream has a test image, so no accuracy can be measured; give the stream test data (e.g. stream.options.test_per_class).")
            if self.accuracy.mark_empty(exp.index):
                log.warning("Experience %d has no test images: it is left out of the accuracy averages (summary.json lists it under empty_test_experiences).", exp.index)
            return None
        s.eval_experience = exp
        # [correct predictions, batches with NaN logits], summed on the device, read once
        tally = torch.zeros(2, dtype=torch.long, device=s.device)
        total = 0
        for b, batch in enumerate(_batches(exp.test, cfg.eval.batch_size, False, None, cfg.train.num_workers)):
            s.batch_index = b
            total += batch[0].shape[0]
            images, targets, extras = self._share(*batch)
            if images.shape[0] == 0:
                continue
            logits = self.eval_step(images, targets, extras, allowed)
            tally[0] += (logits.argmax(dim=1) == s.targets).sum()
            tally[1] += torch.isnan(logits).any()  # argmax of NaN logits is a silent, meaningless class
        s.dist.all_reduce_(tally, "the evaluation reduction")
        correct, nan_batches = tally.tolist()
        if nan_batches:
            names = ", ".join(repr(name) for name, _ in self.strategies) or "none"
            raise PluginError(
                f"Evaluating experience {exp.index} gave NaN logits in {nan_batches} batch(es), so its accuracy would be meaningless; "
                f"a strategy's state (strategies: {names}) or the head is not finite: fix the strategy, or lower the learning rate."
            )
        return 100.0 * correct / max(total, 1)

    def _evaluate(self, i: int) -> None:
        """Accuracy row ``i``: every seen experience, and future ones when asked.

        ``eval.classes`` sets the classes a prediction may take: ``seen`` (those trained so
        far, plus the evaluated experience's own when it lies in the future), as CODA-Prompt
        scores (CODA-Prompt learners/default.py:179, logits cut to ``valid_out_dim``); or
        ``all``, every class of the stream, as the L2P and DualPrompt ports score
        (l2p-pytorch engine.py:119-131, masked only for task-incremental runs). A
        task-incremental stream always predicts among the task's own classes. Images take the
        evaluation view ``eval.resize`` / ``eval.interpolation`` (see
        ``ViTBackbone.evaluating``).
        """
        import contextlib

        s, cfg = self.state, self.config
        check_evaluation(cfg, self.strategies, self.stream, s.backbone)  # also checked before a run starts
        mode = getattr(cfg.eval, "classes", "seen")
        task_incremental = getattr(self.stream, "scenario", "") == "task_incremental"
        view = getattr(s.backbone, "evaluating", None)
        resize, interpolation = getattr(cfg.eval, "resize", None), getattr(cfg.eval, "interpolation", "model")
        s.phase = "eval"
        self.hooks.fire(Event.EVAL_START, s)
        last = len(self.stream) if cfg.eval.future else i + 1
        with view(resize, None if interpolation == "model" else interpolation) if view is not None else contextlib.nullcontext():
            for j in range(last):
                exp = self.stream[j]
                if task_incremental:  # the task id is known at test time: predict among its classes
                    classes = exp.classes
                elif mode == "all":
                    classes = list(range(s.num_classes))
                else:
                    classes = s.seen_classes if j <= i else s.seen_classes + exp.classes
                self.accuracy.set(i, j, self._eval_accuracy(exp, self._allowed(classes)))
        s.eval_experience = None
        s.phase = "train"
        self.hooks.fire(Event.EVAL_END, s)

    def _evaluate_untrained(self) -> list[float]:
        """Accuracy of the untrained model on each experience, its own classes unmasked (for FWT).

        Uses the same evaluation view of the images as :meth:`_evaluate`.
        """
        import contextlib

        s, cfg = self.state, self.config
        view = getattr(s.backbone, "evaluating", None)
        interpolation = getattr(cfg.eval, "interpolation", "model")
        s.phase = "eval"
        with view(getattr(cfg.eval, "resize", None), None if interpolation == "model" else interpolation) if view is not None else contextlib.nullcontext():
            out = [self._eval_accuracy(exp, self._allowed(exp.classes)) for exp in self.stream]
        s.eval_experience = None
        s.phase = "train"
        return out


class TestTimeLoop(_Loop):
    """Adapt online on a test stream, predicting each sample after its adaptation steps.

    The stream yields ``(images, targets, extras)`` batches: one image per batch for
    sample-wise streams. ``extras`` may carry ``"domain"`` (per-sample names) for per-domain
    online accuracy. Predictions are recorded in ``state.metrics["online"]``.

    A batch of B > 1 samples is one adaptation unit: the strategies see it whole, and a
    strategy whose samples are independent (``tpt`` with ``episodic``) adapts each one with
    its own prompt inside that one step. When a strategy declares ``sequential_samples``
    (true: each sample's adaptation depends on the previous one's, as ``dynaprompt``'s prompt
    buffer with ``per_sample: true``), the loop runs the samples of the batch one after the
    other instead, each with its own events, optimizer and prediction, and hands every one
    the whole batch's raw images in ``state.batch["batch_raw"]`` with its place in
    ``state.batch["batch_position"]``, so that work that does not depend on the earlier
    samples (views, image features) can be done once per batch.

    Args:
        state: the shared state (``seen_classes`` gives the classes predictions may take;
            empty means all of the head's classes).
        hooks: the run's plugin manager.
        strategies: ``(name, plugin)`` pairs in config order.
        steps: adaptation steps per sample (0 evaluates the source model online).
        optimizer: ``OptimizerConfig`` for the adaptation optimizer.
        reset_optimizer: a fresh optimizer (and its moments) for every sample.
    """

    def __init__(
        self,
        state: State,
        hooks: Hooks,
        strategies: list[tuple[str, Any]],
        steps: int,
        optimizer: Any,
        reset_optimizer: bool = True,
        logger: Any = None,
        progress: bool | None = None,
        episodic: bool = False,
    ) -> None:
        super().__init__(state, hooks, strategies, logger, progress)
        self.steps = steps
        self.optimizer_options = optimizer
        self.reset_optimizer = reset_optimizer
        self.episodic = episodic
        self.sync_gradients = False

    def run(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]], total: int | None = None) -> dict[str, Any]:
        """Consume the stream; returns online accuracy overall and per domain, and latency."""
        s = self.state
        self._init()
        allowed = self._allowed(s.seen_classes) if s.seen_classes else None
        s.phase = "predict"
        self.hooks.fire(Event.TEST_STREAM_START, s)
        d = s.dist
        records: list[tuple[int, int, list[bool], list[str] | None]] = []  # (position, samples, hits, domains)
        started = time.perf_counter()
        online = OnlineCurves(getattr(getattr(s.config, "log", None), "every_steps", 50))  # running accuracy, collapse resets
        for n, (images, targets, extras) in enumerate(self._bar(batches, total, "test samples")):
            # Several processes: independent (episodic) samples are dealt out round-robin; a
            # continual stream is sequential by nature and runs on rank 0 alone.
            if d.enabled and ((self.episodic and n % d.world_size != d.rank) or (not self.episodic and not d.is_main)):
                continue
            s.batch_index = n
            parts: list[torch.Tensor] = []  # per-part hits, read back once per batch
            done = 0
            for part in self._split(images, targets, extras):
                logits, labels = self._adapt_and_predict(*part, allowed)
                if labels is not None:
                    parts.append(logits.argmax(dim=1) == labels)
                done += part[0].shape[0]
                if s.stop:
                    break
            hits: list[bool] = torch.cat(parts).tolist() if parts else []
            domains = extras.get("domain")
            records.append((n, done, hits, [str(x) for x in domains][:done] if domains is not None else None))
            self._postfix(online.after_sample(done, hits, records[-1][3], s.metrics, self.logger))
            if s.stop:
                break
        skipped = self.check_numerics()  # the adaptation steps since the last periodic check
        seconds = time.perf_counter() - started
        s.phase = "done"
        # gathered back in stream order on every process
        records = sorted((r for part in d.all_gather_object(records, "gathering test-time results") for r in part), key=lambda r: r[0])
        count = sum(r[1] for r in records)
        correct = sum(sum(r[2]) for r in records)
        per_domain: dict[str, list[int]] = {}
        for _, _, hits, domains in records:
            for dom, h in zip(domains or [], hits):
                slot = per_domain.setdefault(dom, [0, 0])
                slot[0] += int(h)
                slot[1] += 1
        result = {
            "online_accuracy": 100.0 * correct / max(count, 1),
            "per_domain": {dom: 100.0 * c / t for dom, (c, t) in per_domain.items()},
            "samples": count,
            "seconds_per_sample": seconds * (d.world_size if self.episodic else 1) / max(count, 1),
        }
        if nonfinite_mode(s) == "skip":
            result["skipped_nonfinite_steps"] = skipped
        s.metrics["online"] = result
        self.hooks.fire(Event.TEST_STREAM_END, s)
        online.finish(s.metrics, self.logger)  # the last point, with the metrics published at test_stream_end
        if self.logger is not None:
            self.logger.log("test_time", s.step, **result)
        return result

    def _split(self, images: torch.Tensor, targets: torch.Tensor | None, extras: dict[str, Any]) -> list[tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]]:
        """The batch as one unit, or sample by sample when a strategy declares ``sequential_samples``."""
        B = images.shape[0]
        if B <= 1 or not any(getattr(plugin, "sequential_samples", False) for _, plugin in self.strategies):
            return [(images, targets, extras)]

        def cut(v: Any, j: int) -> Any:
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == B:
                return v[j : j + 1]
            if isinstance(v, (list, tuple)) and len(v) == B:
                return type(v)(v[j : j + 1])
            return v

        parts = []
        for j in range(B):
            part = {k: cut(v, j) for k, v in extras.items()}
            part["batch_position"] = j
            if extras.get("raw") is not None:
                part["batch_raw"] = extras["raw"]
            parts.append((images[j : j + 1], None if targets is None else targets[j : j + 1], part))
        return parts

    def _adapt_and_predict(self, images: torch.Tensor, targets: torch.Tensor | None, extras: dict[str, Any], allowed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One adaptation unit: ``test_sample_start``, the steps, the prediction, ``test_sample_end``."""
        s = self.state
        # Labels stay out of the state until the prediction is made: adaptation is unsupervised.
        self._set_batch(images, None, extras)
        labels = targets.to(s.device) if targets is not None else None
        self.hooks.fire(Event.TEST_SAMPLE_START, s)
        if self.reset_optimizer:
            s.optimizer = None
        s.phase = "adapt"
        self._build_optimizer(self.optimizer_options, self.reset_optimizer)
        for _ in range(self.steps if s.optimizer is not None else 0):
            s.phase = "adapt"
            self.hooks.fire(Event.ADAPT_STEP_START, s)
            s.clear_batch()
            self._forward(allowed)
            self._optimize(None)
            self.hooks.fire(Event.ADAPT_STEP_END, s)
        s.phase = "predict"
        s.clear_batch()
        with torch.no_grad():
            logits = self._forward(allowed)
        s.targets = labels
        self.hooks.fire(Event.TEST_SAMPLE_END, s)
        return logits, labels


def _batches(dataset: Any, batch_size: int, shuffle: bool, generator: torch.Generator | None, num_workers: int) -> Iterator:
    """Batches of ``dataset``; cut on the device once ``prepare_step`` made it resident there."""
    from driftprompt.streams.base import iterate

    return iterate(dataset, batch_size, shuffle, generator, num_workers)


MASKED_TARGET_KEY = "engine.masked_target"
NONFINITE_CHECK_EVERY = 100  # optimizer steps between reads of the flags within an epoch
HUGE_LOSS = 1e30  # a term this large overflows fp32 once summed: as good as non-finite
_GRADIENT = "<gradient>"
_MASKED = "<masked target>"


def cross_entropy(state: State) -> torch.Tensor:
    """Cross-entropy of ``state.logits`` against ``state.targets``, computed in fp32.

    While training, it also records on the device (no host sync) whether some target's logit
    was masked by :func:`mask_logits`, so that the resulting huge or infinite loss is
    reported with its cause.
    """
    assert state.logits is not None and state.targets is not None
    logits = state.logits
    if state.training and logits.dim() == 2 and state.targets.dim() == 1 and not state.targets.is_floating_point():
        target_logit = logits.detach().gather(1, state.targets.clamp(0, logits.shape[1] - 1)[:, None])
        # mask_logits writes the minimum of the dtype it masked in (fp32, or bf16 under autocast)
        value = target_logit.float()
        masked = ((value == torch.finfo(logits.dtype).min) | (value == torch.finfo(torch.bfloat16).min)).any()
        prev = state.plugin_state.get(MASKED_TARGET_KEY)
        state.plugin_state[MASKED_TARGET_KEY] = masked if prev is None else prev | masked
    return F.cross_entropy(logits.float(), state.targets)


def nonfinite_mode(state: State) -> str:
    """``train.nonfinite`` of the run's config: "stop" (the default) or "skip"."""
    return str(getattr(getattr(state.config, "train", None), "nonfinite", "stop"))


class NonFiniteGuard:
    """Device-side record of bad optimizer steps, read only at sync points.

    Each step folds ``torch.isfinite`` of every loss term (a term beyond ``HUGE_LOSS`` counts
    as non-finite) and of the gradient norm into device tensors: per term, the first bad step
    since the last reset, and the number of bad steps. :meth:`check` reads them all with
    one transfer.

    Args:
        device: where the flags live (the training device).
        step: the run's step counter when the record starts.
    """

    def __init__(self, device: torch.device, step: int) -> None:
        self.device = device
        self.offset = step
        self._new()

    def _new(self) -> None:
        self.count = torch.zeros((), dtype=torch.long, device=self.device)
        self.bad_steps = torch.zeros((), dtype=torch.long, device=self.device)
        self.first: dict[str, torch.Tensor] = {}

    def _mark(self, name: str, flag: torch.Tensor) -> None:
        cur = self.first.get(name)
        if cur is None:
            cur = torch.full((), -1, dtype=torch.long, device=self.device)
        self.first[name] = torch.where((cur < 0) & flag, self.count, cur)

    def observe(self, terms: dict[str, torch.Tensor], grad_norm: torch.Tensor | None, masked: torch.Tensor | None) -> torch.Tensor:
        """Fold one step in; returns its device-side ``bad`` flag (a 0-dim bool tensor)."""
        bad = torch.zeros((), dtype=torch.bool, device=self.device)
        for name, term in terms.items():
            t = term.detach().float()
            flag = ~(torch.isfinite(t) & (t.abs() < HUGE_LOSS)).all()
            self._mark(name, flag)
            bad = bad | flag
        if grad_norm is not None:
            flag = ~torch.isfinite(grad_norm.detach().to(self.device))
            self._mark(_GRADIENT, flag)
            bad = bad | flag
        if masked is not None:
            self._mark(_MASKED, masked & bad)
        self.bad_steps += bad
        self.count += 1
        return bad

    def check(self, state: State, hooks: Hooks, mode: str, reset: bool = True, reduce: bool = True) -> int:
        """Read the record: raise in ``stop`` mode, else return the bad steps since the last reset.

        With ``reduce``, the count is summed over processes first, so that every process of a
        data-parallel run stops (or counts) together.
        """
        names = list(self.first)
        bad_anywhere = state.dist.all_reduce_(self.bad_steps.clone(), "the non-finite check") if reduce else self.bad_steps
        count, bad_total, *firsts = torch.stack([self.count, bad_anywhere, *(self.first[n] for n in names)]).tolist()
        found = {n: self.offset + v for n, v in zip(names, firsts) if v >= 0}
        if reset:
            self.offset += count
            self._new()
        if bad_total == 0 or mode == "skip":
            return bad_total
        raise PluginError(self._message(state, hooks, found))

    def _message(self, state: State, hooks: Hooks, found: dict[str, int]) -> str:
        if not any(n != _MASKED for n in found):
            return "Training stopped: another process met a non-finite loss or gradient (see its log); fix the strategy's loss, or set train.nonfinite: skip to drop such steps."
        step = min(v for n, v in found.items() if n != _MASKED)
        terms = [n for n, v in found.items() if v == step and n not in (_GRADIENT, _MASKED)]
        owners = hooks.loss_terms_by_strategy(state) if terms else {}
        strategies = [name for name, _ in hooks.strategies]
        if terms:
            what = ", ".join(f"loss term '{t}' of strategy '{owners.get(t, '/'.join(strategies) or '?')}'" for t in terms)
            what += (" is" if len(terms) == 1 else " are") + " not finite (nan, inf, or beyond 1e30)"
        else:
            what = f"the gradient of the trainable parameters (strategies {', '.join(repr(n) for n in strategies)}) is not finite"
        if found.get(_MASKED) == step:
            return (
                f"Training stopped at step {step}: {what} because a training target's class logit was masked (mask_logits sets it to the dtype's minimum, "
                "so its cross-entropy is about 3e38 or inf), as when replayed old-class samples meet a mask of the current experience's classes; "
                "keep the targets' classes allowed (e.g. mask_current: false), or set train.nonfinite: skip to drop such steps."
            )
        return f"Training stopped at step {step}: {what}; lower the learning rate or fix the strategy's loss, or set train.nonfinite: skip to drop such steps (their update is not applied)."
