"""The one mutable object that the loops and every strategy share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .distributed import DistContext
from .prompts import Prompts

if TYPE_CHECKING:
    from .query_cache import QueryCache


@dataclass
class State:
    """Everything a strategy can read or change during a run.

    Strategies communicate only through this object: a prompt strategy writes
    ``state.prompts`` in ``before_forward``, the default forward reads it; a projection
    strategy edits gradients of the parameters listed in ``state.param_groups``.

    Attributes:
        backbone: the frozen feature extractor (``engine.backbones.ViTBackbone``).
        head: the linear classifier over every class of the stream (unseen classes masked).
        device: where tensors live.
        amp_dtype: ``torch.bfloat16`` under autocast on CUDA, ``None`` for fp32.
        config: the validated run configuration.
        run_dir: where logs and checkpoints go (``None`` for in-memory runs).
        phase: "init", "train", "eval", "adapt", "predict" or "done".
        experience: the experience being trained (``streams.Experience``).
        eval_experience: the experience being evaluated during ``eval_*`` events.
        num_experiences: length of the stream.
        num_classes: classes in the whole stream (the head's width).
        seen_classes: classes of every experience trained so far, in arrival order.
        epoch, step, batch_index: counters; ``step`` counts optimizer steps over the run.
        inputs, targets: the current batch, already on ``device`` and normalised.
        batch: extras of the current batch (sample indices, task ids, domains).
        prompts: prompts to inject in the next forward pass; reset before each batch.
        query: the frozen [CLS] feature of ``inputs`` when a strategy asked for it.
        query_cache: the run's exact cache of queries by sample (``engine.query_cache``); the
            loop creates it from ``config.query_cache`` at the first batch.
        features: the (prompted) feature that the head consumed.
        logits, loss, loss_terms: outputs of the forward and loss stages.
        optimizer: the optimizer of the current experience or test sample.
        param_groups: the described parameter groups the optimizer was built from.
        backbone_trainable: some parameter inside the backbone trains (an adapter), so the
            default forward keeps autograd on even without prompts.
        metrics: figures of the run so far (accuracy matrix, online accuracy, timings).
        plugin_state: free space for strategies, keyed by strategy name.
        stop: set to ``True`` to end the current loop after the current batch or sample.
        dist: rank, world size and collectives; strategies that keep data statistics
            (class sums, selection counts, representation matrices) reduce them with it.
    """

    backbone: nn.Module
    head: nn.Module | None
    device: torch.device
    amp_dtype: torch.dtype | None = None
    config: Any = None
    run_dir: Path | None = None
    phase: str = "init"
    experience: Any = None
    eval_experience: Any = None
    num_experiences: int = 0
    num_classes: int = 0
    seen_classes: list[int] = field(default_factory=list)
    epoch: int = 0
    step: int = 0
    batch_index: int = 0
    inputs: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    batch: dict[str, Any] = field(default_factory=dict)
    prompts: Prompts = field(default_factory=Prompts)
    query: torch.Tensor | None = None
    features: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    loss_terms: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: torch.optim.Optimizer | None = None
    param_groups: list[dict[str, Any]] = field(default_factory=list)
    backbone_trainable: bool = False
    dist: DistContext = field(default_factory=DistContext)
    metrics: dict[str, Any] = field(default_factory=dict)
    plugin_state: dict[str, Any] = field(default_factory=dict)
    stop: bool = False
    query_cache: QueryCache | None = None

    @property
    def training(self) -> bool:
        """True while gradients flow into trainable parameters (train and adapt phases)."""
        return self.phase in ("train", "adapt")

    def seen_mask(self) -> torch.Tensor:
        """Boolean mask over the head's classes that are known so far."""
        mask = torch.zeros(self.num_classes, dtype=torch.bool, device=self.device)
        if self.seen_classes:
            mask[torch.as_tensor(self.seen_classes, device=self.device)] = True
        return mask

    def compute_query(self) -> torch.Tensor:
        """Return the frozen [CLS] feature of ``inputs``, computed at most once per batch.

        The pass runs without autograd on the same backbone instance as the prompted pass:
        no second model copy, no graph. When ``query_cache`` holds this batch's samples,
        computed in the same batch under the same weights, their stored queries are returned
        instead: the same bits, without the pass (see ``engine/query_cache.py``).
        """
        if self.query is None:
            assert self.inputs is not None, "compute_query() needs state.inputs"
            cache = self.query_cache
            query = cache.lookup(self) if cache is not None else None
            if query is None:
                query = self.backbone.query(self.inputs)
                if cache is not None:
                    cache.store(self, query)
            self.query = query
        return self.query

    def clear_batch(self) -> None:
        """Forget everything derived from the previous batch."""
        self.prompts = Prompts()
        self.query = None
        self.features = None
        self.logits = None
        self.loss = None
        self.loss_terms = {}
