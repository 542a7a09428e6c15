"""Prompt Gradient Projection for Continual Learning (Qiao et al., ICLR 2024), built on GPM.

PGP keeps a prompt-tuned ViT's outputs on old experiences unchanged by projecting later prompt
gradients orthogonally to the subspace that old experiences' representations span, with the
basis construction of GPM (Saha et al., ICLR 2021, "Gradient Projection Memory for Continual
Learning"):

1. after experience t (``experience_end``), stack the layer's representations R of a sample of
   its training data; keep the top singular directions U of R until their energy reaches
   epsilon * ||R||_F^2 (later experiences: GPM's incremental update, which only appends
   directions of the residual R - U U^T R, while old-plus-new energy is below the threshold);
2. while training later experiences (``before_optimizer_step``), g <- g - g U U^T along the
   channel axis of every projectable gradient.

Which representation protects which parameter (roles from ``trainable_parameters``):

* ``prompt`` (tokens entering block l): the input tokens of block l *together with the prompt
  tokens*, every token of every sampled image a row of R, so U lives in the D-dim channel
  space (the paper's formulation: a token-wise change Delta p with x Delta p^T = 0 for every
  old token leaves the attention scores with old tokens unchanged); epsilon 0.50;
* ``key`` (query-key matching): the frozen [CLS] queries of the sample; epsilon 0.97;
* ``prefix`` (its key half) and ``prefix_key``: the queries of block l's attention for every
  token, per head (the score q_h . k_h of each head is kept, so each head's slice of the key
  is projected with that head's basis); epsilon 0.50 (the prompt threshold). Prefix values
  are not projected, as in the paper;
* ``adapter`` groups that name a ``site`` (``qkv`` or ``proj``: the attention module of block
  l whose input they read, as the ``lora`` strategy declares its down projections A): the
  site's inputs. Adapter groups without a site, and up projections (``part: up``), are left
  free.

How the layer's token representations are collected: during the last ``samples`` training
images of the last planned epoch (the end of training, so the prompts are those the
experience ends with), ``norm1`` of each needed block is hooked in the ordinary training
forward passes: its input is the block's input token stream with every prompt in place, its
output the tokens the attention projects to queries. The first epoch is read as well, as a
fallback for single-pass (online) experiences, and replaced by the last epoch's collection. No extra backbone
pass runs, except (``forward_subspace`` only, first experience) one no-prompt pass per
collected batch.

The paper's channel-space version is the default (``space: channel``). The official code
(``space: sample``) builds R from exactly D sampled images (768 for ViT-B), one row per image
holding its flattened patch tokens, takes the SVD of the sample-space Gram R R^T (D x D because
the sample count equals the width) with the energy of its squared singular values, and applies
the resulting basis along the D channels of the prompt gradient: a basis over samples used as a
basis over channels, which only type-checks because both are 768. It also keeps, for the first
experience, one component fewer than the threshold criterion asks (it counts components whose
cumulative ratio is still below epsilon). Both are reproduced behind the flag.

``forward_subspace`` follows Fwd-Prompt (Zheng et al., 2024, "Beyond Anti-Forgetting:
Multimodal Continual Instruction Tuning with Positive Forward Transfer"): it also keeps a
subspace S of the frozen model's own representations (no prompts, a sample of the first
experience) and lets gradients through inside it, blocking only the old-experience directions
outside it: the blocked basis is orth((I - P_S) U). Fwd-Prompt's exact equations are not
public; this is our interpretation of its description.

With Adam the projected gradient is re-scaled element-wise, so the step leaves the allowed
subspace slightly (as in the paper's code, which uses Adam). ``project: update`` also
replaces the optimizer's whole update Delta by Delta - Delta U U^T after the step, which makes
the protection exact whatever the optimizer (momentum and weight decay included).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from driftprompt.engine import ConfigError, State, hookimpl

from .projection import (
    UpdateSnapshot,
    WindowCollector,
    WindowedStatistics,
    block_projector,
    frozen_block_inputs,
    gpm_extend,
    optimizer_groups,
    orthonormal_span,
    per_layer_views,
    prefix_key_index,
    remove_component,
    token_layout,
)

log = logging.getLogger(__name__)

NAME = "pgp"
ROLES = ("prompt", "key", "prefix", "prefix_key", "adapter")
SPACES = ("channel", "sample")
PROJECT = ("gradient", "update")
SITES = ("qkv", "proj")


def _check_threshold(value: float, what: str) -> float:
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ConfigError(f"pgp {what} must lie in (0, 1], got {value}.")
    return value


def _heads_of(key: str, state: State) -> int:
    return state.backbone.model.blocks[0].attn.num_heads if key.startswith("query:") else 1


class PGP(WindowedStatistics):
    """Project gradients of prompts, keys, prefixes and adapters orthogonally to old experiences' subspaces.

    Args:
        prompt_threshold: epsilon for prompt tokens, prefix keys and adapters (0.50, the paper's).
        key_threshold: epsilon for query-matching keys (0.97, the paper's).
        samples: training images per experience whose representations build the bases (768,
            as the official code).
        roles: roles of the declared groups to project (prompt, key, prefix, prefix_key, adapter).
        space: ``channel`` (the paper: D x D representation in channel space) or ``sample``
            (the official code: D images' flattened tokens, basis over samples).
        project: ``gradient`` (the paper) or ``update`` (also project the optimizer's step).
        forward_subspace: keep the frozen model's subspace open (Fwd-Prompt interpretation).
        forward_threshold: epsilon of that frozen subspace (0.97).
    """

    def __init__(
        self,
        prompt_threshold: float = 0.50,
        key_threshold: float = 0.97,
        samples: int = 768,
        roles: Sequence[str] = ROLES,
        space: str = "channel",
        project: str = "gradient",
        forward_subspace: bool = False,
        forward_threshold: float = 0.97,
    ) -> None:
        self.prompt_threshold = _check_threshold(prompt_threshold, "prompt_threshold")
        self.key_threshold = _check_threshold(key_threshold, "key_threshold")
        self.forward_threshold = _check_threshold(forward_threshold, "forward_threshold")
        unknown = sorted(set(roles) - set(ROLES))
        if unknown or not roles:
            raise ConfigError(f"pgp roles {list(roles)} are not all projectable; choose among {', '.join(ROLES)}.")
        if space not in SPACES:
            raise ConfigError(f"pgp space {space!r} does not exist; use one of {', '.join(SPACES)}.")
        if project not in PROJECT:
            raise ConfigError(f"pgp project {project!r} does not exist; use one of {', '.join(PROJECT)}.")
        if int(samples) < 1:
            raise ConfigError(f"pgp samples must be at least 1, got {samples}.")
        self.samples, self.roles, self.space, self.project = int(samples), tuple(roles), space, project
        self.forward_subspace = bool(forward_subspace)
        self.bases: dict[str, list[torch.Tensor]] = {}  # memory -> one orthonormal basis per channel block
        self.frozen: dict[str, list[torch.Tensor]] = {}  # memory -> frozen-model subspace (forward_subspace)
        self.experiences = 0  # experiences whose bases are stored
        self._projectors: dict[str, torch.Tensor] = {}
        self._plan: list[tuple[torch.Tensor, Any, str]] | None = None
        self._plan_for: tuple[int, int] | None = None
        self._checked = False
        self._warned = False
        self._acc: dict[str, Any] = {}
        self._final: dict[str, Any] = {}
        self._collector = WindowCollector(self.samples)
        self._snapshot = UpdateSnapshot()

    # --- what to project ------------------------------------------------------------------

    def _build_plan(self, state: State) -> list[tuple[torch.Tensor, Any, str]]:
        """(parameter, index, memory) for every projectable slice of the declared groups."""
        dim = state.backbone.embed_dim
        plan: list[tuple[torch.Tensor, Any, str]] = []
        for group in optimizer_groups(state):
            role = group.get("role")
            if role not in self.roles:
                continue
            if role == "adapter" and (group.get("part") == "up" or group.get("site") is None):
                # up projections read the adapter's rank space; an adapter without a site does
                # not say which representation it reads, so there is nothing to protect it with
                continue
            for p in group["params"]:
                if p.dim() == 0 or p.shape[-1] != dim:
                    continue
                try:
                    if role == "key":
                        views = [(-1, ...)]
                    elif role == "prefix":
                        views = prefix_key_index(p, group)
                    else:
                        views = per_layer_views(p, group)
                except ValueError as exc:
                    raise ConfigError(f"pgp cannot read group '{group.get('name')}': {exc}.") from exc
                for layer, index in views:
                    if role == "key":
                        memory = "key"
                    elif role == "prompt":
                        memory = f"tokens:{layer}"
                    elif role == "adapter":
                        site = group["site"]
                        if site not in SITES:
                            raise ConfigError(f"pgp cannot project group '{group.get('name')}': site {site!r} is not one of {', '.join(SITES)}.")
                        memory = f"site:{layer}:{site}"
                    else:
                        memory = f"query:{layer}"
                    if layer >= 0:
                        state.backbone.check_layers([layer], f"pgp group '{group.get('name')}'")
                    plan.append((p, index, memory))
        return plan

    def plan(self, state: State) -> list[tuple[torch.Tensor, Any, str]]:
        key = (state.experience.index if state.experience is not None else -1, id(state.optimizer))
        if self._plan is None or self._plan_for != key:
            self._plan, self._plan_for = self._build_plan(state), key
        return self._plan

    def _require(self, state: State) -> None:
        if self._checked:
            return
        self._checked = True
        if not self.plan(state):
            declared = [f"{g.get('name')} ({g.get('role')})" for g in optimizer_groups(state)]
            raise ConfigError(
                f"pgp found no projectable parameters among the declared groups {declared}; list a prompt strategy "
                f"(role {', '.join(self.roles)}) before or after pgp in strategies."
            )

    # --- events -------------------------------------------------------------------------------

    @hookimpl
    def init(self, state: State) -> None:
        if self.space == "sample":  # the official code's basis needs exactly D images
            self._collector.samples = state.backbone.embed_dim

    @hookimpl
    def fit_start(self, state: State) -> None:
        for store in (self.bases, self.frozen):
            for key, bases in store.items():
                store[key] = [b.to(state.device) for b in bases]
        self._projectors = {}

    @hookimpl
    def batch_start(self, state: State) -> None:
        if state.optimizer is None or not self._collector.active(state):
            return
        plan = self.plan(state)
        memories = {m for _, _, m in plan}
        layers = {int(m.split(":")[1]) for m in memories if m.startswith(("tokens:", "query:"))}
        self._collector.attach(state, layers, lambda s, layer, x, h: self._record_block(s, layer, x, h, memories))
        sites = {}
        for m in memories:
            if m.startswith("site:"):
                _, layer, site = m.split(":")
                sites[m] = getattr(state.backbone.model.blocks[int(layer)].attn, site)
        if sites:
            self._collector.attach_inputs(sites, lambda s, key, x: self._add_gram(self._acc, key, x.reshape(-1, x.shape[-1])), state)

    @hookimpl
    def after_forward(self, state: State) -> None:
        if not self._collector.handles or state.phase != "train":
            return
        memories = {m for _, _, m in self.plan(state)}
        with torch.no_grad():
            if "key" in memories:
                query = state.compute_query().float()
                if self.space == "sample":
                    self._add_rows(self._acc, "key", query, state.backbone.embed_dim)
                else:
                    self._add_gram(self._acc, "key", query)
            if self.forward_subspace and self.experiences == 0:
                self._record_frozen(state, memories)

    @hookimpl(trylast=True)
    def before_optimizer_step(self, state: State) -> None:
        if state.phase != "train":
            return
        self._require(state)
        if not self.bases:
            return
        items = [(p, index, self._projector(m, state)) for p, index, m in self.plan(state) if m in self.bases]
        with torch.no_grad():
            for p, index, projector in items:
                if p.grad is not None and projector is not None:
                    p.grad[index] = remove_component(p.grad[index], projector)
        if self.project == "update":
            self._snapshot.take({id(p): p for p, _, _ in items}.values())

    @hookimpl(tryfirst=True)
    def after_optimizer_step(self, state: State) -> None:
        if state.phase != "train" or not self._snapshot.saved:
            return
        by_param: dict[int, list[tuple[Any, torch.Tensor]]] = {}
        for p, index, m in self.plan(state):
            projector = self._projector(m, state) if m in self.bases else None
            if projector is not None:
                by_param.setdefault(id(p), []).append((index, projector))

        def project(p: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
            for index, projector in by_param.get(id(p), []):
                delta[index] = remove_component(delta[index], projector)
            return delta

        self._snapshot.apply(project)

    @hookimpl
    def experience_end(self, state: State) -> None:
        collected = self._end_collection(state, "pgp", "list a prompt strategy with pgp.")
        if collected is None:
            return
        for memory in sorted({m for _, _, m in self.plan(state)}):
            self._update_memory(state, memory, collected)
        if self.forward_subspace and self.experiences == 0:
            for key, value in collected.items():
                if key.startswith("frozen:"):
                    memory = key.removeprefix("frozen:")
                    self.frozen[memory] = self._gram_bases(value, None, self.forward_threshold, _heads_of(memory, state))
        self.experiences += 1
        self._projectors = {}
        self._acc, self._final = {}, {}

    # --- collection -------------------------------------------------------------------------

    @staticmethod
    def _add_gram(acc: dict[str, Any], key: str, rows: torch.Tensor) -> None:
        rows = rows.float()
        gram = rows.T @ rows
        acc[key] = acc[key] + gram if key in acc else gram

    @staticmethod
    def _add_rows(acc: dict[str, Any], key: str, rows: torch.Tensor, limit: int) -> None:
        have = acc.setdefault(key, [])
        count = sum(r.shape[0] for r in have)
        if count < limit:
            have.append(rows.float()[: limit - count])

    @staticmethod
    def _head_grams(q: torch.Tensor) -> torch.Tensor:
        """(H, Dh, Dh) Gram matrices of per-head queries (B, H, N, Dh)."""
        q = q.float().transpose(0, 1).reshape(q.shape[1], -1, q.shape[-1])
        return q.transpose(1, 2) @ q

    @staticmethod
    def _queries(block: Any, h: torch.Tensor) -> torch.Tensor:
        attn = block.attn
        b, n, d = h.shape
        q = attn.qkv(h)[..., :d].reshape(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
        return attn.q_norm(q)

    def _record_block(self, state: State, layer: int, x: torch.Tensor, h: torch.Tensor, memories: set[str]) -> None:
        if f"tokens:{layer}" in memories:
            if self.space == "sample":
                layout = token_layout(state.prompts, layer, state.backbone.num_prefix_tokens, x.shape[1])
                patches = layout["image"][state.backbone.num_prefix_tokens :].to(x.device)
                self._add_rows(self._acc, f"tokens:{layer}", x[:, patches].reshape(x.shape[0], -1), state.backbone.embed_dim)
            else:
                self._add_gram(self._acc, f"tokens:{layer}", x.reshape(-1, x.shape[-1]))
        if f"query:{layer}" in memories:
            gram = self._head_grams(self._queries(state.backbone.model.blocks[layer], h))
            key = f"query:{layer}"
            self._acc[key] = self._acc[key] + gram if key in self._acc else gram

    def _record_frozen(self, state: State, memories: set[str]) -> None:
        layers = {int(m.split(":")[1]) for m in memories if m.startswith(("tokens:", "query:"))}
        for layer, x in frozen_block_inputs(state.backbone, state.inputs, layers).items():
            if f"tokens:{layer}" in memories:
                self._add_gram(self._acc, f"frozen:tokens:{layer}", x.reshape(-1, x.shape[-1]))
            if f"query:{layer}" in memories:
                block = state.backbone.model.blocks[layer]
                gram = self._head_grams(self._queries(block, block.norm1(x)))
                key = f"frozen:query:{layer}"
                self._acc[key] = self._acc[key] + gram if key in self._acc else gram

    # --- bases ------------------------------------------------------------------------------

    def _threshold(self, memory: str) -> float:
        return self.key_threshold if memory == "key" else self.prompt_threshold

    def _gram_bases(self, value: Any, old: list[torch.Tensor] | None, threshold: float, heads: int, off_by_one: bool = False) -> list[torch.Tensor]:
        if isinstance(value, list):  # sample space: rows -> R R^T, used as the representation
            rows = torch.cat(value)
            m = rows @ rows.T
            value = m @ m.T
        if value.dim() == 2:
            value = value.unsqueeze(0)
        olds = old if old is not None else [None] * value.shape[0]
        return [gpm_extend(value[h], olds[h], threshold, off_by_one) for h in range(value.shape[0])]

    def _update_memory(self, state: State, memory: str, collected: dict[str, Any]) -> None:
        value = collected.get(memory)
        if value is None:
            log.warning("pgp: no representation was collected for %s in experience %s; its basis is unchanged.", memory, state.experience.index)
            return
        dim = state.backbone.embed_dim
        sample = isinstance(value, list)
        if sample:
            count = sum(r.shape[0] for r in value)
            if count < dim:
                raise ConfigError(
                    f"pgp space 'sample' needs {dim} training images per experience (the backbone's width), but experience "
                    f"{state.experience.index} gave {count}; use space 'channel'."
                )
        self.bases[memory] = self._gram_bases(value, self.bases.get(memory), self._threshold(memory), _heads_of(memory, state), sample and memory not in self.bases)

    def _projector(self, memory: str, state: State) -> torch.Tensor | None:
        if memory not in self._projectors:
            bases = self.bases[memory]
            if sum(b.shape[1] for b in bases) == 0:
                self._projectors[memory] = None  # type: ignore[assignment]
                return None
            if memory in self.frozen:
                # Fwd-Prompt: block only the part of the old subspace outside the frozen model's
                u = torch.block_diag(*bases)
                s = block_projector(self.frozen[memory]).to(u.device)
                blocked = orthonormal_span((torch.eye(u.shape[0], device=u.device) - s) @ u)
                self._projectors[memory] = blocked @ blocked.T
            else:
                self._projectors[memory] = block_projector(bases).to(state.device)
        return self._projectors[memory]

    def basis_sizes(self) -> dict[str, int]:
        """Directions kept per memory (summed over heads)."""
        return {k: sum(b.shape[1] for b in v) for k, v in self.bases.items()}

    # --- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "bases": {k: [b.detach().cpu() for b in v] for k, v in self.bases.items()},
            "frozen": {k: [b.detach().cpu() for b in v] for k, v in self.frozen.items()},
            "experiences": self.experiences,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.bases = {k: list(v) for k, v in state["bases"].items()}
        self.frozen = {k: list(v) for k, v in state["frozen"].items()}
        self.experiences = int(state["experiences"])
        self._projectors = {}


@hookimpl
def register_strategies(register):  # type: ignore[no-untyped-def]
    register(NAME, PGP)

