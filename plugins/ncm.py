"""Nearest class mean on frozen features: a gradient-free continual baseline.

Class means of the frozen [CLS] features are accumulated over each experience's training data
(the classifier of iCaRL, Rebuffi et al., CVPR 2017, and of the SimpleCIL baseline, Zhou et
al., 2023, which uses cosine similarity to prototypes). Old means never change, so with a frozen
backbone this strategy cannot forget; it is the reference that prompt methods must beat.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from driftprompt.engine import ConfigError, State, hookimpl


class NCM:
    """Classify by similarity to running class means of frozen features.

    Args:
        metric: ``"cosine"`` (cosine similarity to the normalised means, as SimpleCIL) or
            ``"euclidean"`` (negative squared distance, as iCaRL's NCM).
    """

    def __init__(self, metric: str = "cosine") -> None:
        if metric not in ("cosine", "euclidean"):
            raise ConfigError(f"ncm option 'metric' must be 'cosine' or 'euclidean', got {metric!r}.")
        self.metric = metric
        self.sums: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self._base: tuple[torch.Tensor, torch.Tensor] = (torch.zeros(0), torch.zeros(0))

    def _ensure(self, state: State) -> None:
        if self.sums is None or self.counts is None:
            dim = state.backbone.embed_dim
            self.sums = torch.zeros(state.num_classes, dim, device=state.device, dtype=torch.float64)
            self.counts = torch.zeros(state.num_classes, device=state.device, dtype=torch.float64)
        else:  # restored from a checkpoint (loaded on the CPU): move, never reset
            self.sums, self.counts = self.sums.to(state.device), self.counts.to(state.device)

    @hookimpl
    def experience_start(self, state: State) -> None:
        self._ensure(state)
        assert self.sums is not None and self.counts is not None
        self._base = (self.sums.clone(), self.counts.clone())

    @hookimpl
    def experience_end(self, state: State) -> None:
        """Under torchrun every process summed its own share of the data: add the shares up."""
        assert self.sums is not None and self.counts is not None
        state.dist.reduce_delta_(self.sums, self._base[0], "the class-mean reduction")
        state.dist.reduce_delta_(self.counts, self._base[1], "the class-mean reduction")

    @hookimpl
    def batch_start(self, state: State) -> None:
        """Accumulate the batch's frozen features into per-class sums (training phase only)."""
        self._ensure(state)
        assert self.sums is not None and self.counts is not None and state.targets is not None
        feats = state.compute_query().to(torch.float64)
        self.sums.index_add_(0, state.targets, feats)
        self.counts.index_add_(0, state.targets, torch.ones_like(state.targets, dtype=torch.float64))

    def means(self) -> torch.Tensor:
        assert self.sums is not None and self.counts is not None
        return (self.sums / self.counts.clamp_min(1).unsqueeze(1)).float()

    @hookimpl
    def forward(self, state: State) -> torch.Tensor:
        self._ensure(state)
        feats = state.compute_query().float()
        state.features = feats
        means = self.means()
        if self.metric == "cosine":
            logits = F.normalize(feats, dim=1) @ F.normalize(means, dim=1).T
        else:
            logits = -torch.cdist(feats, means).pow(2)
        assert self.counts is not None
        # Classes without a single training sample cannot be predicted.
        return logits.masked_fill(self.counts == 0, torch.finfo(logits.dtype).min)

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums, "counts": self.counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.counts = state["sums"], state["counts"]


@hookimpl
def register_strategies(register):  # type: ignore[no-untyped-def]
    register("ncm", NCM)
