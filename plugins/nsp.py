"""Visual Prompt Tuning in Null Space for Continual Learning (Lu et al., NeurIPS 2024).

NSP (written NSP^2 in the paper) trains prompts only in directions that leave the prompted
ViT's outputs on old experiences (approximately) unchanged. For prompt tokens P (L x D) that
enter the attention of block l next to image tokens X, the paper derives two consistency
conditions for an update Delta P:

* **affinity**: the scores between old image queries and the prompts' keys stay the same,
  Q_X W_k^T Delta P^T = 0, with Q_X the image tokens' queries (per head, multiplied by that
  head's key weights W_k, so every row lives in the D-dim input space of the prompts);
* **aggregation**: the attention that old image queries pay to the prompts, S_P (N x L), sees
  no change in what it aggregates, S_P Delta P = 0.

Delta P therefore has to lie in the null space of the uncentered covariance C_1 = sum Q^T Q
(D x D, channel axis) and, on the token axis, in that of C_2 = sum S_P^T S_P (L x L). Both are
accumulated over the training data of every experience so far (sums of per-batch means, as the
reference code). The null space of each is spanned by the right singular vectors past the
elbow of the singular values (:func:`~driftprompt.plugins.projection.elbow_index`: the largest
discrete second difference, after Gaussian smoothing for 128 values or more, the reference
code's "adaptive" rule), B_i the projector onto it.

The update the optimizer proposes is replaced by

    Delta P <- [eta_2 B_2 + (1 - eta_2) I] Delta P [eta_1 B_1 + (1 - eta_1) I]

with eta = 0.97 (CIFAR-100), which trades a little stability for plasticity. No engine change
is needed: the prompts are copied in ``before_optimizer_step``, the optimizer steps, and
``after_optimizer_step`` rewrites p = p_old + projected(Delta). ``normalize_projector``
divides each B_i by its Frobenius norm first, as the reference code does (the paper writes the
plain projector; the configs that reproduce the paper's figures turn it on).

LayerNorm sits between the prompts and the attention, which makes the conditions nonlinear. The
paper keeps each prompt token's LayerNorm statistics fixed instead: the prompt-distribution
loss sum over tokens of |mean(p) - mean(p_old)| + |std(p) - std(p_old)| (means over the D
channels, L1 averaged over tokens, p_old the prompt at the end of the previous experience),
weight 1, from the second experience on.

The covariances are read from the ordinary training forward passes of the last planned epoch
of each experience (every batch by default, the last ``samples`` images otherwise; the first
epoch is read too, as a fallback for single-pass experiences) by hooking ``norm1`` of the
prompted blocks: the queries are recomputed from its output with the block's own projections.
The strategy projects every group with ``role: prompt``: the channel side for any tensor whose
last axis is D, the token side when the group's tokens are the prompt tokens that enter at
that block (a shared (L, D) tensor in the deep slot or at layer 0); otherwise the token-side
projector is the identity.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from driftprompt.engine import ConfigError, State, hookimpl

from .projection import (
    UpdateSnapshot,
    WindowCollector,
    WindowedStatistics,
    attention_parts,
    key_weight,
    null_space_projector,
    optimizer_groups,
    per_layer_views,
    prompt_positions,
    token_layout,
)

log = logging.getLogger(__name__)

NAME = "nsp"


def prompt_distribution_loss(prompt: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """L1 distance of each token's channel mean and (biased) standard deviation to the previous prompt's."""
    p, q = prompt.float(), previous.float().to(prompt.device)
    mean = (p.mean(-1) - q.mean(-1)).abs().mean()
    std = (p.std(-1, unbiased=False) - q.std(-1, unbiased=False)).abs().mean()
    return mean + std


def project_update(delta: torch.Tensor, channel: torch.Tensor | None, tokens: torch.Tensor | None) -> torch.Tensor:
    """P_2 Delta P_1 over the token (second-to-last) and channel (last) axes of ``delta``."""
    out = delta.float()
    if channel is not None:
        out = out @ channel.to(out.device)
    if tokens is not None:
        out = tokens.to(out.device) @ out
    return out.to(delta.dtype)


def affinity_rows(q: torch.Tensor, w_k: torch.Tensor) -> torch.Tensor:
    """Rows q_h W_k,h (B*H*N, D) of the affinity term, from per-head queries (B, H, N, Dh)."""
    return torch.einsum("bhnd,hdf->bhnf", q.float(), w_k.float()).reshape(-1, w_k.shape[-1])


class NSP(WindowedStatistics):
    """Project prompt updates into the null space of old experiences' attention statistics.

    Args:
        eta: blend of the channel (affinity) null-space projector with the identity (0.97).
        eta_tokens: the same for the token (aggregation) projector (``None``: ``eta``).
        ln_weight: weight of the prompt-distribution loss (1.0).
        normalize_projector: divide each projector by its Frobenius norm (the reference code).
        samples: training images per epoch whose statistics are read (``None``: all of them).
    """

    def __init__(self, eta: float = 0.97, eta_tokens: float | None = None, ln_weight: float = 1.0, normalize_projector: bool = False, samples: int | None = None) -> None:
        eta_tokens = eta if eta_tokens is None else eta_tokens
        for what, value in (("eta", eta), ("eta_tokens", eta_tokens)):
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"nsp {what} must lie in [0, 1], got {value}.")
        if ln_weight < 0:
            raise ConfigError(f"nsp ln_weight must be non-negative, got {ln_weight}.")
        if samples is not None and int(samples) < 1:
            raise ConfigError(f"nsp samples must be at least 1 (or unset for every image), got {samples}.")
        self.eta, self.eta_tokens, self.ln_weight = float(eta), float(eta_tokens), float(ln_weight)
        self.normalize_projector = bool(normalize_projector)
        self.samples = samples
        self.affinity: dict[int, torch.Tensor] = {}  # layer -> C_1 (D x D), summed over experiences
        self.aggregation: dict[int, torch.Tensor] = {}  # layer -> C_2 (L x L)
        self.previous: dict[str, torch.Tensor] = {}  # "group/param/index" -> prompt at the end of the last experience
        self._projectors: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._acc: dict[tuple[str, int], torch.Tensor] = {}
        self._final: dict[tuple[str, int], torch.Tensor] = {}
        self._plan: list[tuple[str, torch.Tensor, Any, int]] | None = None
        self._plan_for: tuple[int, int] | None = None
        self._checked = False
        self._warned = False
        self._collector = WindowCollector(samples if samples is not None else 1 << 62)
        self._snapshot = UpdateSnapshot()

    # --- what to project ----------------------------------------------------------------------

    def plan(self, state: State) -> list[tuple[str, torch.Tensor, Any, int]]:
        """(name, parameter, index, layer) for every prompt slice of the declared groups."""
        key = (state.experience.index if state.experience is not None else -1, id(state.optimizer))
        if self._plan is None or self._plan_for != key:
            dim = state.backbone.embed_dim
            plan = []
            for group in optimizer_groups(state):
                if group.get("role") != "prompt":
                    continue
                for i, p in enumerate(group["params"]):
                    if p.dim() < 2 or p.shape[-1] != dim:
                        continue
                    try:
                        views = per_layer_views(p, group)
                    except ValueError as exc:
                        raise ConfigError(f"nsp cannot read group '{group.get('name')}': {exc}.") from exc
                    for layer, index in views:
                        state.backbone.check_layers([layer], f"nsp group '{group.get('name')}'")
                        plan.append((f"{group.get('name')}/{i}/{index if index is not Ellipsis else 'all'}", p, index, layer))
            self._plan, self._plan_for = plan, key
        return self._plan

    def _require(self, state: State) -> None:
        if self._checked:
            return
        self._checked = True
        if not self.plan(state):
            declared = [f"{g.get('name')} ({g.get('role')})" for g in optimizer_groups(state)]
            raise ConfigError(f"nsp found no prompt parameters (role 'prompt') among the declared groups {declared}; list a prompt strategy such as vpt with nsp.")

    # --- events -------------------------------------------------------------------------------

    @hookimpl
    def fit_start(self, state: State) -> None:
        for store in (self.affinity, self.aggregation, self.previous):
            for key, value in store.items():
                store[key] = value.to(state.device)  # type: ignore[index]
        self._projectors = {}

    @hookimpl
    def batch_start(self, state: State) -> None:
        if state.optimizer is None or not self._collector.active(state):
            return
        layers = {layer for _, _, _, layer in self.plan(state)}
        if layers:
            self._collector.attach(state, layers, self._record)

    def _record(self, state: State, layer: int, x: torch.Tensor, h: torch.Tensor) -> None:
        backbone = state.backbone
        block = backbone.model.blocks[layer]
        prefix = state.prompts.prefix_at(layer, x.shape[0])
        q, attn = attention_parts(block, h, prefix)
        layout = token_layout(state.prompts, layer, backbone.num_prefix_tokens, x.shape[1])
        image = layout["image"].to(x.device)
        rows = affinity_rows(q[:, :, image], key_weight(block))
        self._add(("affinity", layer), rows.T @ rows / rows.shape[0])
        positions = prompt_positions(state.prompts, layer, backbone.num_prefix_tokens, x.shape[1])
        if positions is not None:
            offset = 0 if prefix is None else prefix[0].shape[1]
            scores = attn[:, :, image][..., offset + positions.start : offset + positions.stop].reshape(-1, positions.stop - positions.start)
            self._add(("aggregation", layer), scores.T @ scores / scores.shape[0])

    def _add(self, key: tuple[str, int], value: torch.Tensor) -> None:
        self._acc[key] = self._acc[key] + value if key in self._acc else value

    @hookimpl(trylast=True)
    def before_optimizer_step(self, state: State) -> None:
        if state.phase != "train":
            return
        self._require(state)
        if self.affinity:
            self._snapshot.take({id(p): p for _, p, _, _ in self.plan(state)}.values())

    @hookimpl(tryfirst=True)
    def after_optimizer_step(self, state: State) -> None:
        if state.phase != "train" or not self._snapshot.saved:
            return
        by_param: dict[int, list[tuple[Any, int]]] = {}
        for _, p, index, layer in self.plan(state):
            by_param.setdefault(id(p), []).append((index, layer))

        def project(p: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
            for index, layer in by_param.get(id(p), []):
                channel, tokens = self._projector(layer)
                part = delta[index]
                if tokens is not None and part.shape[-2] != tokens.shape[0]:
                    tokens = None
                delta[index] = project_update(part, channel, tokens)
            return delta

        self._snapshot.apply(project)

    def _projector(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if layer not in self.affinity:
            return None, None
        if layer not in self._projectors:
            channel = null_space_projector(self.affinity[layer], self.eta, self.normalize_projector)
            tokens = null_space_projector(self.aggregation[layer], self.eta_tokens, self.normalize_projector) if layer in self.aggregation else None
            self._projectors[layer] = (channel, tokens)
        return self._projectors[layer]

    @hookimpl
    def loss_terms(self, state: State) -> dict[str, torch.Tensor] | None:
        if state.phase != "train" or not self.previous or self.ln_weight == 0 or state.optimizer is None:
            return None
        terms = [prompt_distribution_loss(p[index], self.previous[name]) for name, p, index, _ in self.plan(state) if name in self.previous]
        if not terms:
            return None
        return {"nsp_ln": self.ln_weight * torch.stack(terms).sum()}

    @hookimpl
    def experience_end(self, state: State) -> None:
        collected = self._end_collection(state, "nsp", "list a prompt strategy such as vpt with nsp.")
        if collected is None:
            return
        for (kind, layer), value in collected.items():
            store = self.affinity if kind == "affinity" else self.aggregation
            if layer in store and store[layer].shape != value.shape:
                log.warning("nsp: the prompts entering block %d changed length; its token-side statistics restart.", layer)
                store[layer] = value
            else:
                store[layer] = store[layer] + value if layer in store else value
        self.previous = {name: p[index].detach().clone() for name, p, index, _ in self.plan(state)}
        self._projectors = {}
        self._acc, self._final = {}, {}

    # --- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "affinity": {k: v.detach().cpu() for k, v in self.affinity.items()},
            "aggregation": {k: v.detach().cpu() for k, v in self.aggregation.items()},
            "previous": {k: v.detach().cpu() for k, v in self.previous.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.affinity = {int(k): v for k, v in state["affinity"].items()}
        self.aggregation = {int(k): v for k, v in state["aggregation"].items()}
        self.previous = dict(state["previous"])
        self._projectors = {}


@hookimpl
def register_strategies(register):  # type: ignore[no-untyped-def]
    register(NAME, NSP)
