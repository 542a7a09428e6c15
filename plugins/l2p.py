"""Learning to Prompt for Continual Learning (Wang et al., CVPR 2022).

L2P keeps a pool of M prompts, each of length L, with one learnable key per prompt. For every
image, the frozen ViT's [CLS] feature (the query) is matched against the keys by cosine
similarity; the N best-matching prompts are concatenated and inserted as tokens at layer 0 of
the same frozen ViT. The classifier reads the mean of the output tokens at the prompt
positions. Training minimises cross-entropy (with logits outside the current experience
masked) plus a "surrogate" pull constraint that moves the selected keys toward their queries,
weighted by lambda = 0.1. The optional diversified selection of the paper (Section 3.3)
penalises prompts that earlier experiences used often, so new experiences are steered toward
unused prompts.

Defaults follow the paper and its reference PyTorch port: M=10, L=5, N=5, uniform initial
prompts and keys, the prompt-mean head, the train-time class mask, Adam with learning rate
0.03 x batch / 256 and a constant schedule (gradient clipping 1.0 is set in the configs).

Two deliberate differences from that port: selection is per sample by default (the port's
batch-wise majority vote is available as ``batchwise_selection`` but leaks task identity when
test batches come from one experience, so it warns), and the query comes from a no-grad pass
of the *same* backbone instance rather than a second copy of the model.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from driftprompt.engine import ConfigError, State, hookimpl
from driftprompt.engine.loop import cross_entropy

from .base import PromptStrategy

log = logging.getLogger(__name__)

HEADS = ("prompt", "cls")


# --- pure functions ---------------------------------------------------------------------


def key_similarity(keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between every query (B, D) and every key (M, D): (B, M)."""
    return F.normalize(query.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T


def select_prompts(keys: torch.Tensor, query: torch.Tensor, top_k: int, frequency: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (B, top_k) of the prompts whose keys best match each query.

    Without ``frequency`` this is the top-k cosine similarity. With ``frequency`` (the
    normalised selection counts h of earlier experiences, shape (M,)) it is the paper's
    diversified selection: the k smallest values of the cosine distance (1 - cos) times h,
    so that prompts earlier experiences used rarely are preferred.
    """
    sim = key_similarity(keys, query)
    if frequency is None:
        return sim.topk(top_k, dim=1).indices
    score = (1.0 - sim) * frequency.to(sim.dtype).unsqueeze(0)
    return score.topk(top_k, dim=1, largest=False).indices


def batchwise_majority(idx: torch.Tensor, pool_size: int) -> torch.Tensor:
    """Replace per-sample selections by the batch's ``top_k`` most frequent prompts (ties: lowest id)."""
    counts = torch.bincount(idx.flatten(), minlength=pool_size).float()
    # subtracting id / (pool + 1) < 1 breaks ties toward the lowest id without reordering counts
    tie_break = torch.arange(pool_size, device=idx.device, dtype=counts.dtype) / (pool_size + 1)
    top = (counts - tie_break).topk(idx.shape[1]).indices
    return top.unsqueeze(0).expand(idx.shape[0], -1)


def pull_loss(keys: torch.Tensor, query: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Surrogate loss pulling the selected keys toward the query.

    Sum over the selected prompts of the cosine distance 1 - cos(q, k_s), averaged over the
    batch. The query carries no gradient (it comes from the frozen model), so only keys move.
    """
    q = F.normalize(query.float().detach(), dim=-1).unsqueeze(1)  # B, 1, D
    k = F.normalize(keys.float(), dim=-1)[idx]  # B, N, D
    return (1.0 - (q * k).sum(dim=-1)).sum(dim=1).mean()


def gather_prompts(prompts: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Concatenate the selected prompts (M, L, D)[idx] into tokens of shape (B, N * L, D)."""
    selected = prompts[idx]  # B, N, L, D
    return selected.reshape(idx.shape[0], -1, prompts.shape[-1])


# --- the strategy -----------------------------------------------------------------------


class L2P(PromptStrategy):
    """L2P: a pool of key-matched prompts inserted as tokens at layer 0.

    Args:
        pool_size: M, prompts in the pool (10).
        prompt_length: L, tokens per prompt (5).
        top_k: N, prompts selected per image (5).
        pull_coeff: lambda, weight of the key pull constraint (0.1).
        head: ``"prompt"`` (mean of prompt outputs, the paper's) or ``"cls"`` (class token).
        train_mask: mask logits outside the current experience while training (True).
        diversify: the paper's frequency-penalised selection during training (False).
        batchwise_selection: the reference port's batch majority vote (False; leaks task
            identity whenever a test batch comes from one experience).
        prompt_pos_embed: give prompt tokens a learnable position embedding (False: prompts
            are inserted after the position embedding, as in the paper's formulation).
        lr: base learning rate of prompts, keys and head, scaled by batch / 256 (0.03);
            ``None`` uses the run's optimizer setting.
    """

    def __init__(
        self,
        pool_size: int = 10,
        prompt_length: int = 5,
        top_k: int = 5,
        pull_coeff: float = 0.1,
        head: str = "prompt",
        train_mask: bool = True,
        diversify: bool = False,
        batchwise_selection: bool = False,
        prompt_pos_embed: bool = False,
        lr: float | None = 0.03,
    ) -> None:
        if pool_size < 1 or prompt_length < 1 or top_k < 1:
            raise ConfigError(f"l2p needs pool_size, prompt_length and top_k of at least 1, got {pool_size}, {prompt_length}, {top_k}.")
        if top_k > pool_size:
            raise ConfigError(f"l2p top_k ({top_k}) is larger than pool_size ({pool_size}); lower top_k or grow the pool.")
        if head not in HEADS:
            raise ConfigError(f"l2p head {head!r} does not exist; use one of {', '.join(HEADS)}.")
        if batchwise_selection:
            log.warning("l2p batchwise_selection=True: a test batch drawn from one experience votes for that experience's prompts, which leaks task identity.")
        super().__init__()
        self.pool_size, self.prompt_length, self.top_k = pool_size, prompt_length, top_k
        self.pull_coeff, self.head, self.train_mask = pull_coeff, head, train_mask
        self.diversify, self.batchwise_selection = diversify, batchwise_selection
        self.prompt_pos_embed, self.lr = prompt_pos_embed, lr
        self.counts: torch.Tensor | None = None  # selections per prompt, all training so far
        self.frequency: torch.Tensor | None = None  # normalised counts up to the previous experience
        self._idx: torch.Tensor | None = None

    @hookimpl
    def init(self, state: State) -> None:
        dim = state.backbone.embed_dim
        # uniform initial prompts and keys, as in the reference port
        self.params["prompts"] = nn.Parameter(torch.rand(self.pool_size, self.prompt_length, dim, device=state.device))
        self.params["prompt_keys"] = nn.Parameter(torch.rand(self.pool_size, dim, device=state.device))
        if self.prompt_pos_embed:
            self.params["pos"] = nn.Parameter(torch.zeros(self.top_k * self.prompt_length, dim, device=state.device))
        self.counts = torch.zeros(self.pool_size, device=state.device)

    @hookimpl
    def experience_end(self, state: State) -> None:
        """Under torchrun each process counted its own selections: add them up."""
        assert self.counts is not None
        state.dist.reduce_delta_(self.counts, self._counts_base, "the prompt-count reduction")

    @hookimpl
    def experience_start(self, state: State) -> None:
        assert self.counts is not None
        self._counts_base = self.counts.clone()
        total = self.counts.sum()
        self.frequency = self.counts / total if self.diversify and state.experience.index > 0 else None

    @hookimpl
    def trainable_parameters(self, state: State) -> list[dict[str, Any]] | None:
        if state.phase != "train":
            return None
        extra = self.scaled_lr(self.lr, state)
        groups = [
            {"params": [self.params["prompts"]], "name": "l2p.prompts", "role": "prompt", "layer": 0, **extra},
            {"params": [self.params["prompt_keys"]], "name": "l2p.keys", "role": "key", **extra},
            {"params": list(state.head.parameters()), "name": "head", "role": "head", **extra},
        ]
        if "pos" in self.params:
            groups.append({"params": [self.params["pos"]], "name": "l2p.pos", "role": "prompt", "layer": 0, **extra})
        return groups

    @hookimpl
    def before_forward(self, state: State) -> None:
        query = state.compute_query()
        training = state.phase == "train"
        idx = select_prompts(self.params["prompt_keys"], query, self.top_k, self.frequency if training else None)
        if self.batchwise_selection:
            idx = batchwise_majority(idx, self.pool_size)
        if training and self.counts is not None:
            self.counts += torch.bincount(idx.flatten(), minlength=self.pool_size).to(self.counts.dtype)
        self._idx = idx
        tokens = gather_prompts(self.params["prompts"], idx)
        if "pos" in self.params:
            tokens = tokens + self.params["pos"]
        state.prompts.add_tokens(tokens)
        if self.head == "prompt":
            state.prompts.pool = "prompt_mean"

    @hookimpl
    def loss_terms(self, state: State) -> dict[str, torch.Tensor] | None:
        if state.phase != "train":
            return None
        assert self._idx is not None
        return {"ce": cross_entropy(state), "pull": self.pull_coeff * pull_loss(self.params["prompt_keys"], state.compute_query(), self._idx)}

    def extra_state(self) -> dict[str, Any]:
        return {"counts": self.counts, "frequency": self.frequency}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        device = self.params["prompts"].device  # checkpoints load on the CPU
        self.counts = state["counts"].to(device) if state["counts"] is not None else None
        self.frequency = state["frequency"].to(device) if state["frequency"] is not None else None


@hookimpl
def register_strategies(register):  # type: ignore[no-untyped-def]
    register("l2p", L2P)
